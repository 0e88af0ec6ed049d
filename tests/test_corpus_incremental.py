"""A refresh that is incremental end to end (issue #13 §4): one new input file is cleaned, signed and
looked up in the previous version's dedup index; unchanged shards' files are hard links to the
previous version's; the result equals a build from scratch; `pangu corpus gc` frees what no version
uses; a kill -9 anywhere in a refresh or a gc is finished by rerunning it."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cleaning import dedup, dedup_index
from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.dedup_config import DedupConfig
from cleaning.minhash import MinHasher
from cleaning.versions import collect_garbage, latest_version, refresh
from tests.realtext import long_documents, substitute_chinese
from tests.test_corpus_build import config, edit, read_rows, write_jsonl

OLD_FILES = 5
DOCS_PER_FILE = 10


def _documents() -> list[str]:
    """Real documents that every rule keeps (mostly Chinese characters), so counts are exact."""
    def chinese(text: str) -> float:
        return sum("\u4e00" <= ch <= "\u9fff" for ch in text) / len(text)

    return [t for t in long_documents(150) if chinese(t) > 0.7][:OLD_FILES * DOCS_PER_FILE + 20]


def _old_files(raw: Path, docs: list[str]) -> None:
    """Five inputs of ten documents; part-3 holds a near copy of part-0's first document, so the
    first version already has a cluster for a refresh to carry over."""
    rng = random.Random(11)
    for f in range(OLD_FILES):
        records = [{"id": f"p{f}-{i}", "text": docs[f * DOCS_PER_FILE + i], "domain": "news"}
                   for i in range(DOCS_PER_FILE)]
        if f == 3:
            records.append({"id": "p3-near", "text": substitute_chinese(docs[0], 0.03, rng), "domain": "news"})
        write_jsonl(raw / f"part-{f}.jsonl", records)


def _new_file(raw: Path, docs: list[str], name: str) -> Path:
    """Eight new documents, a near copy of p1-2 and an exact copy (other punctuation) of p2-5."""
    rng = random.Random(5)
    base = OLD_FILES * DOCS_PER_FILE
    records = [{"id": f"new-{i}", "text": docs[base + i], "domain": "news"} for i in range(8)]
    records.append({"id": "new-near", "text": substitute_chinese(docs[12], 0.03, rng), "domain": "news"})
    records.append({"id": "new-exact", "text": docs[25].replace("，", ", "), "domain": "news"})
    return write_jsonl(raw / name, records)


@pytest.fixture()
def first(tmp_path):
    """The first version of the five old inputs, under a versioned root."""
    docs = _documents()
    raw = tmp_path / "raw"
    _old_files(raw, docs)
    root = tmp_path / "corpora"
    summary = refresh([str(raw)], str(root), config())
    return {"docs": docs, "raw": raw, "root": root, "v1": summary["version"]}


def _manifest(root: Path, version: str) -> dict:
    return json.loads((root / version / "manifest.json").read_text())


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def _survivors(out: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Kept ids, and for each duplicate its (reason, dup_of)."""
    kept = sorted(r["id"] for r in read_rows(out / "data"))
    dups = {r["id"]: (r["reason"], r["dup_of"]) for r in read_rows(out / "rejected", "dup-*.parquet")}
    return kept, dups


def _disk_usage(root: Path) -> int:
    """Bytes the files under ROOT hold: each inode once, however many names it has."""
    inodes = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(inodes.values())


