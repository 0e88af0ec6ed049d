"""The dedup reduce streams (issue #13 §3): it merges the shards' sorted bucket files block by block
(DedupConfig.reduce_block_records), so its memory follows the block, not the partition, and gives
the same pairs, segments and duplicates whatever the block size; on an object store it reads the
rows it needs by byte ranges, never a whole signature, key or bucket file."""
from __future__ import annotations

import io
import random
import uuid

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cleaning import dedup, dedup_index
from cleaning.build import CorpusBuild
from cleaning.dedup_config import DedupConfig
from cleaning.stages import run_local
from cleaning.versions import refresh
from tests.test_corpus_build import config, edit
from tests.test_corpus_incremental import _documents, _manifest, _new_file, _old_files, _survivors

TINY = 7            # records per block: every partition of these tests is many blocks
HUGE = 1 << 40      # one block per partition


def _texts(abstracts: list[str], n: int, seed: int) -> list[str]:
    """n documents with planted exact and near copies (and copies of copies)."""
    rng = random.Random(seed)
    texts = []
    for i, text in enumerate(abstracts[:n]):
        texts.append(text)
        if i % 3 == 0:
            texts.append(edit(text, 0.02, rng))
        if i % 5 == 0:
            texts.append(text)
    rng.shuffle(texts)
    return texts


def _memory_root() -> str:
    return f"memory://dedup-streaming-{uuid.uuid4().hex[:8]}"


# -- the block size changes nothing -------------------------------------------------------------
def _without_work(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "pairs_checked"}  # comparisons made: work, not result


def test_a_build_and_a_refresh_give_the_same_result_with_a_tiny_block(tmp_path):
    """The real build, from scratch and refreshed (one input added, one removed), with blocks of
    7 records and with one block per partition: the same duplicates, survivors, counts and index."""
    docs = _documents()
    results = {}
    for block in (TINY, HUGE):
        corpus = config(reduce_block_records=block)
        root = tmp_path / f"versions-{block}"
        raw = tmp_path / f"raw-{block}"
        _old_files(raw, docs)
        first = refresh([str(raw)], str(root), corpus)
        _new_file(raw, docs, "a-new.jsonl")
        (raw / "part-4.jsonl").unlink()
        second = refresh([str(raw)], str(root), corpus)
        assert second["work"]["dedup"]["previous"] == first["version"]
        scratch = tmp_path / f"scratch-{block}"
        built = run_local(CorpusBuild([str(raw)], str(scratch), corpus))
        index = root / "_work" / "index"
        results[block] = {
            "first": (_survivors(root / first["version"]), _without_work(_manifest(root, first["version"])["dedup"])),
            "second": (_survivors(root / second["version"]), _without_work(_manifest(root, second["version"])["dedup"])),
            "scratch": (_survivors(scratch), _without_work(built["dedup"])),
            "pairs": [np.load(p).tolist() for v in (first["version"], second["version"])
                      for p in sorted((index / "versions" / v / "pairs").glob("*.npy"))],
            # by partition and content: a segment's name holds the version it extends
            "segments": sorted((p.parent.name[:4], p.name, p.read_bytes()) for p in (index / "segments").rglob("*.npy")),
        }
    tiny, huge = results[TINY], results[HUGE]
    assert tiny["second"] == tiny["scratch"]
    _, dups = tiny["second"][0]
    assert dups["p1-2"] == ("near_duplicate", "new-near") and dups["p2-5"] == ("exact_duplicate", "new-exact")
    for key in ("first", "second", "scratch", "pairs", "segments"):
        assert tiny[key] == huge[key], key
    assert tiny["segments"]


