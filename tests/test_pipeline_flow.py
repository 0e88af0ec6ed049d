"""The `pipeline` flow end to end on real text: every stage as a subflow, lineage, and a rerun that skips."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from cleaning.config import CorpusConfig
from tests.realtext import CLUE, abstracts, app_descriptions

RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("pipeline-raw")
    for name, domain, texts in (("science", "science", abstracts()[:300]), ("apps", "web", app_descriptions()[:300])):
        records = [{"id": f"{name}{i}", "text": t, "domain": domain} for i, t in enumerate(texts)]
        (raw / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                           encoding="utf-8")
    return raw


def _flow_runs_and_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return runs, artifacts

    return asyncio.run(fetch())


@pytest.mark.slow
def test_pipeline_runs_every_stage_as_a_subflow_and_reruns_from_cache(prefect_api, raw, tmp_path):
    from evaluation.model_io import load_for_eval
    from flows.pipeline import pipeline

    kwargs = dict(inputs=[str(raw)], root=str(tmp_path), corpus_config=CorpusConfig.model_validate({"rules": RULES_ONLY}),
                  vocab_size=4000, input_sentence_size=20_000, preset="sigma-tiny", steps=3,
                  eval_data=str(CLUE), eval_tasks="tnews,ocnli", eval_limit=20, workers=1)
    state = pipeline(**kwargs, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    results = json.loads((tmp_path / summary["results"].split(str(tmp_path) + "/")[1]).read_text())
    assert {t["task"] for t in results["tasks"].values() if t["status"] == "ok"} == {"tnews", "ocnli"}
    assert (tmp_path / "corpus" / "LATEST").exists()

    runs, artifacts = _flow_runs_and_artifacts(state.state_details.flow_run_id)
    parent = next(r for r in runs if r.id == state.state_details.flow_run_id)
    children = {r.name: r for r in runs if r.parent_task_run_id is not None and r.start_time >= parent.start_time}
    assert len(children) >= 5  # corpus-refresh, corpus, tokenizer, pretrain, evaluate
    lineage = next(a for a in artifacts if a.key == "pipeline-lineage").data
    lineage = json.loads(lineage) if isinstance(lineage, str) else lineage
    stages = [row["stage"] for row in lineage]
    assert stages.count("raw input") == 2
    assert stages[2:] == ["corpus", "tokenizer", "token shards", "checkpoint", "evaluation"]
    assert all(len(row["content_hash"]) == 32 for row in lineage)

    # A PanGu-Σ export with several domains is evaluated as the sub-model of the domain with the most
    # training tokens, with the tokenizer bundled in the export.
    assert results["meta"]["domain"]["chosen_by"] == "most training tokens"
    model, _ = load_for_eval(summary["model"])
    assert model.config.num_domains == 1 and model.config.domain_id_offset == results["meta"]["domain"]["id"]

    marks = {p: p.stat().st_mtime_ns for p in [tmp_path / "corpus" / "LATEST"] +
             list((tmp_path / "tokens").rglob("*.bin")) + [tmp_path / summary["results"].split(str(tmp_path) + "/")[1]]}
    again = pipeline(**kwargs)
    assert again == summary
    changed = [str(p) for p, t in marks.items() if p.stat().st_mtime_ns != t and p.name != "LATEST"]
    assert not changed

    # Another evaluation set for the same model goes beside the first, which is kept (one directory held one
    # evaluation: the second replaced the first's predictions and results)
    other = tmp_path / "other-set" / "fewclue" / "tnews"
    shutil.copytree(CLUE / "fewclue" / "tnews", other)
    first = Path(summary["results"]).read_bytes()
    beside = pipeline(**{**kwargs, "eval_data": str(other.parents[1]), "eval_tasks": "tnews"})
    assert Path(beside["results"]).parent.parent == Path(summary["results"]).parent.parent
    assert [p.parent.name for p in (Path(summary["results"]), Path(beside["results"]))] == ["clue", "other-set"]
    assert Path(summary["results"]).read_bytes() == first
    assert set(json.loads(Path(beside["results"]).read_text())["tasks"]) == {"tnews"}


def test_the_lineage_table_of_a_corpus_of_many_files_lists_the_first_and_counts_the_rest(tmp_path):
    from flows.lineage import UPSTREAM_LIMIT
    from flows.pipeline import lineage_rows

    inputs = [{"uri": f"/data/raw/part-{i:05d}.jsonl", "content_hash": f"{i:032x}"} for i in range(UPSTREAM_LIMIT + 70)]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    for path in ("tok/spm.model", "tokens/domains.json", "export/model.safetensors", "eval/results.json"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(path.encode())
    rows = lineage_rows({"output": str(tmp_path / "corpus")}, {"tokenizer": str(tmp_path / "tok"),
                        "tokens": str(tmp_path / "tokens")}, {"export": str(tmp_path / "export")},
                        {"results": str(tmp_path / "eval" / "results.json")})
    raw = [row for row in rows if row["stage"] == "raw input"]
    assert [row["artefact"] for row in raw[:UPSTREAM_LIMIT]] == [i["uri"] for i in inputs[:UPSTREAM_LIMIT]]
    assert len(raw) == UPSTREAM_LIMIT + 1 and raw[-1]["artefact"].startswith("… 70 more, listed in ")
    corpus = next(row for row in rows if row["stage"] == "corpus")
    assert corpus["made_from"] == f"{UPSTREAM_LIMIT + 70} raw inputs"
