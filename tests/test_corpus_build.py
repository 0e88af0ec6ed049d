"""The staged corpus build end to end (no orchestrator): outputs, accounting, resume, bad input."""
from __future__ import annotations

import gzip
import json
import random
import re

import datasets
import pyarrow.parquet as pq
import pytest

from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.config import CorpusConfig
from tests.realtext import abstracts, long_documents, substitute_chinese

# Rules only: the model-based filters need fetched assets and have tests of their own.
RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def edit(text: str, fraction: float, rng: random.Random) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), int(len(chars) * fraction)):
        chars[i] = rng.choice("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动")
    return "".join(chars)


@pytest.fixture()
def raw(tmp_path):
    """Two sources with planted exact, traditional-character and near copies across shards."""
    rng = random.Random(7)
    docs = long_documents(60)
    news = [{"id": f"n{i}", "text": t, "domain": "news"} for i, t in enumerate(docs[:40])]
    web = [{"id": f"w{i}", "text": f"<div>首页 | 新闻 | 体育 | 财经</div><p>{t}</p>", "source": "web", "domain": "web"}
           for i, t in enumerate(docs[40:])]
    web += [{"id": "w-exact", "text": docs[3], "source": "web", "domain": "web"},
            {"id": "w-near", "text": substitute_chinese(docs[5], 0.03, rng), "source": "web", "domain": "web"},
            {"id": "w-short", "text": "太短的文本。", "source": "web", "domain": "web"}]
    write_jsonl(tmp_path / "raw" / "news" / "part-0.jsonl", news[:20])
    write_jsonl(tmp_path / "raw" / "news" / "part-1.jsonl.gz", news[20:])
    path = write_jsonl(tmp_path / "raw" / "web.jsonl", web)
    with open(path, "ab") as fh:
        fh.write(b"{not json}\n" + b'{"text": "\xff bad utf8"}\n')
    return tmp_path / "raw"


def config(**dedup) -> CorpusConfig:
    return CorpusConfig.model_validate({"rules": RULES_ONLY, "dedup": {"partitions": 4, **dedup}})


def read_rows(folder, pattern="*.parquet"):
    return [row for f in sorted(folder.glob(pattern)) for row in pq.read_table(f).to_pylist()]


