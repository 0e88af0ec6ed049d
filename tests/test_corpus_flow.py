"""The `corpus` Prefect flow: runs on a real (test-harness) Prefect API, publishes artifacts."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from cleaning.config import CorpusConfig
from tests.realtext import long_documents
from tests.test_reports import decoded_image, png_images

RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


@pytest.fixture()
def raw(tmp_path):
    docs = long_documents(30)
    for shard in range(3):
        path = tmp_path / "raw" / f"part-{shard}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [{"id": f"{shard}-{i}", "text": t, "domain": "science"} for i, t in enumerate(docs[shard * 10:(shard + 1) * 10])]
        records.append({"id": f"{shard}-copy", "text": docs[0], "domain": "science"})
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return tmp_path / "raw"


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(fetch())


def _poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float) -> Any:
    """`fetch()` until `done` holds: task-run states and events reach the API a moment after the run."""
    deadline = time.monotonic() + timeout
    while True:
        found = fetch()
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def task_runs_of(flow_run_id, done: Callable[[list], bool], timeout: float = 60) -> list:
    """The flow run's task runs, read until `done(runs)` holds (or the timeout passes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return _poll(lambda: asyncio.run(fetch()), done, timeout)


def asset_materializations(paths: list[Path], timeout: float = 60) -> dict[str, list[str]]:
    """Asset key (file:// URI of each path) → the keys of the assets its latest materialization was made from."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.lineage import asset_key

    keys = [asset_key(path) for path in paths]

    async def fetch():
        async with get_client() as client:
            page = await client.read_events(EventFilter(
                event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                resource=EventResourceFilter(id=keys)), limit=50)
        made_from: dict[str, list[str]] = {}
        for event in sorted(page.events, key=lambda e: e.occurred):
            made_from[event.resource.id] = sorted(r.id for r in event.related if r.role == "asset")
        return made_from

    return _poll(lambda: asyncio.run(fetch()), lambda found: set(found) == set(keys), timeout)


def test_corpus_flow_runs_shards_as_tasks_and_publishes_counts(prefect_api, raw, tmp_path):
    from flows.corpus import corpus_with_runner

    config = CorpusConfig.model_validate({"rules": RULES_ONLY, "dedup": {"partitions": 2}})
    state = corpus_with_runner(2, None)(inputs=[str(raw)], output=str(tmp_path / "out"), config=config,
                                        workers=2, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["totals"]["input"] == 33
    # docs[0] is in shard 0 and copied once into every shard: three duplicates, the first one survives.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rejected_by_rule"].get("exact_duplicate") == 3

    artifacts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert {"corpus-counts", "corpus-summary"} <= set(artifacts)
    table = artifacts["corpus-counts"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert table[0]["source"] == "science" and table[0]["input"] == 33
    assert "exact_duplicate" in artifacts["corpus-summary"].data
    (distributions,) = png_images(artifacts["corpus-summary"].data)  # the plot renders inside the UI
    decoded_image(distributions)
    assert (tmp_path / "out" / "stats.png").stat().st_size > 5_000

    # The corpus version is an asset made from the raw input shards.
    manifest_path = tmp_path / "out" / "manifest.json"
    made_from = asset_materializations([manifest_path])
    assert made_from[manifest_path.resolve().as_uri()] == sorted(p.resolve().as_uri() for p in raw.glob("*.jsonl"))


def _corpus_asset_recorded(manifest: Path, files: list[Path], text: str) -> str | None:
    """`files` written with `text`, an empty `manifest`, and the corpus asset of the two recorded in a flow run;
    its key."""
    from prefect import flow

    from flows.lineage import record_asset

    for path in (*files, manifest):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}" if path == manifest else text, encoding="utf-8")

    @flow
    def corpus_of_files() -> str | None:
        return record_asset(manifest, files, "corpus version", "corpus", {"input": len(files)})

    return corpus_of_files()


def test_an_asset_made_from_more_files_than_an_event_holds_names_their_directories(prefect_api, tmp_path):
    """Prefect drops a materialisation event with more than 100 related resources: a corpus of 160 files
    recorded each file and lost its lineage. Past 50 files the record names the directories instead."""
    raw = tmp_path / "raw"
    files = [raw / f"site{d}" / f"page-{i:03d}.html" for d in range(4) for i in range(40)]
    manifest = tmp_path / "out" / "manifest.json"
    assert _corpus_asset_recorded(manifest, files, "<html></html>") == manifest.resolve().as_uri()
    made_from = asset_materializations([manifest])
    assert made_from[manifest.resolve().as_uri()] == sorted((raw / f"site{d}").resolve().as_uri() for d in range(4))


def test_an_asset_of_files_with_chinese_names_and_spaces_is_recorded(prefect_api, tmp_path):
    """`Path.as_uri()` percent-encodes a Chinese file name, Prefect refuses `%` (and spaces) in an asset key, and
    the corpus of `新闻 数据.jsonl` got a multi-line validation warning and no asset."""
    from flows.lineage import asset_key

    raw = tmp_path / "原始 语料"
    files = [raw / "新闻 数据.jsonl", raw / "百科#1.jsonl"]
    manifest = tmp_path / "语料" / "manifest.json"
    key = _corpus_asset_recorded(manifest, files, '{"text": "北京是中国的首都。"}\n')
    assert key == f"file://{tmp_path.resolve().as_posix()}/语料/manifest.json"
    assert asset_key(files[0]) == f"file://{tmp_path.resolve().as_posix()}/原始_语料/新闻_数据.jsonl"
    assert asset_materializations([manifest])[key] == sorted(asset_key(p) for p in files)


def test_upstream_paths_are_the_files_up_to_the_limit_then_the_directories_that_hold_them(tmp_path):
    from flows.lineage import upstream_paths

    shallow = [tmp_path / "a" / f"{i}.jsonl" for i in range(3)]
    deep = [tmp_path / "b" / "c" / f"{i}.jsonl" for i in range(3)]
    assert upstream_paths(shallow + deep, limit=6) == sorted(shallow + deep)
    # a level up: a/ and b/c/ hold them
    assert upstream_paths(shallow + deep, limit=5) == [tmp_path / "a", tmp_path / "b" / "c"]
    # two levels up: tmp_path (a/'s parent) holds b/ as well, so it alone remains
    assert upstream_paths(shallow + deep, limit=1) == [tmp_path]
    assert upstream_paths([], limit=1) == []


def test_cli_runs_the_flow(prefect_api, raw, tmp_path, capsys):
    """The closing summary names the inputs that were not read (they were only in the log, among the
    shards' lines, and in manifest.json)."""
    from flows.cli import main

    preset = tmp_path / "preset.yaml"
    preset.write_text(json.dumps({"rules": RULES_ONLY}), encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_bytes(b"PK\x03\x04" + bytes(26))  # a zip archive under a text name
    (other / "scan.pdf").write_bytes(b"%PDF-1.4")
    assert main(["corpus", "build", str(raw / "part-*.jsonl"), str(other), "--output", str(tmp_path / "out"),
                 "--preset", str(preset), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "33 documents in" in err
    summary = err[err.index("33 documents in"):]
    assert "problems:\n    unreadable: " in summary and "notes.txt: a zip archive" in summary
    assert "not read: 1 file(s) of a kind no reader takes (1 .pdf" in summary
    assert (tmp_path / "out" / "data" / "part-00002.parquet").exists()


def test_cli_set_overrides_a_preset_field(prefect_api, tmp_path, capsys):
    """Records whose text is under another name (CLUE's `sentence`, a crawl's `content`): `--set
    reader.text_field=content` instead of a YAML file of one line."""
    from flows.cli import main

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"content": text}, ensure_ascii=False) + "\n" for text in long_documents(6)),
                   encoding="utf-8")
    preset = tmp_path / "preset.yaml"
    preset.write_text(json.dumps({"rules": RULES_ONLY}), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["corpus", "build", str(raw), "--output", str(out), "--preset", str(preset), "--workers", "1",
                 "--set", "reader.text_field=content", "--set", "rules.min_chars=10"]) == 0
    assert "6 documents in, 6 kept" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["reader"]["text_field"] == "content" and manifest["config"]["rules"]["min_chars"] == 10


