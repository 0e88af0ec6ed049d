"""The `evaluate` flow: one Prefect task run per evaluation task, a crash in one that leaves the others'
results, the scores plotted in the report artifact, and reuse of finished results."""
from __future__ import annotations

import asyncio
import json

from tests.test_corpus_flow import task_runs_of
from tests.test_eval_common import checkpoint_dir, require_clue
from tests.test_reports import decoded_image, png_images

TASKS = ["tnews", "ocnli", "cmrc2018"]


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(fetch())}


def _eval_task_runs(flow_run_id, expected: int) -> dict[str, str]:
    """Eval task run name → final state type, once `expected` of them have finished."""
    runs = task_runs_of(flow_run_id, lambda runs: sum(r.name in TASKS and r.state.is_final() for r in runs) >= expected)
    return {r.name: r.state.type.value for r in runs if r.name in TASKS}


def _evaluate(output, **kwargs):
    from flows.evaluate import evaluate

    return evaluate(checkpoint=str(checkpoint_dir()), data_dir=str(require_clue()), output=str(output),
                    tasks=",".join(TASKS), limit=6, return_state=True, **kwargs)


def test_each_eval_task_is_a_task_run_and_the_scores_are_plotted(prefect_api, tmp_path):
    state = _evaluate(tmp_path / "eval")
    assert state.is_completed(), state.message
    assert _eval_task_runs(state.state_details.flow_run_id, len(TASKS)) == {name: "COMPLETED" for name in TASKS}

    results = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    assert list(results["tasks"]) == TASKS
    assert all(results["tasks"][name]["status"] == "ok" and results["tasks"][name]["n"] == 6 for name in TASKS)
    assert results["meta"]["model"] == "tiny" and results["meta"]["run_key"]["checkpoint_xxh3"]
    assert {p.stem for p in (tmp_path / "eval" / "predictions").glob("*.jsonl")} == set(TASKS)

    artifacts = _artifacts(state.state_details.flow_run_id)
    report = artifacts["eval-report"].data
    (scores_plot,) = png_images(report)  # the plot renders inside the UI, above the report's table
    decoded_image(scores_plot)
    assert "| TNEWS | ppl | acc |" in report
    table = artifacts["eval-scores"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["task"] for row in table] == ["TNEWS", "OCNLI", "CMRC2018"]

    # Same config and checkpoint: the results are reused, no task runs again.
    written = (tmp_path / "eval" / "results.json").stat().st_mtime_ns
    again = _evaluate(tmp_path / "eval")
    assert again.is_completed() and again.result() == state.result()
    assert (tmp_path / "eval" / "results.json").stat().st_mtime_ns == written
    assert _eval_task_runs(again.state_details.flow_run_id, 0) == {}


def test_a_crashing_task_fails_alone_and_a_rerun_runs_only_it(prefect_api, tmp_path, monkeypatch):
    import flows.evaluate

    real_run_task = flows.evaluate.run_kept_task

    def run_task(task, *args, **kwargs):
        if task.name == "ocnli":
            raise RuntimeError("simulated crash in ocnli")
        return real_run_task(task, *args, **kwargs)

    monkeypatch.setattr(flows.evaluate, "run_kept_task", run_task)
    state = _evaluate(tmp_path / "eval")
    assert state.is_failed()
    assert "1 of 3 evaluation tasks failed: ocnli (RuntimeError: simulated crash in ocnli)" in state.message
    assert _eval_task_runs(state.state_details.flow_run_id, len(TASKS)) == {
        "tnews": "COMPLETED", "ocnli": "FAILED", "cmrc2018": "COMPLETED"}

    # The other tasks' results are written; the crash is in results.json and the report.
    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [results["tasks"][name]["status"] for name in TASKS] == ["ok", "failed", "ok"]
    assert results["tasks"]["ocnli"]["message"] == "RuntimeError: simulated crash in ocnli"
    assert "**ocnli**: RuntimeError: simulated crash in ocnli" in (out / "report.md").read_text(encoding="utf-8")
    assert "eval-report" in _artifacts(state.state_details.flow_run_id)
    finished = {name: results["tasks"][name] for name in ("tnews", "cmrc2018")}
    predictions = {name: (out / "predictions" / f"{name}.jsonl").read_text(encoding="utf-8") for name in finished}

    # Fixed, a rerun evaluates only the task that crashed and keeps the others' results and predictions.
    monkeypatch.setattr(flows.evaluate, "run_kept_task", real_run_task)
    again = _evaluate(out)
    assert again.is_completed(), again.message
    assert _eval_task_runs(again.state_details.flow_run_id, 1) == {"ocnli": "COMPLETED"}
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [results["tasks"][name]["status"] for name in TASKS] == ["ok", "ok", "ok"]
    assert {name: results["tasks"][name] for name in finished} == finished
    assert {name: (out / "predictions" / f"{name}.jsonl").read_text(encoding="utf-8") for name in finished} \
        == predictions
    assert (out / "predictions" / "ocnli.jsonl").is_file()


def test_flow_results_match_run_evaluation(prefect_api, tmp_path):
    """The flow and `pangu eval` (run_evaluation) share one code path: the same scores and predictions."""
    from evaluation.harness import EvalConfig, run_evaluation

    state = _evaluate(tmp_path / "flow")
    assert state.is_completed(), state.message
    direct = run_evaluation(EvalConfig(checkpoint=str(checkpoint_dir()), data_dir=str(require_clue()),
                                       output=str(tmp_path / "direct"), tasks=",".join(TASKS), limit=6))
    flow_results = json.loads((tmp_path / "flow" / "results.json").read_text(encoding="utf-8"))
    drop = {"seconds"}
    for name in TASKS:
        assert {k: v for k, v in flow_results["tasks"][name].items() if k not in drop} == \
               {k: v for k, v in direct["tasks"][name].items() if k not in drop}
        assert (tmp_path / "flow" / "predictions" / f"{name}.jsonl").read_bytes() == \
               (tmp_path / "direct" / "predictions" / f"{name}.jsonl").read_bytes()
    meta = {k: v for k, v in flow_results["meta"].items() if k != "seconds"}
    assert meta == {k: v for k, v in direct["meta"].items() if k != "seconds"}