def test_build_accounts_for_every_document_and_removes_planted_duplicates(raw, tmp_path):
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw)], str(out), config()))
    kept = read_rows(out / "data")
    rejected = read_rows(out / "rejected")
    totals = manifest["totals"]
    assert totals["input"] == 40 + 20 + 3 + 2
    assert totals["kept"] == len(kept) and totals["rejected"] == len(rejected)
    assert totals["input"] == len(kept) + len(rejected)
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons["w-exact"] == "exact_duplicate" and reasons["w-near"] == "near_duplicate"
    assert reasons["w-short"] in ("min_length", "title_only")
    assert sorted(r["reason"] for r in rejected if r["reason"] in ("corrupt_json", "invalid_utf8")) == \
        ["corrupt_json", "invalid_utf8"]
    dup_of = {r["id"]: r["dup_of"] for r in rejected if r["dup_of"]}
    assert dup_of == {"w-exact": "n3", "w-near": "n5"}  # the survivor is the earlier shard's copy
    web_kept = [r for r in kept if r["source"] == "web"]
    assert web_kept and all("首页" not in r["text"] for r in web_kept)
    for source, entry in manifest["sources"].items():
        assert entry["input"] == entry["kept"] + sum(entry["rejected"].values()), source
    assert {i["status"] for i in manifest["inputs"]} == {"ok"}
    assert all(len(i["content_hash"]) == 32 for i in manifest["inputs"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == len(kept) and set(stats["domains"]) == {"news", "web"}

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert ds.num_rows == len(kept) and set(ds.column_names) == {"id", "text", "domain", "source", "quality", "meta"}


def test_rerun_skips_finished_shards_and_gives_identical_output(raw, tmp_path):
    out = tmp_path / "corpus"
    build = CorpusBuild([str(raw)], str(out), config())
    first = run_local(build)
    before = {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")}
    # A rerun after a completed build reads only markers.
    shards = build.plan()
    assert all(build.clean(s)["skipped"] for s in shards)
    second = run_local(CorpusBuild([str(raw)], str(out), config()))
    assert second["totals"] == first["totals"] and second["version"] == first["version"]
    assert {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")} == before


def test_clean_stage_signs_its_candidates_as_the_dedup_map_stage_would(raw, tmp_path):
    """The clean stage signs the documents it keeps while they are in memory; the files equal those
    made from the shard read back from Parquet, and the dedup-map stage then only finds them."""
    from cleaning import dedup_index

    build = CorpusBuild([str(raw)], str(tmp_path / "corpus"), config())
    shards = build.plan()
    for shard in shards:
        summary = build.clean(shard)
        candidates = pq.read_table(f"{build.clean_dir(shard)}/candidates.parquet")
        entry = dedup_index.minhash_entry(summary["cleaned_hash"], build.config.dedup)
        assert summary["signed_documents"] == candidates.num_rows > 0
        assert dedup_index.signed_documents(build.work, entry) == candidates.num_rows
        reference = tmp_path / "reference" / dedup_index.MINHASH / entry
        dedup_index.sign_shard(str(tmp_path / "reference"), entry, candidates.column("text").to_pylist(),
                               build.config.dedup, candidates.column("source").to_pylist(),
                               candidates.column("quality").to_pylist())
        signed = tmp_path / "corpus" / "_work" / dedup_index.MINHASH / entry
        files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(signed) for p in signed.rglob("*") if p.is_file())
        assert all((signed / f).read_bytes() == (reference / f).read_bytes() for f in files)
        mapped = build.dedup_map(shard, build.run_key(shards))
        assert not mapped["signed"] and mapped["documents"] == candidates.num_rows
    # a rerun of the stage signs nothing again
    assert all(build.clean(shard)["skipped"] for shard in shards)
    manifest = run_local(build)
    assert manifest["work"]["signed_shards"] == 0 and manifest["work"]["cleaned"] == 0


def test_interrupted_shard_leaves_no_partial_output_and_is_redone(raw, tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    build = CorpusBuild([str(raw)], str(out), config())
    shards = build.plan()
    import cleaning.build as build_module

    calls = {"n": 0}
    real = build_module.kept_row

    def dying(doc):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a kill in the middle of writing a shard
        return real(doc)

    monkeypatch.setattr(build_module, "kept_row", dying)
    with pytest.raises(KeyboardInterrupt):
        build.clean(shards[0])
    clean_dir = out / "_work" / "clean"
    assert not list(clean_dir.rglob("summary.json")) and not list(clean_dir.rglob("*.parquet"))
    monkeypatch.setattr(build_module, "kept_row", real)
    manifest = run_local(CorpusBuild([str(raw)], str(out), config()))
    assert manifest["totals"]["input"] == 65


def test_changed_config_or_input_is_not_served_from_stale_work(raw, tmp_path):
    out = tmp_path / "corpus"
    first = run_local(CorpusBuild([str(raw)], str(out), config()))
    stricter = CorpusConfig.model_validate({"rules": {**RULES_ONLY, "min_chars": 10_000}, "dedup": {"partitions": 4}})
    second = run_local(CorpusBuild([str(raw)], str(out), stricter))
    assert second["totals"]["kept"] == 0 < first["totals"]["kept"]
    assert second["rejected_by_rule"]["min_length"] > 0
    # A new input file changes the build version and is picked up.
    write_jsonl(raw / "extra.jsonl", [{"id": "x1", "text": abstracts()[500] * 2, "domain": "news"}])
    third = run_local(CorpusBuild([str(raw)], str(out), config()))
    assert third["version"] != first["version"] and third["totals"]["input"] == 66


def test_bad_inputs_are_reported_and_the_rest_finishes(raw, tmp_path):
    text = abstracts()[0] * 2
    blob = gzip.compress("".join(json.dumps({"text": f"{i}:{text}"}, ensure_ascii=False) + "\n"
                                 for i in range(2000)).encode())
    (raw / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (raw / "empty.jsonl").write_bytes(b"")
    write_jsonl(raw / "huge.jsonl", [{"id": "huge", "text": "大" * (50 * 1024 * 1024 // 3)}])
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw), str(tmp_path / "missing" / "*.jsonl"),
                                      str(tmp_path / "nope.jsonl")], str(out), config()))
    inputs = {i["uri"].rsplit("/", 1)[-1]: i for i in manifest["inputs"]}
    assert inputs["cut.jsonl.gz"]["status"] == "truncated" and "truncated" in inputs["cut.jsonl.gz"]["error"]
    assert 0 < inputs["cut.jsonl.gz"]["documents"] < 2000
    assert inputs["nope.jsonl"]["status"] == "unreadable" and "not found" in inputs["nope.jsonl"]["error"]
    assert inputs["*.jsonl"]["status"] == "unreadable" and "matched no" in inputs["*.jsonl"]["error"]
    assert inputs["empty.jsonl"]["documents"] == 0 and inputs["empty.jsonl"]["status"] == "ok"
    rejected = read_rows(out / "rejected")
    huge = [r for r in rejected if r["id"] == "huge"]
    assert huge and huge[0]["reason"] == "too_long" and "characters" in huge[0]["detail"]
    assert manifest["totals"]["input"] == manifest["totals"]["kept"] + manifest["totals"]["rejected"]


def test_the_work_line_names_an_index_that_could_not_extend_the_previous_one_only():
    """Every rerun of a first build said 'dedup index built afresh (no previous version with an index)'."""
    from cleaning.build import describe_work
    from cleaning.dedup_index import NO_PREVIOUS_INDEX

    work = {"shards": 2, "cleaned": 0, "signed_documents": 0, "signed_shards": 0, "finalized": 0,
            "data_files_from_previous": 0, "dedup": {"previous": None, "not_extended_because": NO_PREVIOUS_INDEX}}
    assert "dedup index" not in describe_work(work)
    work["dedup"]["not_extended_because"] = "its dedup config differs"
    assert describe_work(work).endswith("; dedup index built afresh (its dedup config differs)")


def test_shards_cleaned_by_an_older_reader_are_not_reused(tmp_path, monkeypatch):
    """The clean cache keyed on rules and options only: after the readers changed how they read a file (UTF-16
    without a byte-order mark, an encoding decided after an ASCII opening), a build reused what the older
    reader made of it."""
    import cleaning.build

    build = CorpusBuild([str(tmp_path)], str(tmp_path / "out"), config())
    before = build.clean_fingerprint()
    monkeypatch.setattr(cleaning.build, "READER_REVISION", cleaning.build.READER_REVISION + 1)
    assert build.clean_fingerprint() != before


def test_a_shard_named_by_its_folder_is_not_reused_under_another_folder(tmp_path):
    """The clean cache keyed on content and relative name: `weibo/part-00000.jsonl` given as `weibo/`, then the
    same file as `zhihu/part-00000.jsonl`, kept the domain weibo."""
    records = [{"text": t} for t in long_documents(4)]
    out = tmp_path / "corpus"
    for folder in ("weibo", "zhihu"):
        write_jsonl(tmp_path / folder / "part-00000.jsonl", records)
        run_local(CorpusBuild([str(tmp_path / folder)], str(out), config()))
        assert {row["domain"] for row in read_rows(out / "data")} == {folder}


def test_an_empty_corpus_is_named_among_the_problems(tmp_path):
    """A build of empty files, or one that rejected every document, exited 0 with nothing under `problems:`:
    an empty corpus looked like a finished one."""
    from cleaning.build import input_problems

    (tmp_path / "empty").mkdir()
    for name in ("a.jsonl", "b.txt"):
        (tmp_path / "empty" / name).write_bytes(b"")
    heard: list[str] = []
    manifest = run_local(CorpusBuild([str(tmp_path / "empty")], str(tmp_path / "none"), config()), log=heard.append)
    assert manifest["totals"]["input"] == 0
    assert input_problems(manifest) == ["empty corpus: the inputs hold no document"]
    assert "empty corpus: the inputs hold no document" in heard  # the build's log says it too

    write_jsonl(tmp_path / "short" / "a.jsonl", [{"text": "太短的文本。"}] * 3 + [{"text": "\x00"}])
    manifest = run_local(CorpusBuild([str(tmp_path / "short")], str(tmp_path / "rejected"), config()))
    assert (manifest["totals"]["input"], manifest["totals"]["kept"]) == (4, 0)
    assert input_problems(manifest) == ["empty corpus: all 4 documents were rejected (min_length 3, "
                                        "control_characters 1; manifest.json, rejected_by_rule)"]


def test_per_source_overrides(raw, tmp_path):
    def build(sources, name):
        cfg = CorpusConfig.model_validate({"rules": RULES_ONLY, "dedup": {"exact": False, "fuzzy": False},
                                           "sources": sources})
        return run_local(CorpusBuild([str(raw)], str(tmp_path / name), cfg))

    plain = build({}, "plain")
    strict_web = build({"web*": {"min_chars": 100_000}}, "strict")
    assert plain["sources"]["web"]["kept"] > 0 and strict_web["sources"]["web"]["kept"] == 0
    assert strict_web["sources"]["news"] == plain["sources"]["news"]
    assert strict_web["dedup"] is None


KILL_SCRIPT = """
import sys
from concurrent.futures import ProcessPoolExecutor
from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.config import CorpusConfig
config = CorpusConfig.model_validate_json(sys.argv[3])
with ProcessPoolExecutor(2) as pool:
    run_local(CorpusBuild([sys.argv[1]], sys.argv[2], config), pool)
"""


@pytest.mark.slow
def test_kill_9_mid_build_then_rerun_finishes_without_redoing_done_shards(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    docs = long_documents(400, paragraphs=2)
    for shard in range(12):
        # Each shard repeats real text (with distinct ids) so that it takes a while to clean.
        write_jsonl(tmp_path / "raw" / f"part-{shard:02d}.jsonl",
                    [{"id": f"{shard}-{i}", "text": f"{i}{docs[(shard * 7 + i) % len(docs)]}", "domain": "d"}
                     for i in range(3000)])
    cfg = config(partitions=4)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "raw"), str(out),
                             cfg.model_dump_json()], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("_work/clean/*/summary.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the driver and its worker processes
    proc.wait()
    time.sleep(0.2)
    done = {p: p.stat().st_mtime_ns for p in out.glob("_work/clean/*/summary.json")}
    assert 3 <= len(done) < 12, "the kill should land in the middle of the clean stage"
    assert not (out / "manifest.json").exists()

    killed = run_local(CorpusBuild([str(tmp_path / "raw")], str(out), cfg))
    # Shards finished before the kill were not redone; no temporary file survives the rerun.
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert not [p for p in out.rglob("*.tmp")]
    clean = run_local(CorpusBuild([str(tmp_path / "raw")], str(tmp_path / "clean"), cfg))
    assert killed["totals"] == clean["totals"] and killed["rejected_by_rule"] == clean["rejected_by_rule"]
    assert read_rows(out / "data") == read_rows(tmp_path / "clean" / "data")


def test_a_rerun_removes_the_temporaries_of_killed_writers_whose_work_is_not_redone(raw, tmp_path):
    """A writer killed while signing a shard leaves a temporary in the shard's minhash entry; the
    rerun finds the entry finished (here: by the first build; in a kill, by another shard or version
    with the same content) and does not write there again, so only the driver's sweep removes it."""
    from pathlib import Path

    from cleaning.temporaries import temporary_path
    from tests.test_temporaries import left_by_a_killed_writer

    out = tmp_path / "out"
    cfg = config()
    first = run_local(CorpusBuild([str(raw)], str(out), cfg))
    signatures = next((out / "_work" / "minhash").glob("*/signatures"))
    killed = [left_by_a_killed_writer(signatures / "00000.npy"),
              left_by_a_killed_writer(out / "data" / "part-00001.parquet")]
    writing = Path(temporary_path(str(signatures / "00001.npy")))  # this process is writing it
    for path in killed + [writing]:
        path.write_bytes(b"partial")
    logged: list[str] = []
    again = run_local(CorpusBuild([str(raw)], str(out), cfg), log=logged.append)
    assert again["totals"] == first["totals"] and again["work"]["cleaned"] == 0
    assert not any(p.exists() for p in killed) and writing.exists()
    assert any(line.startswith("removed 2 temporary files that a killed build left") for line in logged)


def test_finalize_spares_a_temporary_that_another_task_is_writing_into_a_shared_entry(raw, tmp_path):
    """Shards with the same cleaned content share their final entries (every all-rejected shard has one), and
    the Prefect flow finalizes shards in parallel threads: a finalize that swept the entry of every temporary
    deleted another task's file mid-write (FileNotFoundError at its rename, hidden by a task retry)."""
    from pathlib import Path

    from cleaning.temporaries import temporary_path
    from tests.test_temporaries import left_by_a_killed_writer

    out = tmp_path / "out"
    cfg = config()
    first = run_local(CorpusBuild([str(raw)], str(out), cfg))
    entry = next((out / "_work" / "dups").glob("*/duplicates.parquet"))
    entry.unlink()  # finalize writes this entry again
    writing = Path(temporary_path(str(entry)))  # a task of this process is writing it now
    killed = left_by_a_killed_writer(entry)
    for path in (writing, killed):
        path.write_bytes(b"partial")
    again = run_local(CorpusBuild([str(raw)], str(out), cfg))
    assert again["totals"] == first["totals"] and entry.is_file()
    assert writing.exists() and not killed.exists()


def test_clean_spares_a_temporary_that_another_build_is_writing(raw, tmp_path):
    """Two builds of the same input at once (a double start, two versions under one root) clean the same shard
    into the same content-keyed directory: a clean that swept the directory of every temporary deleted the other
    build's file mid-write (FileNotFoundError at its rename, hidden by a task retry, or a failed build)."""
    from pathlib import Path

    from cleaning.temporaries import temporary_path
    from tests.test_temporaries import left_by_a_killed_writer

    out = tmp_path / "out"
    cfg = config()
    first = run_local(CorpusBuild([str(raw)], str(out), cfg))
    marker = next((out / "_work" / "clean").glob("*/summary.json"))
    marker.unlink()  # this shard is cleaned again
    candidates = marker.parent / "candidates.parquet"
    writing = Path(temporary_path(str(candidates)))  # the other build (this process here) is writing it now
    killed = left_by_a_killed_writer(candidates)
    for path in (writing, killed):
        path.write_bytes(b"partial")
    again = run_local(CorpusBuild([str(raw)], str(out), cfg))
    assert again["totals"] == first["totals"] and marker.is_file()
    assert writing.exists() and not killed.exists()


def test_build_reads_and_writes_fsspec_uris():
    import fsspec

    docs = long_documents(12)
    fs = fsspec.filesystem("memory")
    for shard in range(2):
        with fs.open(f"/raw-bucket/part-{shard}.jsonl", "w", encoding="utf-8") as fh:
            for i, text in enumerate(docs[shard * 6:(shard + 1) * 6] + [docs[0]]):
                fh.write(json.dumps({"id": f"{shard}-{i}", "text": text, "domain": "d"}, ensure_ascii=False) + "\n")
    manifest = run_local(CorpusBuild(["memory://raw-bucket/*.jsonl"], "memory://corpus-bucket/v1", config()))
    assert manifest["totals"]["input"] == 14
    assert manifest["rejected_by_rule"]["exact_duplicate"] == 2
    assert all(i["uri"].startswith("memory://") for i in manifest["inputs"])
    with fs.open("/corpus-bucket/v1/data/part-00000.parquet", "rb") as fh:
        kept = pq.read_table(fh).to_pylist()
    assert kept and kept[0]["id"] == "0-0"
    assert fs.exists("/corpus-bucket/v1/manifest.json") and fs.exists("/corpus-bucket/v1/stats.json")


def test_refresh_builds_a_new_version_only_for_new_or_changed_inputs(raw, tmp_path):
    from cleaning.versions import latest_version, refresh

    root = str(tmp_path / "corpora")
    first = refresh([str(raw)], root, config())
    assert first["built"] and latest_version(root) == first["version"]
    assert len(first["diff"]["new"]) == 3 and first["previous"] is None

    latest = (tmp_path / "corpora" / "LATEST").read_bytes()
    again = refresh([str(raw)], root, config())
    assert not again["built"] and again["version"] == first["version"]
    assert len(again["diff"]["unchanged"]) == 3
    # LATEST stays as it was: it named itself as its own previous version after a refresh that found it current
    assert (tmp_path / "corpora" / "LATEST").read_bytes() == latest

    write_jsonl(raw / "news" / "part-2.jsonl", [{"id": "late", "text": abstracts()[700] * 2, "domain": "news"}])
    cleaned = {p: p.stat().st_mtime_ns for p in (tmp_path / "corpora" / "_work" / "clean").rglob("summary.json")}
    third = refresh([str(raw)], root, config())
    assert third["built"] and third["version"] != first["version"] and third["previous"] == first["version"]
    assert [u.rsplit("/", 1)[-1] for u in third["diff"]["new"]] == ["part-2.jsonl"]
    assert third["totals"]["input"] == first["totals"]["input"] + 1
    # Only the new shard was cleaned; the old version stays readable beside the new one.
    assert {p: p.stat().st_mtime_ns for p in cleaned} == cleaned
    assert len(list((tmp_path / "corpora" / "_work" / "clean").rglob("summary.json"))) == len(cleaned) + 1
    assert (tmp_path / "corpora" / first["version"] / "manifest.json").exists()
    assert latest_version(root) == third["version"]
    assert json.loads((tmp_path / "corpora" / "LATEST").read_text()) == {"version": third["version"],
                                                                         "previous": first["version"]}
    refresh([str(raw)], root, config())
    assert json.loads((tmp_path / "corpora" / "LATEST").read_text())["previous"] == first["version"]


@pytest.mark.parametrize("given", [["nowhere.jsonl"], ["empty"], ["empty/*.jsonl"], ["nowhere", "empty", "x/*.txt", "y"]])
def test_a_build_with_no_input_found_refuses_before_writing_anything(tmp_path, given):
    (tmp_path / "empty").mkdir()
    inputs = [str(tmp_path / g) for g in given]
    out = tmp_path / "out" / "corpus"
    named = f" in 4 inputs: {', '.join(inputs[:3])}, ... (1 more)" if len(inputs) > 1 else f": {inputs[0]}"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no input found{named} (a file, a directory of ") +
                       r"\.jsonl/.*\.html/.*, plain or \.gz/\.zst/.*\.bz2/\.xz, or \.parquet/\.arrow files, or a glob\)$"):
        run_local(CorpusBuild(inputs, str(out), config()))
    assert not (tmp_path / "out").exists()
    # The refresh (`pangu pipeline`, the scheduled flow) plans with the same listing: refused before ROOT is made.
    from cleaning.versions import refresh

    with pytest.raises(FileNotFoundError, match="^no input found"):
        refresh(inputs, str(tmp_path / "out" / "corpora"), config())
    assert not (tmp_path / "out").exists()


def test_files_no_reader_takes_are_refused_saying_why_not_as_missing(tmp_path):
    """A .zip or .pdf named on its own was read as an input, failed with "unreadable: unreadable: ShardReadError:
    ... unknown input format", and the build published an empty corpus (exit 0); README promises "zip and 7z
    archives are refused with one message: unpack them"."""
    import zipfile

    write_jsonl(tmp_path / "a.jsonl", [{"text": "你好"}])
    (tmp_path / "d").mkdir()
    with zipfile.ZipFile(tmp_path / "d" / "arch.zip", "w") as archive:
        archive.write(tmp_path / "a.jsonl", "a.jsonl")
    (tmp_path / "d" / "doc.pdf").write_bytes(b"%PDF-1.4\n")
    out = tmp_path / "out"
    for given, expected in (
            (["d/arch.zip"], "^no input to read: .*/d/arch.zip: a zip archive, which is not read: unpack it and give "
                             "its files"),
            (["d/doc.pdf"], r"^no input to read: .*/d/doc.pdf: not an input format \(expected \.jsonl"),
            (["d"], r"^no input to read: directory holds no supported input files: .*/d: 2 file\(s\) of a kind no "
                    r"reader takes \(1 \.pdf, 1 \.zip; .*\); archives are not read: unpack them")):
        with pytest.raises(FileNotFoundError, match=expected):
            run_local(CorpusBuild([str(tmp_path / g) for g in given], str(out), config()))
        assert not out.exists()
    # beside a file to read, the archive is an input problem of the build, named
    manifest = run_local(CorpusBuild([str(tmp_path / "a.jsonl"), str(tmp_path / "d" / "arch.zip")], str(out), config()))
    errors = [i["error"] for i in manifest["inputs"] if i.get("error")]
    assert len(errors) == 1 and errors[0].endswith("d/arch.zip: a zip archive, which is not read: unpack it and give "
                                                   "its files (JSON lines and text may stay compressed, as gzip, bzip2, "
                                                   "xz or zstd)"), errors


@pytest.mark.parametrize("missing", ["word list", "language-ID model", "a source's word list"])
def test_a_missing_asset_refuses_the_build_before_writing_anything(tmp_path, missing):
    """The language-ID model was looked for only when a document first needed it, in a shard's worker; any
    missing asset surfaced after the clean stage and left OUTPUT/_work behind."""
    gone = str(tmp_path / "assets" / "gone.bin")
    overrides = {"word list": {"rules": {**RULES_ONLY, "ad_word_lists": [gone]}},
                 "language-ID model": {"rules": {**RULES_ONLY, "langid": True, "langid_model": gone}},
                 "a source's word list": {"rules": RULES_ONLY, "sources": {"forum*": {"sensitive_word_lists": [gone]}}}}
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "text": abstracts()[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "corpus"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(gone)} not found at {re.escape(gone)}; run `pangu data"):
        run_local(CorpusBuild([str(raw)], str(out), CorpusConfig.model_validate(overrides[missing])))
    assert not (tmp_path / "out").exists()


def test_an_output_below_a_file_refuses_the_build_before_anything_is_written(tmp_path):
    """It failed with `[Errno 20] Not a directory: '.../_work'` once the flow was running."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "text": abstracts()[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match=f"^cannot write the corpus to {re.escape(str(raw))}/corpus: "
                                                 f"{re.escape(str(raw))} is a file$"):
        run_local(CorpusBuild([str(raw)], str(raw / "corpus"), config()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.jsonl"]


def test_a_missing_asset_error_keeps_its_message_across_processes(tmp_path):
    """Shards are cleaned in worker processes: the error is pickled back, and used to nest its message."""
    import pickle

    from cleaning.assets import MissingAssetError

    error = MissingAssetError("asset:wordlists/ads.txt")
    again = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(error))))
    assert str(again) == str(error) and again.ref == error.ref and isinstance(again, FileNotFoundError)


def test_one_unreadable_input_is_still_a_rejected_input_not_a_refusal(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "noise.parquet").write_bytes(random.Random(3).randbytes(4096))
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(tmp_path / "raw" / "noise.parquet"), str(tmp_path / "nowhere.jsonl")],
                                     str(out), config()))
    inputs = {i["uri"].rsplit("/", 1)[-1]: i for i in manifest["inputs"]}
    assert inputs["noise.parquet"]["status"] != "ok" and inputs["noise.parquet"]["error"]
    assert inputs["nowhere.jsonl"]["status"] == "unreadable" and "not found" in inputs["nowhere.jsonl"]["error"]
    assert manifest["totals"]["kept"] == 0 and (out / "manifest.json").exists()


def test_files_no_reader_takes_are_reported_not_silently_skipped(tmp_path):
    """A directory of inputs with a PDF and an image beside the text: they were left out without a word."""
    from flows.reports import corpus_markdown

    raw = tmp_path / "raw"
    (raw / "more").mkdir(parents=True)
    (raw / "a.jsonl").write_text(json.dumps({"id": "a", "text": abstracts()[0]}, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    for name in ("manual.pdf", "more/figure.PNG", "more/README", ".hidden.pdf"):
        (raw / name).write_bytes(b"%PDF-1.4 not text")
    warnings = []
    build = CorpusBuild([str(raw)], str(tmp_path / "out"), config())
    from cleaning.stages import run_build

    manifest = run_build(build, lambda stage: [stage.fn(*args) for args in stage.calls], warn=warnings.append)
    found = manifest["unsupported_files"]
    assert found["files"] == 3 and found["by_suffix"] == {"(none)": 1, ".pdf": 1, ".png": 1}
    assert [uri.rsplit("/", 1)[-1] for uri in found["first"]] == ["manual.pdf", "README", "figure.PNG"]
    assert [w for w in warnings if "not read: 3 file(s) of a kind no reader takes" in w
            and "1 (none), 1 .pdf, 1 .png" in w]
    assert manifest["totals"]["input"] == 1
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert "Not read: 3 file(s) of a kind no reader takes" in corpus_markdown(manifest, stats, "out")