def _index_sequence(work: str, pool: dict, config: DedupConfig) -> dict:
    """dedup_index over versions that add, remove, re-add and insert shards; every version's
    duplicates, pair files and segment files."""
    sequence = [["s00", "s02", "s04", "s06"], ["s00", "s02", "s03", "s04", "s06"],
                ["s01", "s02", "s03", "s04", "s06"], ["s00", "s01", "s02", "s03", "s06", "s09"],
                ["s00", "s01", "s02", "s03", "s04", "s05", "s06", "s07", "s09"], ["s05", "s07", "s08"]]
    fs, root = dedup._fs(work)
    out, previous = {}, None
    for v, names in enumerate(sequence):
        shards = []
        for name in names:
            dedup_index.sign_shard(work, f"{name}-entry", pool[name], config)
            shards.append({"name": name, "minhash": f"{name}-entry", "documents": len(pool[name])})
        assert dedup_index.write_plan(work, f"v{v}", shards, previous, config)["previous"] == previous
        for p in range(config.partitions):
            dedup_index.reduce_partition(work, f"v{v}", p, config)
        done = dedup_index.cluster(work, f"v{v}", config)
        state = dedup_index.version_dir(work, f"v{v}")
        out[f"v{v}"] = {
            "summary": _without_work(done["summary"]), "segments": done["segments"],
            "duplicates": [dedup.load_duplicates(state, i) for i in range(len(names))],
            "pairs": [dedup._load_array(fs, f"{dedup._fs(state)[1]}/pairs/p{p:03d}.npy").tolist()
                      for p in range(config.partitions)]}
        previous = f"v{v}"
    out["files"] = {path.rsplit("/segments/", 1)[1]: fs.cat_file(path)
                    for path in sorted(fs.find(f"{root}/{dedup_index.SEGMENTS}")) if path.endswith(".npy")}
    return out


def test_the_index_gives_the_same_files_with_any_block_on_disk_and_on_an_object_store(abstracts, tmp_path, monkeypatch):
    """Versions that add, remove and re-add shards (segments merged on the way): blocks of 7 records
    and one block give the same pairs, segments and duplicates; so does an object store, whose
    lookups read the windows of a sparse key index (its stride cut to 8 rows, so that a segment has
    many windows)."""
    texts = _texts(abstracts, 150, seed=3)
    pool = {f"s{k:02d}": texts[k::10] for k in range(10)}
    huge = _index_sequence(str(tmp_path / "huge"), pool, DedupConfig(partitions=3, reduce_block_records=HUGE))
    monkeypatch.setattr(dedup, "_MERGE_SLACK", 0)  # the pairs gathered so far merged after every block
    tiny = _index_sequence(str(tmp_path / "tiny"), pool, DedupConfig(partitions=3, reduce_block_records=TINY))
    monkeypatch.setattr(dedup, "CHUNK_ROWS", 8)
    remote = _index_sequence(_memory_root(), pool, DedupConfig(partitions=3, reduce_block_records=TINY))
    assert huge["v5"]["summary"]["exact_duplicates"] and huge["v5"]["summary"]["near_duplicates"]
    assert any(len(names) > 1 for names in huge["v4"]["segments"])  # merges happened, and stopped
    remote_files = remote.pop("files")
    assert tiny == huge and remote == {k: v for k, v in huge.items() if k != "files"}
    assert remote_files.keys() == huge["files"].keys()
    for name, data in remote_files.items():
        if name.endswith("sparse.npy"):  # every 8th key, from the first
            keys = np.load(io.BytesIO(huge["files"][name.replace("sparse.npy", "keys.npy")]))
            assert np.array_equal(np.load(io.BytesIO(data)), keys[::8]), name
        else:
            assert data == huge["files"][name], name
    # the appending writer writes what np.save of the sorted arrays would
    for name, data in huge["files"].items():
        buffer = io.BytesIO()
        np.save(buffer, np.load(io.BytesIO(data)))
        assert buffer.getvalue() == data, name


