"""Tables, markdown and plots for Prefect artifacts.

Plots are matplotlib figures; `png_markdown` turns one into a markdown image line (a data URI),
which is how a picture shows inside a markdown artifact of the Prefect UI.
"""
from __future__ import annotations

import base64
import functools
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from cleaning.assets import CJK_FONT, assets_dir
from cleaning.inputs import describe_unsupported

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    ]
    if manifest.get("work"):  # what this build did itself and what it found done by earlier ones
        from cleaning.build import describe_work  # here: the other stages' reports need no cleaning chain

        lines += [f"Work: {describe_work(manifest['work'])}.", ""]
    lines += [
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
    unsupported = manifest.get("unsupported_files") or {}
    if unsupported.get("files"):  # found in the input directories, of a kind no reader takes
        lines += ["", f"Not read: {describe_unsupported(unsupported)}."]
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


# -- plots -------------------------------------------------------------------------------------
# Figures are built with `matplotlib.figure.Figure`, not pyplot: pyplot keeps global state that is
# not thread-safe, and Prefect task runs are threads. No display backend is needed to save a PNG.

# The Prefect UI shows an image of a markdown artifact only as a data URI (a file:// link does not
# open in a browser, SPEC §10). Base64 adds a third, so 150 kB of PNG stays under ~200 kB of markdown.
PNG_DPI = 80
PNG_MIN_DPI = 20
PNG_BUDGET_BYTES = 150_000


# Fonts with Chinese characters a system may have, for where the fetched one (CJK_FONT) is missing.
SYSTEM_CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
                       "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei", "PingFang SC",
                       "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS")


@functools.cache
def cjk_font_family() -> str | None:
    """Make the figures draw Chinese characters (domain names such as 新闻, shown as boxes by matplotlib's own
    DejaVu Sans) with a font that has them: `pangu data fetch-assets`'s CJK_FONT, else one the system has. The
    family comes after DejaVu Sans in `font.family`, so matplotlib takes from it only the glyphs DejaVu lacks.
    Returns the family, or None (said once in the log) where there is none. Set once per process: text takes
    its font families when it is made, and a figure may be made in any task's thread."""
    from matplotlib import font_manager, rcParams

    family = None
    fetched = assets_dir() / CJK_FONT
    if fetched.is_file():
        try:
            font_manager.fontManager.addfont(str(fetched))
            family = font_manager.FontProperties(fname=str(fetched)).get_name()
        except (OSError, RuntimeError, ValueError):  # a damaged file: as if there were none
            family = None
    if family is None:
        installed = {font.name for font in font_manager.fontManager.ttflist}
        family = next((name for name in SYSTEM_CJK_FAMILIES if name in installed), None)
    if family is None:
        logging.getLogger(__name__).warning(
            "no font with Chinese characters for the figures: Chinese labels show as boxes; `pangu data "
            "fetch-assets` fetches one (%s, where apt-get is at hand), or install fonts-noto-cjk", CJK_FONT)
        # said once here, not once per character and figure by matplotlib
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        return None
    rcParams["font.family"] = ["DejaVu Sans", family]
    return family


def new_figure(**kwargs: Any) -> Figure:
    """A figure whose text can hold Chinese (`cjk_font_family`)."""
    cjk_font_family()
    return Figure(**kwargs)


def png_bytes(figure: Figure, dpi: int = PNG_DPI) -> bytes:
    """The figure as PNG bytes at `dpi`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_markdown(fig_or_png_bytes: Figure | bytes, alt: str) -> str:
    """`![alt](data:image/png;base64,…)`: one markdown line that the Prefect UI renders as the image.

    A figure is drawn at a modest dpi (`PNG_DPI`), and drawn again smaller when its PNG exceeds
    `PNG_BUDGET_BYTES` (down to `PNG_MIN_DPI`), so an artifact stays well under ~200 kB. PNG bytes are
    embedded as they are.
    """
    if isinstance(fig_or_png_bytes, (bytes, bytearray)):
        png = bytes(fig_or_png_bytes)
    else:
        dpi = PNG_DPI
        png = png_bytes(fig_or_png_bytes, dpi)
        while len(png) > PNG_BUDGET_BYTES and dpi > PNG_MIN_DPI:
            # Bytes grow with the pixel count, the square of the dpi; aim a little below the budget.
            dpi = max(PNG_MIN_DPI, int(dpi * 0.9 * math.sqrt(PNG_BUDGET_BYTES / len(png))))
            png = png_bytes(fig_or_png_bytes, dpi)
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not PNG data")
    # Brackets and line breaks would end the alt text of the markdown image early.
    safe_alt = " ".join(alt.replace("[", "(").replace("]", ")").split())
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing, empty or NaN cell."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def loss_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Training loss and learning rate against step; validation loss as points on the loss axis.

    `rows` are metrics rows (`flows.pretrain.read_metrics_csv`): `step` and `loss` in every row, `lr`
    plotted on a second axis when every row has it, and `val_loss` drawn where a row holds a finite
    value (validation runs every few steps: the other rows have it NaN or not at all).
    """
    figure = new_figure(figsize=(8, 4), layout="tight")
    loss_axis = figure.subplots()
    steps = [row["step"] for row in rows]
    loss_axis.plot(steps, [row["loss"] for row in rows], label="training loss", color="tab:blue")
    validation = [(row["step"], _number(row.get("val_loss"))) for row in rows]
    validation = [(step, loss) for step, loss in validation if loss is not None]
    if validation:
        loss_axis.plot(*zip(*validation), "o", label="validation loss", color="tab:red", markersize=4)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    handles, labels = loss_axis.get_legend_handles_labels()
    if rows and all(_number(row.get("lr")) is not None for row in rows):
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [row["lr"] for row in rows], label="learning rate", color="tab:orange", alpha=0.6)
        lr_axis.set_ylabel("learning rate")
        lr_handles, lr_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    loss_axis.legend(handles, labels, fontsize=8, loc="best")
    loss_axis.set_title("training loss")
    return figure


