"""Evaluation tasks kept as they finish, so that a rerun after a kill or a crash runs only the rest.

    OUTPUT/predictions/<task>.jsonl   the task's per-example predictions
    OUTPUT/tasks/<task>.json          its summary, the run it belongs to, the scorer and the model (written last)

A finished task is reused by a run with the same key: the evaluation settings (all but the task list
and the output) and the checkpoint's content hash. A task that crashed is not kept; one that found no
data runs again once its data is there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cleaning.writers import write_bytes_atomic, write_json_atomic

TASKS_DIR = "tasks"
PREDICTIONS_DIR = "predictions"


def keep_task(output: Path, key: dict[str, Any], scorer: str, model: dict[str, Any], summary: dict[str, Any],
              predictions: list[dict[str, Any]]) -> None:
    """Writes a finished task's predictions, then its marker. A task that crashed is not kept: it runs
    again. One whose data was missing or empty is kept, and runs again once its data is there
    (`evaluation.harness.plan_evaluation` looks)."""
    if summary.get("status") == "failed":
        return
    if predictions:
        write_bytes_atomic(output / PREDICTIONS_DIR / f"{summary['task']}.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions).encode("utf-8"))
    write_json_atomic(output / TASKS_DIR / f"{summary['task']}.json",
                      {"key": key, "scorer": scorer, "model": model, "summary": summary})


def finished_tasks(output: Path, key: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Task name → marker ({key, scorer, model, summary}) of every task kept under `output` with `key`.
    An unreadable marker (written by another version of this program) counts as not finished."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((output / TASKS_DIR).glob("*.json")):
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("key") == key and isinstance(marker.get("summary"), dict):
            found[path.stem] = marker
    return found


__all__ = ["PREDICTIONS_DIR", "TASKS_DIR", "finished_tasks", "keep_task"]