def test_key_blocks_split_sorted_files_at_key_boundaries():
    rng = np.random.default_rng(5)
    fs = fsspec.filesystem("memory")
    root = _memory_root().split("://")[1]
    files = []
    for f in range(4):
        keys = np.sort(rng.integers(0, 300, size=int(rng.integers(0, 400)), dtype=np.uint64))
        fs.pipe(f"{root}/{f}.npy", _npy(keys))
        files.append(keys)
    for block in (1, 5, 64, 10_000):
        rows = [dedup._Rows(fs, f"{root}/{f}.npy") for f in range(4)]
        seen, last = [[] for _ in files], None
        for ranges in dedup.key_blocks(rows, block, lambda keys: keys):
            got = np.concatenate([files[f][lo:hi] for f, (lo, hi) in enumerate(ranges)])
            assert len(got) and (last is None or got.min() > last)  # ascending, no key in two blocks
            biggest = max(int((got == k).sum()) for k in np.unique(got))
            assert len(got) <= block + biggest - 1
            last = got.max()
            for f, (lo, hi) in enumerate(ranges):
                assert np.array_equal(np.asarray(rows[f].slice(lo, hi)), files[f][lo:hi])
                seen[f].append((lo, hi))
        for f, ranges in enumerate(seen):  # each file once, in order
            assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == len(files[f])


def test_searchsorted_on_an_object_store_reads_the_windows_of_the_sparse_index():
    rng = np.random.default_rng(2)
    fs = fsspec.filesystem("memory")
    path = _memory_root().split("://")[1] + "/keys.npy"
    keys = np.sort(np.repeat(rng.integers(10, 10**6, size=3000, dtype=np.uint64), rng.integers(1, 4, size=3000)))
    fs.pipe(path, _npy(keys))
    rows = dedup._Rows(fs, path)
    queries = np.unique(np.r_[keys[rng.integers(0, len(keys), 500)], rng.integers(0, 10**6 + 20, 500).astype(np.uint64),
                              np.uint64(0), keys[0], keys[-1], np.uint64(2**63)])
    for side in ("left", "right"):
        expected = np.searchsorted(keys, queries, side=side)
        assert np.array_equal(rows.searchsorted(queries, side, keys[::dedup.CHUNK_ROWS]), expected)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- memory follows the block ------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_partition(abstracts, tmp_path_factory):
    """Three shards mapped into one partition: ~26 records a document."""
    config = DedupConfig(partitions=1)
    texts = _texts(abstracts, 240, seed=9)
    shards = [texts[k::3] for k in range(3)]
    work = tmp_path_factory.mktemp("one-partition")
    for s, shard in enumerate(shards):
        dedup.map_shard(str(work), s, shard, config)
    records = np.concatenate([np.load(work / "buckets" / "p000" / f"{s:05d}.npy") for s in range(3)])
    return {"work": work, "shards": shards, "records": records, "config": config,
            "largest_bucket": int(np.unique(records["key"], return_counts=True)[1].max())}


def _watch(monkeypatch, owner, name: str, seen) -> None:
    """`seen(*args)` before every call of `owner.name`."""
    real = getattr(owner, name)

    def watched(*args):
        seen(*args)
        return real(*args)

    monkeypatch.setattr(owner, name, watched)


def test_the_reduce_holds_a_block_not_the_partition(one_partition, tmp_path, monkeypatch):
    block = 50
    records, largest = one_partition["records"], one_partition["largest_bucket"]
    assert len(records) > 100 * block and largest < block
    sizes, reads = [], []  # records of every `star_pairs` call: what the reduce holds at once
    _watch(monkeypatch, dedup, "star_pairs", lambda records, sigs, config: sizes.append(len(records)))
    work = tmp_path / "work"
    for s, shard in enumerate(one_partition["shards"]):
        dedup.map_shard(str(work), s, shard, one_partition["config"])
    config = one_partition["config"].model_copy(update={"reduce_block_records": block})
    monkeypatch.setattr(dedup, "_MERGE_SLACK", 0)
    dedup.reduce_partition(str(work), 0, config)
    assert len(sizes) > len(records) // (block + largest) and sum(sizes) == len(records)
    assert max(sizes) <= block + largest  # a block, and the rest of its last bucket
    # the same pairs as one block
    dedup.reduce_partition(str(one_partition["work"]), 0, one_partition["config"])
    assert np.array_equal(np.load(work / "pairs" / "p000.npy"), np.load(one_partition["work"] / "pairs" / "p000.npy"))

    # the incremental index, on an object store: each bucket-file read is a chunk, each block bounded
    sizes.clear()
    _watch(monkeypatch, dedup._Rows, "_runs", lambda rows, starts, ends:
           reads.extend((ends - starts).tolist() if "/buckets/" in rows.path else []))
    remote = _memory_root()
    shards = []
    for s, shard in enumerate(one_partition["shards"]):
        dedup_index.sign_shard(remote, f"e{s}", shard, config)
        shards.append({"name": f"s{s}", "minhash": f"e{s}", "documents": len(shard)})
    dedup_index.write_plan(remote, "v0", shards, None, config)
    dedup_index.reduce_partition(remote, "v0", 0, config)
    assert max(sizes) <= block + largest and sum(reads) == len(records)  # each record read once
    assert max(reads) <= block + dedup.CHUNK_ROWS