def validation_figure(rows_by_domain: dict[str, list[tuple[float, float]]]) -> Figure:
    """Validation loss per domain against step: one line with points per domain.

    `rows_by_domain` maps a domain name to its `(step, loss)` pairs; NaN losses are left out.
    """
    figure = new_figure(figsize=(8, 4), layout="tight")
    axis = figure.subplots()
    for domain, points in rows_by_domain.items():
        finite = [(step, loss) for step, loss in points if _number(loss) is not None]
        if finite:
            axis.plot(*zip(*sorted(finite)), marker="o", markersize=3, label=domain)
    axis.set_xlabel("step")
    axis.set_ylabel("validation loss")
    axis.set_title("validation loss per domain")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    return figure


def corpus_figure(stats: dict[str, Any]) -> Figure:
    """Kept documents by length, stacked per domain, and the quality-score distribution (stats.json)."""
    figure = new_figure(figsize=(11, 4), layout="tight")
    lengths, quality = figure.subplots(1, 2)
    buckets = stats["length_buckets"]
    bottom = [0] * len(buckets)
    for domain, hist in stats["length_histogram"].items():
        lengths.bar(range(len(buckets)), hist, bottom=bottom, label=domain)
        bottom = [a + b for a, b in zip(bottom, hist)]
    lengths.set_xticks(range(len(buckets)), buckets, rotation=45, ha="right", fontsize=8)
    lengths.set_title("kept documents by length (characters)")
    if stats["length_histogram"]:
        lengths.legend(fontsize=8)
    quality.bar(range(len(stats["quality_bins"])), stats["quality_histogram"], color="tab:green")
    quality.set_xticks(range(len(stats["quality_bins"])), stats["quality_bins"], rotation=45, ha="right", fontsize=8)
    quality.set_title("quality score")
    return figure


def tokens_per_domain_figure(domains_summary: dict[str, Any]) -> Figure:
    """Tokens per domain as bars labelled with each domain's share (`domains.json` of tokenizer/pack.py)."""
    domains = domains_summary["domains"]
    names = list(domains)
    tokens = [domains[name]["tokens"] for name in names]
    figure = new_figure(figsize=(max(5.0, 0.8 * len(names) + 2), 4), layout="tight")
    axis = figure.subplots()
    bars = axis.bar(range(len(names)), tokens, color="tab:blue")
    axis.bar_label(bars, [f"{100 * domains[name]['token_share']:.1f} %" for name in names], fontsize=8)
    axis.set_xticks(range(len(names)), [f"{domains[name]['id']} {name}" for name in names],
                    rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("tokens")
    axis.set_title(f"{domains_summary.get('tokens', sum(tokens)):,} tokens per domain")
    return figure


_SCORE_SERIES = (("ours", "tab:blue"), ("PanGu-α 2.6B", "tab:orange"), ("PanGu-α 13B", "tab:red"),
                 ("chance", "tab:gray"))


def _reference_score(reference: Any, metric: str, single_metric: bool) -> float | None:
    """A published number for one metric: references are a number, or a dict per metric (EM / F1)."""
    if isinstance(reference, dict):
        return _number(reference.get(metric))
    return _number(reference) if single_metric else None


def eval_scores_figure(results: dict[str, Any]) -> Figure:
    """Grouped bars per evaluated task (and metric): our score, PanGu-α 2.6B and 13B where published,
    and chance. `results` is the evaluation's results.json; tasks not evaluated are left out."""
    groups: list[tuple[str, list[float | None]]] = []
    for task in results["tasks"].values():
        if task.get("status") != "ok":
            continue
        scores = task.get("scores") or {}
        reference = task.get("reference") or {}
        chance = _number((task.get("chance") or {}).get("expected"))
        for metric, ours in scores.items():
            single = len(scores) == 1
            label = task["title"] if single else f"{task['title']} {metric.upper()}"
            groups.append((label, [_number(ours), _reference_score(reference.get("PanGu-α 2.6B"), metric, single),
                                   _reference_score(reference.get("PanGu-α 13B"), metric, single), chance]))
    figure = new_figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 4), layout="tight")
    axis = figure.subplots()
    if not groups:
        axis.text(0.5, 0.5, "no task evaluated", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return figure
    width = 0.8 / len(_SCORE_SERIES)
    for k, (series, color) in enumerate(_SCORE_SERIES):
        # A missing reference is NaN: no bar, and the group keeps its place.
        heights = [math.nan if values[k] is None else values[k] for _, values in groups]
        axis.bar([i + (k - (len(_SCORE_SERIES) - 1) / 2) * width for i in range(len(groups))], heights, width,
                 label=series, color=color)
    axis.set_xticks(range(len(groups)), [label for label, _ in groups], rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("score (%)")
    axis.set_title("zero-shot scores beside PanGu-α and chance")
    axis.legend(fontsize=8)
    return figure


def _save_png(figure: Figure, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(figure, dpi))
    return path


def plot_stats(stats: dict[str, Any], path: str) -> str | None:
    """`corpus_figure` as a PNG file beside the corpus; None off local disk."""
    if "://" in path and not path.startswith("file://"):
        return None
    return str(_save_png(corpus_figure(stats), Path(path.removeprefix("file://"))))