# -- work proportional to the new file ----------------------------------------------------------
def test_a_refresh_with_one_new_file_cleans_and_signs_only_that_file(first, monkeypatch):
    root, raw = first["root"], first["raw"]
    v1 = _manifest(root, first["v1"])
    assert v1["work"]["cleaned"] == OLD_FILES and v1["work"]["signed_documents"] == OLD_FILES * DOCS_PER_FILE + 1

    signed = []
    real = MinHasher.signatures_from_code_points

    def counting(self, cps, lengths):
        signed.append(len(lengths))
        return real(self, cps, lengths)

    monkeypatch.setattr(MinHasher, "signatures_from_code_points", counting)
    clean_markers = {p: p.stat().st_mtime_ns for p in (root / "_work" / "clean").rglob("summary.json")}
    _new_file(raw, first["docs"], "part-9.jsonl")
    second = refresh([str(raw)], str(root), config())
    assert second["built"] and second["previous"] == first["v1"]

    work = _manifest(root, second["version"])["work"]
    assert work["shards"] == OLD_FILES + 1
    assert work["cleaned"] == 1 and work["signed_shards"] == 1
    assert work["signed_documents"] == sum(signed) == 10  # the new file's documents, and only those
    assert work["finalized"] == 1 and work["data_files_from_previous"] == OLD_FILES
    assert work["dedup"]["previous"] == first["v1"] and work["dedup"]["not_extended_because"] is None
    # the old shards' cleaned outputs were not touched
    assert {p: p.stat().st_mtime_ns for p in clean_markers} == clean_markers
    assert len(list((root / "_work" / "clean").rglob("summary.json"))) == OLD_FILES + 1


def test_unchanged_shards_are_hard_links_to_the_previous_versions_files(first):
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], "part-9.jsonl")
    second = refresh([str(raw)], str(root), config())
    v1, v2 = root / first["v1"], root / second["version"]
    for index in range(OLD_FILES):
        for name in (f"data/part-{index:05d}.parquet", f"rejected/part-{index:05d}.parquet",
                     f"rejected/dup-{index:05d}.parquet"):
            assert _inode(v1 / name) == _inode(v2 / name), name
    assert _manifest(root, second["version"])["work"]["published"]["copied"] == 0
    # the manifest says which cache file each published file is: the same for unchanged shards
    files1, files2 = (_manifest(root, v)["cache"]["files"] for v in (first["v1"], second["version"]))
    assert all(files2[path] == cache for path, cache in files1.items())
    # consumers that glob data/part-*.parquet read the new version as a whole
    from tokenizer.corpus import count_documents, list_shards

    shards = list_shards(str(v2))
    assert len(shards) == OLD_FILES + 1
    assert sum(count_documents(s) for s in shards) == _manifest(root, second["version"])["totals"]["kept"]


def test_a_near_duplicate_of_an_old_document_is_rejected_with_the_old_id(first):
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], "part-9.jsonl")
    second = refresh([str(raw)], str(root), config())
    _, dups = _survivors(root / second["version"])
    assert dups["new-near"] == ("near_duplicate", "p1-2")
    assert dups["new-exact"] == ("exact_duplicate", "p2-5")
    assert dups["p3-near"] == ("near_duplicate", "p0-0")  # the first version's cluster, carried over
    detail = {r["id"]: r["detail"] for r in read_rows(root / second["version"] / "rejected", "dup-*.parquet")}
    assert detail["new-near"] == "copy of part-1.jsonl row 2"


