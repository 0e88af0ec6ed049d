"""The `tokenizer` flow and CLI: train then pack a real corpus version, versioned and cached."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.config import CorpusConfig
from tests.realtext import abstracts, app_descriptions
from tests.test_corpus_flow import asset_materializations, task_runs_of
from tests.test_reports import decoded_image, png_images

RAW_SHARDS = 3

RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    records = [{"id": f"s{i}", "text": t, "domain": "science"} for i, t in enumerate(abstracts()[:600])]
    records += [{"id": f"a{i}", "text": t, "domain": "web"} for i, t in enumerate(app_descriptions()[:400])]
    for shard in range(RAW_SHARDS):  # one corpus shard per raw shard, both domains in each
        (raw / f"part-{shard}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[shard::RAW_SHARDS]), encoding="utf-8")
    out = tmp_path_factory.mktemp("corpus")
    run_local(CorpusBuild([str(raw)], str(out), CorpusConfig.model_validate({"rules": RULES_ONLY})))
    return out


def test_tokenizer_flow_trains_packs_and_reuses(prefect_api, corpus, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.tokenization import tokenizer_flow

    state = tokenizer_flow(corpus=str(corpus), output=str(tmp_path), vocab_size=3000,
                           input_sentence_size=20_000, workers=1, return_state=True)
    result = state.result()
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert result["version"].startswith(manifest["version"])
    domains = json.loads((tmp_path / "tokens" / result["version"] / "domains.json").read_text())
    assert set(domains["domains"]) == {"science", "web"} and domains["tokens"] == result["tokens_total"] > 0
    assert (tmp_path / "tokenizer" / result["version"] / "tokenizer.json").exists()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    found = {a.key: a for a in asyncio.run(artifacts())}
    table = found["tokens-per-domain"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["domain"] for row in table} == {"science", "web"}
    assert all(0 <= row["unk_rate"] < 0.05 for row in table)
    assert "Special ids" in found["tokenizer-summary"].data
    (tokens_plot,) = png_images(found["tokenizer-summary"].data)
    decoded_image(tokens_plot)

    # Packing is one task run per corpus shard, between planning the domain ids and summarising.
    shards = sorted(p.stem for p in (corpus / "data").glob("part-*.parquet"))
    assert len(shards) == RAW_SHARDS
    def packed(runs):
        return [r for r in runs if r.name.startswith("pack-") and r.state.is_completed()]

    runs = task_runs_of(state.state_details.flow_run_id, lambda runs: len(packed(runs)) == RAW_SHARDS)
    assert sorted(r.name for r in runs if r.name.startswith("pack-")) == [f"pack-{stem}" for stem in shards]
    assert len(packed(runs)) == RAW_SHARDS
    names = {r.name.rsplit("-", 1)[0] for r in runs}  # a task's default run name ends in a random suffix
    assert {"plan-domain-ids", "summarize-tokens"} <= names
    assert domains["shards"] == shards

    # The tokenizer is an asset made from the corpus version; the token shards from both.
    spm_model = tmp_path / "tokenizer" / result["version"] / "spm.model"
    domains_json = tmp_path / "tokens" / result["version"] / "domains.json"
    made_from = asset_materializations([spm_model, domains_json])
    assert made_from[spm_model.resolve().as_uri()] == [(corpus / "manifest.json").resolve().as_uri()]
    assert made_from[domains_json.resolve().as_uri()] == sorted(
        [(corpus / "manifest.json").resolve().as_uri(), spm_model.resolve().as_uri()])

    # Same corpus and options: the trained model is reused and no shard is packed again. Given as file:// URIs
    # they are the same places (the output used to become a directory named "file:").
    bins = {p: p.stat().st_mtime_ns for p in (tmp_path / "tokens").rglob("*.bin")}
    again = tokenizer_flow(corpus=corpus.as_uri(), output=tmp_path.as_uri(), vocab_size=3000,
                           input_sentence_size=20_000, workers=1)
    assert again == result
    assert {p: p.stat().st_mtime_ns for p in bins} == bins


def test_cli_train_and_pack(corpus, tmp_path, capsys):
    from flows.cli import main

    assert main(["tokenizer", "train", "--corpus", str(corpus), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "3000", "--input-sentence-size", "20000", "--workers", "1"]) == 0
    assert main(["tokenizer", "pack", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "tokens"), "--seq-len", "128", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "rows of 129" in err and "science" in err
    assert list((tmp_path / "tokens").glob("part-*.bin"))
    # each phase and each shard as it ends (a terabyte's pack said nothing for hours)
    shards = sorted(p.stem for p in (tmp_path / "tokens").glob("part-*.bin"))
    assert "[pangu] tokenizer: sentencepiece trained in" in err
    for number, stem in enumerate(shards, 1):
        assert re.search(rf"\[pangu\] pack: shard {number}/{len(shards)} {stem}: [\d,]+ documents, [\d,]+ tokens, "
                         r"packed in \d+ s", err), err
    assert main(["tokenizer", "pack", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "tokens"), "--workers", "1"]) == 0
    assert re.search(rf"shard 1/{len(shards)} {shards[0]}: [\d,]+ documents, [\d,]+ tokens, already packed",
                     capsys.readouterr().err)
    # A missing corpus is a user error: one line and exit status 2, no traceback.
    assert main(["tokenizer", "pack", "--corpus", str(tmp_path / "empty"), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "t2"), "--workers", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
