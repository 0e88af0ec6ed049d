"""Evaluation tasks kept as they finish, so that a rerun after a kill or a crash runs only the rest.

    OUTPUT/predictions/<task>.jsonl   the task's per-example predictions
    OUTPUT/tasks/<task>.json          its summary, the run it belongs to, the scorer and the model (written last)
    OUTPUT/partial/<task>.json        an unfinished task's predictions so far, with the run they belong to
                                      (kept every KEEP_EVERY_S and when the run stops; gone once the task ends)

A finished task is reused by a run with the same key: the evaluation settings (all but the task list
and the output) and the checkpoint's content hash. A task that crashed is not kept; one that found no
data runs again once its data is there. When a run ends, what runs with another key left is removed
(`drop_other_runs`): the directory holds one evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cleaning.writers import write_bytes_atomic, write_json_atomic

TASKS_DIR = "tasks"
PREDICTIONS_DIR = "predictions"
PARTIAL_DIR = "partial"

#: seconds between keeps of an unfinished task's predictions: what a `kill -9` can lose (a Ctrl-C, a SIGTERM or a
#: crash keeps everything done); a keep rewrites the task's predictions so far
KEEP_EVERY_S = 30.0


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
    (output / PARTIAL_DIR / f"{summary['task']}.json").unlink(missing_ok=True)


def keep_partial(output: Path, key: dict[str, Any], task: str, predictions: list[dict[str, Any]]) -> None:
    """An unfinished task's predictions so far, for a rerun with the same key to go on from."""
    # one line, in the predictions' own key order (a resumed task writes the same predictions file)
    write_bytes_atomic(output / PARTIAL_DIR / f"{task}.json",
                       json.dumps({"key": key, "predictions": predictions}, ensure_ascii=False).encode("utf-8"))


def partial_predictions(output: Path, key: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """The predictions an unfinished run of `task` with `key` kept (`keep_partial`); none for another key or
    an unreadable file."""
    try:
        kept = json.loads((output / PARTIAL_DIR / f"{task}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("predictions"), list):
        return []
    return kept["predictions"]


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


def drop_other_runs(output: Path, key: dict[str, Any]) -> list[Path]:
    """Removes what runs with another key left under `output` (another checkpoint, other settings): their task
    markers, predictions and unfinished predictions, and predictions no finished task of `key` stands behind
    (a task that found no data this time). What is left beside results.json is this run's; tasks of this key
    that this run did not list stay, for a run that lists them again. Returns the files removed."""
    finished = finished_tasks(output, key)
    stale = [path for path in (output / TASKS_DIR).glob("*.json") if path.stem not in finished]
    stale += [path for path in (output / PREDICTIONS_DIR).glob("*.jsonl")
              if finished.get(path.stem, {}).get("summary", {}).get("status") != "ok"]
    for path in (output / PARTIAL_DIR).glob("*.json"):
        try:
            other = json.loads(path.read_text(encoding="utf-8")).get("key") != key
        except (OSError, ValueError, AttributeError):  # unreadable: of no use to any run
            other = True
        if other:
            stale.append(path)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


__all__ = ["KEEP_EVERY_S", "PARTIAL_DIR", "PREDICTIONS_DIR", "TASKS_DIR", "drop_other_runs", "finished_tasks",
           "keep_partial", "keep_task", "partial_predictions"]
