"""results.json and a markdown report, with the PanGu-α reference numbers and chance levels beside ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cleaning.outputs import nearest_existing
from cleaning.writers import write_bytes_atomic
from tokenizer.released import RELEASED_NAME as RELEASED_TOKENIZER

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
REFERENCE_COLUMNS = ("PanGu-α 2.6B", "PanGu-α 13B")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return " / ".join(_fmt(v) for v in value.values())
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _metric_label(summary: dict[str, Any]) -> str:
    return {"acc": "acc", "em_f1": "EM / F1", "rouge1": "ROUGE-1"}[summary["metric"]]


def _ours(summary: dict[str, Any]) -> str:
    scores = summary.get("scores") or {}
    if summary["metric"] == "em_f1":
        return f"{scores.get('em', 0):.2f} / {scores.get('f1', 0):.2f}"
    return _fmt(next(iter(scores.values()), None))


def _same_model_column(meta: dict[str, Any]) -> str | None:
    """The reference column that reports the very model evaluated: an imported release of a published size,
    read with the released tokenizer."""
    published = (meta.get("imported") or {}).get("published")
    if published in REFERENCE_COLUMNS and meta.get("tokenizer_name") == RELEASED_TOKENIZER:
        return published
    return None


def skipped_records(name: str, summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """What a task left out of its data (and of its demonstrations' file): one line each, `eprstmt: 2 of 23
    records skipped (not JSON: 1, no label: 1)`, with the first few places; none when it used every record."""
    out = []
    for prefix, what in (("", ""), ("train_", " (demonstrations)")):
        counts = summary.get(f"{prefix}skipped") or {}
        total = sum(counts.values())
        if not total:
            continue
        reasons = ", ".join(f"{reason}: {count}" for reason, count in counts.items())
        # The file's records: those the task could use (n_available) and those it skipped.
        of = f" of {summary.get('n_available', 0) + total}" if not prefix else ""
        out.append((f"{name}{what}: {total}{of} records skipped ({reasons})",
                    list(summary.get(f"{prefix}skipped_examples") or [])))
    return out


def markdown_report(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = ["# Evaluation report", ""]
    described = {k: meta[k] for k in ("scorer", "checkpoint", "model", "tokenizer", "data_dir", "shots", "seed", "limit",
                                      "split", "primary_variant", "seconds") if k in meta}
    lines += [f"- **{k}**: {v}" for k, v in described.items()]
    if meta.get("domain"):
        domain = meta["domain"]
        lines.append(f"- **sub-model**: PanGu-Σ domain {domain['id']}"
                     f"{' (' + domain['name'] + ')' if domain.get('name') else ''}, {domain['chosen_by']}")
    same = _same_model_column(meta)
    imported = meta.get("imported")
    if imported:
        what = f"the released {imported['published']}" if imported.get("published") else \
            f"preset {imported['preset']}, not a published PanGu-α size"
        lines.append(f"- **weights**: imported from {imported['source']} ({imported['format']}, iteration "
                     f"{imported['iteration']}, {imported['source_dtype']}): {what}")
    if meta.get("tokenizer_name") == RELEASED_TOKENIZER:
        lines.append(f"- **tokenizer**: the released PanGu-α tokenizer ({meta.get('tokenizer_package')})")
    if same:
        lines += ["", f"**Like with like**: these are the released {same} weights with the released tokenizer, so "
                      f"the {same} column is the same model as ours; what differs is the split, the templates "
                      f"and the example subset."]
    lines += ["", "Scores in %. PPL tasks rank candidates by the lowest mean token loss over the filled template.",
              "PanGu-α columns: the paper's zero-shot results (SPEC §6) on the datasets' own evaluation sets; ours",
              "run on the split shown (FewCLUE `test_public`, C3 `train` and CMRC2018 `trial` where only those exist).",
              "Chance: the expected accuracy of a scorer that ignores the input (mean 1/candidates).", ""]
    columns = [f"{c} (same weights)" if c == same else c for c in REFERENCE_COLUMNS]
    lines += [f"| task | method | metric | split | n | ours | {' | '.join(columns)} | chance | seconds |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    missing = []
    for name, s in results.get("tasks", {}).items():
        if s.get("status") != "ok":
            missing.append((name, s.get("message", s.get("status"))))
            continue
        ref = s.get("reference") or {}
        chance = (s.get("chance") or {}).get("expected")
        title = f"{s['title']}{' (extra)' if s.get('extra') else ''}"
        lines.append(
            f"| {title} | {s['method']} | {_metric_label(s)} | {s.get('split', '')} | {s.get('n', 0)} | {_ours(s)} | "
            f"{_fmt(ref.get('PanGu-α 2.6B'))} | {_fmt(ref.get('PanGu-α 13B'))} | {_fmt(chance)} | {_fmt(s.get('seconds'))} |"
        )
    ppl = [(n, s) for n, s in results.get("tasks", {}).items() if s.get("status") == "ok" and s["method"] == "ppl"]
    if ppl:
        lines += ["", "## Perplexity ranking: the three normalisations", "",
                  "`mean_token`: loss / tokens (primary); `char_norm`: loss / characters (lm-eval `acc_norm` style); "
                  "`sum`: summed loss (lm-eval `acc`).", "",
                  "| task | mean_token | char_norm | sum | candidates (mean) | candidates |", "|---|---:|---:|---:|---:|---|"]
        for name, s in ppl:
            v = s["ppl_variants"]
            lines.append(f"| {s['title']} | {v['mean_token']['acc']:.2f} | {v['char_norm']['acc']:.2f} | "
                         f"{v['sum']['acc']:.2f} | {s.get('mean_candidates', 0):.2f} | {s['candidates']} |")
    gen = [(n, s) for n, s in results.get("tasks", {}).items() if s.get("status") == "ok" and s["method"] == "gen"]
    if gen:
        lines += ["", "## Generation settings", "", "| task | decoding |", "|---|---|"]
        for name, s in gen:
            lines.append(f"| {s['title']} | {json.dumps(s.get('decoding', {}), ensure_ascii=False)} |")
    lines += ["", "## Templates", "", "| task | template |", "|---|---|"]
    for name, s in results.get("tasks", {}).items():
        template = s["template"].replace("\n", "\\n")
        lines.append(f"| {s['title']} | `{template}` |")
    skipped = [line for name, s in results.get("tasks", {}).items() for line in skipped_records(name, s)]
    if skipped:
        lines += ["", "## Skipped records", "",
                  "Records of the data files that could not be used, by reason (`skipped` in results.json), with the "
                  "first few places:", ""]
        for line, examples in skipped:
            lines += [f"- {line}"] + [f"  - `{example}`" for example in examples]
    if missing:
        lines += ["", "## Not evaluated", ""] + [f"- **{n}**: {m}" for n, m in missing]
    return "\n".join(lines) + "\n"


def require_output_dir(output: str | Path) -> None:
    """Refuses an output directory that is a file, or lies under one, before the work that would write
    there (it would fail only after the model was loaded, with the errno's own words)."""
    path = Path(output)
    place = nearest_existing(path)
    if place is not None and not place.is_dir():
        where = "is a file" if place == path else f"is under {place}, a file"
        raise NotADirectoryError(f"--output {output} {where}, not a directory")


def write_outputs(results: dict[str, Any], predictions: dict[str, list[dict[str, Any]]], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    pred_dir = output / "predictions"
    pred_dir.mkdir(exist_ok=True)
    for task, rows in predictions.items():
        if rows:
            write_bytes_atomic(pred_dir / f"{task}.jsonl",
                               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    write_bytes_atomic(output / RESULTS_FILE, (json.dumps(results, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    write_bytes_atomic(output / REPORT_FILE, markdown_report(results).encode("utf-8"))
    return output


__all__ = ["REPORT_FILE", "RESULTS_FILE", "markdown_report", "require_output_dir", "skipped_records", "write_outputs"]