# -- object stores: rows, never whole files ------------------------------------------------------
def test_signature_rows_are_read_by_byte_ranges_on_an_object_store(monkeypatch):
    """A few documents' signatures, exact keys and facts, from a map directory on an object store:
    a header and a range per row are read, not the files (tens of kB to MB here)."""
    rng = np.random.default_rng(4)
    remote = _memory_root()
    fs, root = dedup._fs(remote)
    n = 20_000
    facts = np.zeros(n, dtype=dedup.FACT)
    facts["length"] = rng.integers(0, 1000, n)
    arrays = {"signatures": rng.integers(0, 2**32, size=(n, 25), dtype=np.uint32),
              "exact": rng.integers(0, 2**64, size=n, dtype=np.uint64), "facts": facts}
    for what, array in arrays.items():
        fs.pipe(f"{root}/{what}/00000.npy", _npy(array))
    read = []
    real_cat, real_open = MemoryFileSystem.cat_file, MemoryFileSystem._open

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = real_cat(self, path, start=start, end=end, **kwargs)
        read.append(len(data))
        return data

    def _open(self, path, mode="rb", **kwargs):
        fh = real_open(self, path, mode, **kwargs)
        if "r" in mode:
            real_read = fh.read

            def counted(*args):
                data = real_read(*args)
                read.append(len(data))
                return data

            fh.read = counted
        return fh

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(MemoryFileSystem, "_open", _open)
    sigs = dedup._Signatures(fs, root)
    gids = np.array([17_377, 3, 9_210, 3, 9_211], dtype=np.uint64)
    for what, array in arrays.items():
        read.clear()
        assert np.array_equal(sigs.take(gids, what), array[gids.astype(np.int64)]), what
        assert 0 < sum(read) <= 256 + 4 * 4096, (what, sum(read))  # the header, and a range a run of rows
        assert sum(read) < fs.size(f"{root}/{what}/00000.npy") / 20


def test_rows_of_a_local_file_are_read_with_one_open_per_call_and_equal_the_array(tmp_path, monkeypatch):
    import os

    rng = np.random.default_rng(3)
    array = np.zeros(5000, dtype=dedup.RECORD)
    array["key"] = rng.integers(0, 2**63, len(array), dtype=np.uint64)
    path = tmp_path / "records.npy"
    np.save(path, array)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    rows = dedup._Rows(fsspec.filesystem("file"), str(path))
    wanted = np.sort(rng.choice(len(array), 300, replace=True))  # far apart: many byte ranges
    opened.clear()
    assert np.array_equal(rows.take(wanted), array[wanted])
    assert len(opened) == 1  # fsspec's cat_ranges opened the file once per range
    assert np.array_equal(rows.slice(10, 4000), array[10:4000]) and np.array_equal(rows.slice(3990, 5000), array[3990:])
    with pytest.raises(OSError, match="ends at"):
        dedup._pread_ranges(str(path), [0], [path.stat().st_size + 10])


def test_sorted_unique_is_np_unique():
    rng = np.random.default_rng(4)
    for values in (rng.integers(0, 50, 1000, dtype=np.uint64), np.empty(0, dtype=np.uint64),
                   rng.integers(0, 2**64 - 1, 10, dtype=np.uint64, endpoint=True)):
        assert np.array_equal(dedup.sorted_unique(values), np.unique(values))