@pytest.mark.parametrize("name", ["part-9.jsonl", "a-new.jsonl"])
def test_a_refresh_equals_a_build_from_scratch(first, tmp_path, name):
    """`a-new.jsonl` sorts before every old input: by the survivor rule (the copies rank equal, so
    the first document in input order stays) its copies of p1-2 and p2-5 survive and those two become the duplicates, so
    the two old shards that change are rewritten and the other old shards stay links."""
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], name)
    second = refresh([str(raw)], str(root), config())
    scratch = run_local(CorpusBuild([str(raw)], str(tmp_path / "scratch"), config()))
    incremental = _manifest(root, second["version"])
    assert scratch["work"]["signed_documents"] == OLD_FILES * DOCS_PER_FILE + 11
    assert scratch["work"]["dedup"]["previous"] is None

    assert _survivors(root / second["version"]) == _survivors(tmp_path / "scratch")
    for key in ("totals", "rejected_by_rule", "sources"):
        assert incremental[key] == scratch[key], key
    without_work = {k: v for k, v in incremental["dedup"].items() if k != "pairs_checked"}
    assert without_work == {k: v for k, v in scratch["dedup"].items() if k != "pairs_checked"}
    assert json.loads((root / second["version"] / "stats.json").read_text()) == \
        json.loads((tmp_path / "scratch" / "stats.json").read_text())

    _, dups = _survivors(root / second["version"])
    v1, v2 = root / first["v1"], root / second["version"]
    if name == "a-new.jsonl":
        assert dups["p1-2"] == ("near_duplicate", "new-near") and "new-near" not in dups
        assert dups["p2-5"] == ("exact_duplicate", "new-exact") and "new-exact" not in dups
        work = incremental["work"]
        assert work["finalized"] == 3 and work["data_files_from_previous"] == OLD_FILES - 2
        # old shard i is now shard i + 1; the data of part-1 and part-2 changed, the others are the same inodes
        for index in range(OLD_FILES):
            same = _inode(v1 / "data" / f"part-{index:05d}.parquet") == \
                _inode(v2 / "data" / f"part-{index + 1:05d}.parquet")
            assert same == (index not in (1, 2)), index


# -- names that stay ------------------------------------------------------------------------------
def _kept_ids(out: Path) -> list[str]:
    return sorted(r["id"] for r in read_rows(out / "data"))


def test_generated_ids_and_cleaned_shards_stay_when_an_input_directory_comes_and_goes(tmp_path):
    """The input root is the common folder of the INPUT arguments, so adding `2020/` beside `2019/` moves it
    from `raw/2019` to `raw`. Files a version already held keep their names, hence their generated ids
    (`NAME:LINE`) and their cleaned shards; only the new file is cleaned, and dropping `2019/` again
    cleans nothing."""
    docs = _documents()
    y2019, y2020 = tmp_path / "raw" / "2019", tmp_path / "raw" / "2020"
    for f in range(3):  # records without an id of their own: theirs is made from the file's name
        write_jsonl(y2019 / f"part-{f}.jsonl", [{"text": docs[f * 10 + i], "domain": "news"} for i in range(10)])
    write_jsonl(y2020 / "part-0.jsonl", [{"text": docs[30 + i], "domain": "news"} for i in range(10)])
    root = tmp_path / "corpora"

    v1 = refresh([str(y2019)], str(root), config())["version"]
    ids1 = _kept_ids(root / v1)
    assert len(ids1) == 30 and "part-0.jsonl:1" in ids1

    v2 = refresh([str(y2019), str(y2020)], str(root), config())["version"]
    manifest = _manifest(root, v2)
    assert manifest["work"]["cleaned"] == 1
    names = {Path(entry["uri"].removeprefix("file://")): entry["name"] for entry in manifest["inputs"]}
    assert names[y2019 / "part-1.jsonl"] == "part-1.jsonl" and names[y2020 / "part-0.jsonl"] == "2020/part-0.jsonl"
    ids2 = _kept_ids(root / v2)
    assert set(ids1) < set(ids2) and len(ids2) == 40
    assert sorted(set(ids2) - set(ids1)) == sorted(f"2020/part-0.jsonl:{line}" for line in range(1, 11))

    v3 = refresh([str(y2020)], str(root), config())["version"]
    assert _manifest(root, v3)["work"]["cleaned"] == 0
    assert _kept_ids(root / v3) == sorted(set(ids2) - set(ids1))
    # the plan names the files as the build does: a version's directory is the key of what was built in it
    assert [_manifest(root, v)["version"] for v in (v1, v2, v3)] == [v1, v2, v3]
    assert refresh([str(y2020)], str(root), config())["built"] is False


