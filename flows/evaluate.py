"""The `evaluate` flow: zero-/few-shot evaluation of a checkpoint, published beside PanGu-α's numbers.

The model is loaded once; each evaluation task is one Prefect task run (named after it), so the UI
shows each task's progress and failure, and one task that crashes leaves the others' results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from evaluation.harness import (EvalConfig, EvaluationFailed, Scorer, TaskRun, execute, plan_evaluation,
                                run_kept_task)
from evaluation.report import skipped_records
from evaluation.tasks import Task
from flows.reports import eval_scores_figure, png_markdown


def score_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: our score, PanGu-α 2.6B / 13B, chance (for the artifact table)."""
    rows = []
    for task in results["tasks"].values():
        skipped = sum((task.get("skipped") or {}).values())  # records of its file it could not use
        if task.get("status") != "ok":
            rows.append({"task": task["title"], "n": 0, "skipped": skipped, "ours": task.get("status"),
                         "PanGu-α 2.6B": "", "PanGu-α 13B": "", "chance": ""})
            continue

        def show(scores: dict[str, float] | float | None) -> str:
            if scores is None:
                return "–"
            values = scores.values() if isinstance(scores, dict) else [scores]
            return " / ".join(f"{v:.2f}" for v in values)

        reference = task.get("reference") or {}
        rows.append({"task": task["title"], "n": task["n"], "skipped": skipped, "ours": show(task["scores"]),
                     "PanGu-α 2.6B": show(reference.get("PanGu-α 2.6B")),
                     "PanGu-α 13B": show(reference.get("PanGu-α 13B")),
                     "chance": f"{task['chance']['expected']:.2f}"})
    return rows


# The scorer holds the model: it is no cache key (NO_CACHE) and is passed in memory, never serialised.
# No retries: a task's run is deterministic, so a crash would only crash again.
@task(name="eval-task", task_run_name="{spec.name}", cache_policy=NO_CACHE)
def eval_task(spec: Task, scorer: Scorer, config: EvalConfig, key: dict[str, Any]) -> TaskRun:
    """One evaluation task, as `run_evaluation` runs it (going on from what an unfinished run kept)."""
    run = run_kept_task(spec, scorer, config, key)
    if run.resumed:
        get_run_logger().info("%s: went on from the %d examples an unfinished run kept", spec.name, run.resumed)
    summary = run.summary
    if summary["status"] == "ok":
        scores = ", ".join(f"{k} {v:.2f}" for k, v in summary["scores"].items())
        get_run_logger().info("%s: %s on %d examples (%.1fs)", spec.name, scores, summary["n"], summary["seconds"])
    else:
        get_run_logger().warning("%s: %s (%s)", spec.name, summary["status"], summary.get("message"))
    for line, examples in skipped_records(spec.name, summary):  # counted in results.json; said in the log too
        get_run_logger().warning("%s; first: %s", line, "; ".join(examples[:3]) or "–")
    return run


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
    plan = plan_evaluation(config)
    failed: dict[str, Exception] = {}
    results = plan.results_as_written()
    if results is not None:
        logger.info("%s already holds these results: reused", done)
    else:
        if plan.finished:
            logger.info("%s: %d tasks finished before, %d to run (%s)", output, len(plan.finished), len(plan.todo),
                        ", ".join(spec.name for spec in plan.todo) or "none")
        progress = create_progress_artifact(progress=100.0 * len(plan.finished) / len(plan.tasks),
                                            description="evaluate: tasks done")

        def run_one(spec: Task, scorer: Scorer) -> TaskRun:
            state = eval_task(spec, scorer, config, plan.key, return_state=True)
            if state.is_completed():
                return state.result()
            error = state.result(raise_on_failure=False)
            raise error if isinstance(error, Exception) else RuntimeError(state.message or state.type.value)

        results, failed = execute(plan, run_one,
                                  lambda n: update_progress_artifact(progress, progress=100.0 * n / len(plan.tasks)))
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
        raise EvaluationFailed(failed, len(plan.tasks), output)
    return {"output": output, "tasks": len(ok), "results": str(done)}
