"""Tables and markdown for Prefect artifacts, built from a corpus manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def source_table(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    reasons = list(manifest["rejected_by_rule"])
    rows = []
    for source, entry in manifest["sources"].items():
        row = {"source": source, "input": entry["input"], "kept": entry["kept"]}
        row.update({reason: entry["rejected"].get(reason, 0) for reason in reasons})
        rows.append(row)
    return rows


def corpus_markdown(manifest: dict[str, Any], stats: dict[str, Any], output: str) -> str:
    totals = manifest["totals"]
    lines = [
        f"# Corpus {manifest['version']}",
        "",
        f"Output `{output}` · code {manifest['code_version']} · config `{manifest['config_hash'][:12]}` · "
        f"{manifest['seconds']:.1f} s",
        "",
        f"**{totals['input']:,}** documents in, **{totals['kept']:,}** kept "
        f"({100 * totals['kept'] / max(1, totals['input']):.1f} %), **{totals['rejected']:,}** rejected.",
        "",
        "## Rejected by rule",
        "",
        "| rule | documents |",
        "|---|---:|",
    ]
    lines += [f"| {rule} | {n:,} |" for rule, n in manifest["rejected_by_rule"].items()]
    problems = [i for i in manifest["inputs"] if i["error"]]
    if problems:
        lines += ["", "## Input problems", "", "| input | status | error |", "|---|---|---|"]
        lines += [f"| {i['uri']} | {i['status']} | {i['error']} |" for i in problems]
    if manifest.get("dedup"):
        lines += ["", "## Deduplication", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in manifest["dedup"].items()]
    lines += ["", "## Kept documents per domain", "", "| domain | documents | characters | share | mean length |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {d} | {e['documents']:,} | {e['characters']:,} | {100 * e['share_of_characters']:.1f} % | "
              f"{e['mean_length']:,.0f} |" for d, e in stats["domains"].items()]
    buckets = stats["length_buckets"]
    lines += ["", "## Length distribution (characters)", "", "| domain | " + " | ".join(buckets) + " |",
              "|---|" + "---:|" * len(buckets)]
    lines += [f"| {d} | " + " | ".join(str(n) for n in hist) + " |" for d, hist in stats["length_histogram"].items()]
    if any(stats["quality_histogram"]):
        lines += ["", "## Quality score distribution", "", "| " + " | ".join(stats["quality_bins"]) + " |",
                  "|" + "---:|" * len(stats["quality_bins"]),
                  "| " + " | ".join(str(n) for n in stats["quality_histogram"]) + " |"]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


def plot_loss(rows: list[dict[str, float]], path: Path) -> Path:
    """The training loss curve (and the learning rate) as a PNG."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, loss_axis = plt.subplots(figsize=(8, 4))
    loss_axis.plot(steps, [r["loss"] for r in rows], label="loss", color="tab:blue")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if all("lr" in r for r in rows):
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [r["lr"] for r in rows], label="lr", color="tab:orange", alpha=0.6)
        lr_axis.set_ylabel("learning rate")
    loss_axis.set_title("training loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_stats(stats: dict[str, Any], path: str) -> str | None:
    """Length and quality distributions as one PNG beside the corpus; None off local disk."""
    if "://" in path and not path.startswith("file://"):
        return None
    plt = _pyplot()
    target = Path(path.removeprefix("file://"))
    fig, (lengths, quality) = plt.subplots(1, 2, figsize=(11, 4))
    buckets = stats["length_buckets"]
    bottom = [0] * len(buckets)
    for domain, hist in stats["length_histogram"].items():
        lengths.bar(range(len(buckets)), hist, bottom=bottom, label=domain)
        bottom = [a + b for a, b in zip(bottom, hist)]
    lengths.set_xticks(range(len(buckets)), buckets, rotation=45, ha="right", fontsize=8)
    lengths.set_title("kept documents by length (characters)")
    lengths.legend(fontsize=8)
    quality.bar(range(len(stats["quality_bins"])), stats["quality_histogram"], color="tab:green")
    quality.set_xticks(range(len(stats["quality_bins"])), stats["quality_bins"], rotation=45, ha="right", fontsize=8)
    quality.set_title("quality score")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return str(target)
