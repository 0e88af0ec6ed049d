"""Tables and markdown for Prefect artifacts, built from a corpus manifest."""
from __future__ import annotations

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