# -- the index on its own -----------------------------------------------------------------------
@pytest.mark.parametrize("ranked", [False, True], ids=["no-sources", "priorities"])
def test_the_index_extended_version_by_version_equals_dedup_from_scratch(abstracts, tmp_path, ranked):
    """Inputs added, removed, re-added and inserted before others: at every version the extended
    index finds the same duplicates, survivors and counts as dedup.map/reduce/cluster from scratch.
    `priorities`: documents of three sources, some with a quality score, ranked by source priority
    first; then a seventh version of the same shards with other priorities extends the sixth (same
    signatures and pairs) and re-ranks every cluster."""
    config = DedupConfig(partitions=3, source_priority={"baike": 2, "news": 1} if ranked else {})
    rng = random.Random(3)
    texts = []
    for i, text in enumerate(abstracts[:150]):
        texts.append(text)
        if i % 3 == 0:
            texts.append(edit(text, 0.02, rng))
        if i % 5 == 0:
            texts.append(text)
        if i % 7 == 0:  # a chain: a copy of the edited copy
            texts.append(edit(texts[-1], 0.02, rng))
    rng.shuffle(texts)
    sources = [rng.choice(["web", "baike", "news"]) for _ in texts] if ranked else None
    qualities = [rng.choice([None, 0.25, 0.75]) for _ in texts] if ranked else None  # ties on purpose
    pool = {f"s{k:02d}": {"texts": texts[k::10], "sources": sources and sources[k::10],
                          "qualities": qualities and qualities[k::10]} for k in range(10)}
    work = str(tmp_path / "work")
    sequence = [["s00", "s02", "s04", "s06"], ["s00", "s02", "s03", "s04", "s06"],
                ["s01", "s02", "s03", "s04", "s06"], ["s00", "s01", "s02", "s03", "s06", "s09"],
                ["s00", "s01", "s02", "s03", "s04", "s05", "s06", "s07", "s09"], ["s05", "s07", "s08"]]
    configs = [config] * len(sequence)
    if ranked:
        sequence.append(sequence[-1])
        configs.append(config.model_copy(update={"source_priority": {"web": 1}}))
    previous, later_survivors = None, 0
    for v, (names, config) in enumerate(zip(sequence, configs)):
        scratch = str(tmp_path / f"scratch-{v}")
        for i, name in enumerate(names):
            dedup.map_shard(scratch, i, config=config, **pool[name])
        for p in range(config.partitions):
            dedup.reduce_partition(scratch, p, config)
        expected = dedup.cluster(scratch, len(names), config)

        shards = []
        for name in names:
            dedup_index.sign_shard(work, f"{name}-entry", config=config, **pool[name])
            shards.append({"name": name, "minhash": f"{name}-entry", "documents": len(pool[name]["texts"])})
        plan = dedup_index.write_plan(work, f"v{v}", shards, previous, config)
        assert plan["previous"] == previous, plan["reason"]
        for p in range(config.partitions):
            dedup_index.reduce_partition(work, f"v{v}", p, config)
        done = dedup_index.cluster(work, f"v{v}", config)
        state = dedup_index.version_dir(work, f"v{v}")
        for i in range(len(names)):
            found = dedup.load_duplicates(state, i)
            assert found == dedup.load_duplicates(scratch, i), (v, i)
            later_survivors += sum((s, r) > (i, row) for row, (s, r, _) in found.items())
        assert {**done["summary"], "pairs_checked": 0} == {**expected.to_json(), "pairs_checked": 0}
        assert done["summary"]["exact_duplicates"] and done["summary"]["near_duplicates"]
        previous = f"v{v}"
    # a partition keeps few segments: the two newest merge while they are of a size
    assert all(len(names) <= 3 for names in done["segments"])
    if ranked:  # the re-ranked version looked nothing up and placed every clustered document again
        summary = done["summary"]
        assert later_survivors and done["work"]["touched_keys"] == 0
        assert done["work"]["documents_reassigned"] >= \
            summary["exact_duplicates"] + summary["near_duplicates"] + summary["clusters"]


