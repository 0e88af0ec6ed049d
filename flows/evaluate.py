"""The `evaluate` flow: zero-/few-shot evaluation of a checkpoint, published beside PanGu-α's numbers.

The model is loaded once; each evaluation task is one Prefect task run (named after it), so the UI
shows each task's progress and failure, and one task that crashes leaves the others' results.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from evaluation.harness import (EvalConfig, Scorer, TaskRun, assemble_results, failed_task_run, load_scorer, run_task,
                                write_results)
from evaluation.loaders import clear_cache
from evaluation.tasks import Task, resolve_tasks
from flows.reports import eval_scores_figure, png_markdown


def score_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: our score, PanGu-α 2.6B / 13B, chance (for the artifact table)."""
    rows = []
    for task in results["tasks"].values():
        if task.get("status") != "ok":
            rows.append({"task": task["title"], "n": 0, "ours": task.get("status"), "PanGu-α 2.6B": "",
                         "PanGu-α 13B": "", "chance": ""})
            continue

        def show(scores: dict[str, float] | float | None) -> str:
            if scores is None:
                return "–"
            values = scores.values() if isinstance(scores, dict) else [scores]
            return " / ".join(f"{v:.2f}" for v in values)

        reference = task.get("reference") or {}
        rows.append({"task": task["title"], "n": task["n"], "ours": show(task["scores"]),
                     "PanGu-α 2.6B": show(reference.get("PanGu-α 2.6B")),
                     "PanGu-α 13B": show(reference.get("PanGu-α 13B")),
                     "chance": f"{task['chance']['expected']:.2f}"})
    return rows


# The scorer holds the model: it is no cache key (NO_CACHE) and is passed in memory, never serialised.
# No retries: a task's run is deterministic, so a crash would only crash again.
@task(name="eval-task", task_run_name="{spec.name}", cache_policy=NO_CACHE)
def eval_task(spec: Task, scorer: Scorer, config: EvalConfig) -> TaskRun:
    """One evaluation task, as `run_evaluation` runs it."""
    run = run_task(spec, scorer, config.data_dir, shots=config.shots, seed=config.seed, limit=config.limit,
                   split=config.split)
    summary = run.summary
    if summary["status"] == "ok":
        scores = ", ".join(f"{k} {v:.2f}" for k, v in summary["scores"].items())
        get_run_logger().info("%s: %s on %d examples (%.1fs)", spec.name, scores, summary["n"], summary["seconds"])
    else:
        get_run_logger().warning("%s: %s (%s)", spec.name, summary["status"], summary.get("message"))
    return run


def _reusable_tasks(done: Path, config: EvalConfig, checkpoint_sha256: str) -> dict[str, dict[str, Any]]:
    """Task name → summary of the finished results of the same config and checkpoint (failed ones excluded:
    they run again)."""
    if not done.is_file():
        return {}
    previous = json.loads(done.read_text(encoding="utf-8"))
    meta = previous.get("meta", {})
    if meta.get("config") != config.model_dump(mode="json") or meta.get("checkpoint_sha256") != checkpoint_sha256:
        return {}
    return {name: summary for name, summary in previous["tasks"].items() if summary.get("status") != "failed"}


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoint: str, data_dir: str, output: str, tokenizer: str | None = None, tasks: str = "all",
             shots: int = 0, limit: int | None = None, seed: int = 1234,
             domain: int | str | None = None) -> dict[str, Any]:
    """Evaluate `checkpoint` on the PanGu-α tasks found in `data_dir`, one task run per task; results of the
    same config and checkpoint are reused. Fails, after writing the others' results, when a task crashed."""
    logger = get_run_logger()
    config = EvalConfig(checkpoint=checkpoint, tokenizer=tokenizer, tasks=tasks, data_dir=data_dir,
                        output=output, shots=shots, limit=limit, seed=seed, domain=domain)
    done = Path(output) / "results.json"
    checkpoint_sha256 = _checkpoint_hash(checkpoint)
    reusable = _reusable_tasks(done, config, checkpoint_sha256)
    specs = resolve_tasks(config.tasks)
    todo = [spec for spec in specs if spec.name not in reusable]
    failed: dict[str, str] = {}
    if not todo:
        logger.info("%s already holds these results: reused", done)
        results = json.loads(done.read_text(encoding="utf-8"))
    else:
        if reusable:
            logger.info("%s: %d tasks reused, %d to run (%s)", done, len(reusable), len(todo),
                        ", ".join(spec.name for spec in todo))
        scorer, model_meta = load_scorer(config)
        clear_cache()  # list the data directory afresh, as `evaluation.harness.evaluate` does
        progress = create_progress_artifact(progress=0.0, description="evaluate: tasks done")
        started = time.perf_counter()
        runs: dict[str, TaskRun] = {}
        for spec in specs:
            if spec.name in reusable:
                runs[spec.name] = TaskRun(reusable[spec.name])  # its predictions file stays as written
                continue
            state = eval_task(spec, scorer, config, return_state=True)
            if state.is_completed():
                runs[spec.name] = state.result()
            else:
                error = state.result(raise_on_failure=False)
                if not isinstance(error, BaseException):
                    error = RuntimeError(state.message or state.type.value)
                runs[spec.name] = failed_task_run(spec, error, shots=config.shots, seed=config.seed)
                failed[spec.name] = runs[spec.name].summary["message"]
            update_progress_artifact(progress, progress=100.0 * len(runs) / len(specs))
        results, predictions = assemble_results(scorer.name, runs, config.data_dir, shots=config.shots,
                                                seed=config.seed, limit=config.limit, split=config.split)
        model_meta = {**model_meta, "config": config.model_dump(mode="json"), "checkpoint_sha256": checkpoint_sha256}
        write_results(config, results, predictions, model_meta, time.perf_counter() - started)
    create_table_artifact(key="eval-scores", table=score_rows(results),
                          description="zero-shot scores beside PanGu-α (SPEC §6) and chance")
    report = Path(output) / "report.md"
    if report.is_file():
        plot = png_markdown(eval_scores_figure(results), "scores beside PanGu-α and chance")
        create_markdown_artifact(key="eval-report", markdown=plot + "\n\n" + report.read_text(encoding="utf-8"),
                                 description="evaluation report: scores plotted and tabulated beside PanGu-α")
    ok = [t for t in results["tasks"].values() if t.get("status") == "ok"]
    logger.info("evaluated %d tasks (%d not evaluated) → %s", len(ok), len(results["tasks"]) - len(ok), output)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(specs)} evaluation tasks failed: "
                           + "; ".join(f"{name} ({message})" for name, message in failed.items())
                           + f". The others' results are in {done}; a rerun runs only the failed ones.")
    return {"output": output, "tasks": len(ok), "results": str(done)}


def _checkpoint_hash(checkpoint: str) -> str:
    from cleaning.inputs import content_hash

    return content_hash(str(Path(checkpoint) / "model.safetensors"))[0]
