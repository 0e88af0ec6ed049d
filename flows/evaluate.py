"""The `evaluate` flow: zero-/few-shot evaluation of a checkpoint, published beside PanGu-α's numbers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from evaluation.harness import EvalConfig, run_evaluation


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


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoint: str, data_dir: str, output: str, tokenizer: str | None = None, tasks: str = "all",
             shots: int = 0, limit: int | None = None, seed: int = 1234, domain: int | None = None) -> dict[str, Any]:
    """Evaluate `checkpoint` on the PanGu-α tasks found in `data_dir`; reuses finished results."""
    logger = get_run_logger()
    config = EvalConfig(checkpoint=checkpoint, tokenizer=tokenizer, tasks=tasks, data_dir=data_dir,
                        output=output, shots=shots, limit=limit, seed=seed, domain=domain)
    done = Path(output) / "results.json"
    results = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
    if results and results.get("meta", {}).get("config") == config.model_dump(mode="json") \
            and results["meta"].get("checkpoint_sha256") == _checkpoint_hash(checkpoint):
        logger.info("%s already holds these results: reused", done)
    else:
        results = run_evaluation(config)
        results.setdefault("meta", {})["config"] = config.model_dump(mode="json")
        results["meta"]["checkpoint_sha256"] = _checkpoint_hash(checkpoint)
        done.write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    create_table_artifact(key="eval-scores", table=score_rows(results),
                          description="zero-shot scores beside PanGu-α (SPEC §6) and chance")
    report = Path(output) / "report.md"
    if report.is_file():
        create_markdown_artifact(key="eval-report", markdown=report.read_text(encoding="utf-8"))
    ok = [t for t in results["tasks"].values() if t.get("status") == "ok"]
    logger.info("evaluated %d tasks (%d not found) → %s", len(ok), len(results["tasks"]) - len(ok), output)
    return {"output": output, "tasks": len(ok), "results": str(done)}


def _checkpoint_hash(checkpoint: str) -> str:
    from cleaning.inputs import content_hash

    return content_hash(str(Path(checkpoint) / "model.safetensors"))[0]