# -- gc -----------------------------------------------------------------------------------------
def test_gc_removes_an_unreferenced_version_and_its_files_and_keeps_the_referenced_ones(first, capsys):
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], "a-new.jsonl")  # rewrites part-1 and part-2: their old data files are v1's alone
    second = refresh([str(raw)], str(root), config())
    v1, v2 = root / first["v1"], root / second["version"]
    only_v1 = v1 / "data" / "part-00001.parquet"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    from flows.cli import main

    assert main(["corpus", "gc", str(root), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"would remove version {first['v1']}" in printed and f"kept {second['version']} (LATEST)" in printed
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # a dry run removes nothing

    (root / "notes").mkdir()  # a folder of the user's (was "would remove version notes")
    (root / "notes" / "todo.txt").write_text("a user's\n")
    assert "notes" not in collect_garbage(str(root), dry_run=True).removed_versions
    shutil.rmtree(root / "notes")
    (v1 / "PINNED").write_text("kept for the paper\n")
    pinned = collect_garbage(str(root))
    assert pinned.removed_versions == [] and pinned.kept_versions[first["v1"]] == "pinned"
    assert only_v1.exists()
    (v1 / "PINNED").unlink()

    usage, only_v1_size = _disk_usage(root), only_v1.stat().st_size
    dry = collect_garbage(str(root), dry_run=True)
    garbage = collect_garbage(str(root))
    assert garbage.removed_versions == [first["v1"]] and dry.bytes_freed == garbage.bytes_freed
    assert not v1.exists() and v2.exists()
    # what it says it freed is what the disk holds less; hard links shared with v2 freed nothing
    assert garbage.bytes_freed == usage - _disk_usage(root)
    assert only_v1_size <= garbage.bytes_freed < usage - _disk_usage(v2)
    assert f"index/versions/{first['v1']}" in garbage.removed_entries
    assert any(e.startswith("kept/") for e in garbage.removed_entries)  # v1's part-1 data, used by no one now
    # everything v2 uses is there, and v2 reads whole
    for entry in _manifest(root, second["version"])["cache"]["entries"]:
        assert (root / "_work" / entry).exists(), entry
    kept = read_rows(v2 / "data")
    assert len(kept) == _manifest(root, second["version"])["totals"]["kept"]
    assert collect_garbage(str(root)).files == 0  # nothing left to collect

    # the next refresh still extends the index the latest version has
    write_jsonl(raw / "part-7.jsonl", [{"id": "late", "text": first["docs"][-1], "domain": "news"}])
    third = refresh([str(raw)], str(root), config())
    work = _manifest(root, third["version"])["work"]
    assert work["dedup"]["previous"] == second["version"] and work["signed_documents"] == 1
    assert latest_version(str(root)) == third["version"]


# -- kill -9 ------------------------------------------------------------------------------------
KILL_AT = """
import os, signal, sys, importlib
from cleaning.config import CorpusConfig
module_name, attribute, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module_name)
if "." in attribute:  # a method: Class.method
    cls_name, attribute = attribute.split(".")
    owner = getattr(owner, cls_name)
real = getattr(owner, attribute)
calls = []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, attribute, dying)
if sys.argv[4] == "refresh":
    from cleaning.versions import refresh
    refresh([sys.argv[5]], sys.argv[6], CorpusConfig.model_validate_json(sys.argv[7]))
else:
    from cleaning.versions import collect_garbage
    collect_garbage(sys.argv[5])
"""


def _killed(where: str, after: int, *command: str) -> None:
    """Runs a refresh or a gc in a new process that kill -9s itself on call `after + 1` of `where`
    (module:attribute), in its own session like the kill test of tests/test_corpus_build.py."""
    module_name, attribute = where.split(":")
    proc = subprocess.run([sys.executable, "-c", KILL_AT, module_name, attribute, str(after), *command],
                          cwd=Path(__file__).resolve().parents[1], start_new_session=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the process was to be killed at {where}"


@pytest.mark.parametrize("where, after, redone", [
    ("cleaning.writers:ParquetShardWriter.write", 3, 1),  # cleaning the new input
    ("cleaning.dedup_index:reduce_partition", 2, 0),     # between partitions of the index
    ("cleaning.writers:ParquetShardWriter.write_table", 2, 0),  # writing a final shard
    ("cleaning.build:link_or_copy", 7, 0),               # publishing, halfway through the links
])
def test_kill_9_in_the_middle_of_a_refresh_then_rerun(first, tmp_path, where, after, redone):
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], "a-new.jsonl")
    _killed(where, after, "refresh", str(raw), str(root), config().model_dump_json())
    assert latest_version(str(root)) == first["v1"]  # a killed refresh publishes nothing

    second = refresh([str(raw)], str(root), config())
    v1, v2 = root / first["v1"], root / second["version"]
    assert not list(root.rglob("*.tmp")) and not list((root / "_work" / "building").iterdir())
    scratch = run_local(CorpusBuild([str(raw)], str(tmp_path / "scratch"), config()))
    assert _survivors(v2) == _survivors(tmp_path / "scratch")
    assert _manifest(root, second["version"])["totals"] == scratch["totals"]
    for index in (0, 3, 4):  # still links to the first version's files
        assert _inode(v1 / "data" / f"part-{index:05d}.parquet") == _inode(v2 / "data" / f"part-{index + 1:05d}.parquet")
    work = _manifest(root, second["version"])["work"]
    assert work["cleaned"] == work["signed_shards"] == redone  # what the killed run finished is not redone


def test_kill_9_in_the_middle_of_gc_then_rerun(first):
    root, raw = first["root"], first["raw"]
    _new_file(raw, first["docs"], "a-new.jsonl")
    second = refresh([str(raw)], str(root), config())
    expected = collect_garbage(str(root), dry_run=True)
    assert expected.files > 10
    _killed("fsspec.implementations.local:LocalFileSystem.rm", 5, "gc", str(root))
    assert (root / second["version"] / "manifest.json").exists()

    finished = collect_garbage(str(root))
    assert not (root / first["v1"]).exists()
    assert set(finished.removed_entries) <= set(expected.removed_entries)
    assert collect_garbage(str(root)).files == 0
    for entry in _manifest(root, second["version"])["cache"]["entries"]:
        assert (root / "_work" / entry).exists(), entry
    assert len(read_rows(root / second["version"] / "data")) == _manifest(root, second["version"])["totals"]["kept"]
    # and the next refresh builds on what is left
    write_jsonl(raw / "part-7.jsonl", [{"id": "late", "text": first["docs"][-1], "domain": "news"}])
    assert _manifest(root, refresh([str(raw)], str(root), config())["version"])["work"]["signed_documents"] == 1


# -- object stores ------------------------------------------------------------------------------
def test_a_refresh_on_an_object_store_copies_what_it_cannot_link():
    import fsspec

    docs = _documents()
    fs = fsspec.filesystem("memory")
    for f in range(3):
        with fs.open(f"/incremental-raw/part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(4):
                fh.write(json.dumps({"id": f"p{f}-{i}", "text": docs[f * 4 + i]}, ensure_ascii=False) + "\n")
    root = "memory://incremental-corpora"
    refresh(["memory://incremental-raw"], root, config())
    with fs.open("/incremental-raw/part-3.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "new", "text": docs[0][:-4]}, ensure_ascii=False) + "\n")
    second = refresh(["memory://incremental-raw"], root, config())
    manifest = json.loads(fs.cat(f"/incremental-corpora/{second['version']}/manifest.json"))
    work = manifest["work"]
    assert work["published"] == {"linked": 0, "copied": 12}  # no links on this store: copies
    assert work["cleaned"] == 1 and work["signed_documents"] == 1 and work["finalized"] == 1
    with fs.open(f"/incremental-corpora/{second['version']}/rejected/dup-00003.parquet", "rb") as fh:
        assert pq.read_table(fh).column("dup_of").to_pylist() == ["p0-0"]
    garbage = collect_garbage(root)
    assert garbage.removed_versions and garbage.bytes_freed > 0
    assert fs.exists(f"/incremental-corpora/{second['version']}/manifest.json")