def test_the_refresh_without_a_config_makes_the_version_a_pipeline_run_makes(prefect_api, fetched_assets, raw,
                                                                             tmp_path):
    """The scheduled `refresh` deployment passes no config: it must build with the `default` preset,
    as `make run` / `pangu pipeline` do, so that over the same inputs it finds their version built."""
    from cleaning.config import load_preset
    from cleaning.versions import plan_refresh
    from flows.corpus import corpus_refresh

    root = str(tmp_path / "corpus")
    expected = plan_refresh([str(raw)], root, load_preset("default")).version
    first = corpus_refresh(inputs=[str(raw)], root=root, workers=1)
    assert first["version"] == expected and first["built"]
    again = corpus_refresh(inputs=[str(raw)], root=root, config=load_preset("default"), workers=1)
    assert again["version"] == expected and not again["built"]


def _dies_the_first_time(marker: str, value: int) -> int:
    """Call 2's worker process dies the first time, as one the out-of-memory killer stops does."""
    if value == 2 and not Path(marker).exists():
        Path(marker).write_text("died", encoding="utf-8")
        os.kill(os.getpid(), signal.SIGKILL)
    return value * 10


def test_a_worker_process_that_dies_is_replaced_and_the_calls_it_took_down_run_again(prefect_api, tmp_path):
    """A dead process breaks a process pool for good: the retries of every call it failed used to fail too,
    and one killed worker stopped the whole build."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from cleaning.stages import Stage
    from flows.corpus import _worker_pool, map_stage

    marker = tmp_path / "died"

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def stage_on_two_worker_processes() -> list[int]:
        with _worker_pool(2):
            return map_stage(Stage("clean", _dies_the_first_time, [(str(marker), v) for v in range(6)],
                                   [f"{v:05d}" for v in range(6)]))

    assert stage_on_two_worker_processes() == [0, 10, 20, 30, 40, 50]
    assert marker.exists()  # a worker did die
