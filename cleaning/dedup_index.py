"""Deduplication of a corpus version that extends the previous version's index instead of starting over.

A refresh that brings one new input file should hash that file's documents and look them up in
what is already indexed, not redo the corpus. The work directory (`WORK`, a corpus root's `_work`)
holds three kinds of entries; every file is written under a temporary name and renamed, and the
JSON file named last in each entry is its completion marker, written after the others:

    minhash/<entry>/          one cleaned shard's signatures, exact keys, rank facts and bucket
                              records, as `dedup.map_shard` writes them (shard number 0). <entry> is
                              the content hash of the cleaned shard plus the DedupConfig's
                              `pairs_fingerprint` (every field but the survivor rule): a shard is
                              hashed once, whichever versions and survivor settings it serves.
    index/segments/<name>/    the bucket records of some shards for one partition, sorted by key,
                              then (shard, row): keys.npy (uint64), refs.npy (segment-local
                              shard << 32 | row), sparse.npy (every sparse_stride-th key, from
                              the first: where a lookup on an object store reads), shards.json (the
                              shards' names, their record counts, the row count, sparse_stride)
    index/versions/<version>/ one version's dedup state:
        plan.json             its shards in order (name, minhash entry, documents) and the previous
                              version whose index it extends (null: none, or not usable)
        pairs/pNNN.npy        the confirmed pairs of partition NNN, each with the number of
                              buckets that confirm it
        pairs/pNNN.json       the partition's segments and counts (marker)
        duplicates/NNNNN.npy  per shard, as `dedup.cluster` writes them (the finalize stage reads these)
        assignments.npy       every duplicate: (duplicate gid, survivor gid, kind)
        index.json            the summary, the work done and the segments (marker)

A shard's name is its clean-stage entry (input content, input name, cleaning rules), unique within
a version. Gids are (shard index in the version << 32 | row), so (shard, row) order is input order.

Why the result equals a build from scratch: the reduce's pairs are, bucket by bucket, a function
of the bucket's members and their order only (`dedup.star_pairs`). A refresh finds the buckets its
new or removed shards touch (their keys), looks up those buckets' other members in the previous
segments (a binary search per key in the few rows that the segment's sparse key index points
at), takes away the pairs the old members made and
adds the pairs the new members make; every other bucket keeps its pairs. Unchanged shards keep
their relative order (inputs are sorted by URI; checked, else the index is not reused), so an old
pair keeps its orientation. The survivor of a cluster depends only on its connected component of
pairs and its members' ranks (`dedup.assign_survivors`; a rank is a function of the document's own
facts and of its gid's order, which unchanged shards keep): components whose pairs did not change
keep the previous version's survivors, and only the others are worked out again. A previous
version ranked with other survivor settings (`source_priority`, `survivor_order`) is still
extended, its pairs being the same, but every component is ranked again.

Memory: the reduce walks the new and removed shards' sorted bucket files block by block
(`dedup.key_blocks`, DedupConfig.reduce_block_records), looks up each block's keys in the
segments, writes the new segment as it goes, and merges segments block by block too: it holds a
block and a chunk per open file, never a partition's records; the pairs it sums are bounded by
the pair count. Blocks end at key boundaries, so no result depends on the block size (only the
work counter `checked` can: a pair that two buckets of one block share is compared once).

Segments: a refresh adds one per partition (the new shards' records). A version's shard is owned by
the newest of the version's segments that lists it (a shard removed and added again is listed
twice; the older copy is dead). The two newest segments are merged while the older of the two is
at most twice the size of the newer, dropping dead records: a partition keeps O(log N) segments,
and a record is rewritten O(log N) times over the life of the index.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np

from cleaning import dedup
from cleaning.dedup import (EXACT, NEAR, PAIR, RECORD, _record_keys, _Rows, _Signatures, _components,
                            _load_array, _load_json, _save_array, _save_json, _unique_pairs, key_blocks, merge_parts,
                            npy_header)
from cleaning.dedup_config import DedupConfig
from cleaning.writers import atomic_file

MINHASH = "minhash"
SEGMENTS = "index/segments"
VERSIONS = "index/versions"

#: a confirmed pair and the number of buckets that confirm it
COUNTED = np.dtype([("a", "<u8"), ("b", "<u8"), ("kind", "u1"), ("count", "<i8")])
ASSIGNMENT = np.dtype([("dup", "<u8"), ("survivor", "<u8"), ("kind", "u1")])
_ROW = np.uint64(0xFFFFFFFF)
_DEAD = np.uint64(0xFFFFFFFFFFFFFFFF)  # a gid of a shard that is not in the version


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def minhash_entry(cleaned_hash: str, config: DedupConfig) -> str:
    """The cache entry of a cleaned shard's signatures: its content and the dedup configuration
    (less the survivor settings, which the entry's rank facts do not depend on)."""
    return f"{cleaned_hash}-{config.pairs_fingerprint()[:12]}"


def sign_shard(work: str, entry: str, texts: Sequence[str], config: DedupConfig,
               sources: Sequence[str | None] | None = None,
               qualities: Sequence[float | None] | None = None) -> None:
    """Signatures, exact keys, rank facts (`sources`, `qualities`: see `dedup.map_shard`) and
    bucket records of one cleaned shard (skipped when present)."""
    dedup.map_shard(f"{work}/{MINHASH}/{entry}", 0, texts, config, sources, qualities)


def signed_documents(work: str, entry: str) -> int | None:
    """Documents of a finished minhash entry; None when it is not there."""
    fs, root = dedup._fs(work)
    marker = f"{root}/{MINHASH}/{entry}/map/00000.json"
    return int(_load_json(fs, marker)["documents"]) if fs.exists(marker) else None


# -- plan ---------------------------------------------------------------------------------------
def version_dir(work: str, version: str) -> str:
    return f"{work.rstrip('/')}/{VERSIONS}/{version}"


def load_index(work: str, version: str) -> dict[str, Any] | None:
    """A finished version's index.json (None when it is not finished or not there)."""
    fs, root = dedup._fs(version_dir(work, version))
    path = f"{root}/index.json"
    return _load_json(fs, path) if fs.exists(path) else None


def write_plan(work: str, version: str, shards: Sequence[dict[str, Any]], previous: str | None,
               config: DedupConfig) -> dict[str, Any]:
    """Records the version's shards ({name, minhash, documents}, in order) and the previous version
    to extend, when its index can be extended (else `previous` is null and `reason` says why).
    Rewritten by a rerun after a kill (what the reduce stage finished stays valid whichever
    previous version it extended: its result is the version's own), kept once the index is done."""
    fs, root = dedup._fs(version_dir(work, version))
    if fs.exists(f"{root}/index.json"):
        return _load_json(fs, f"{root}/plan.json")
    reason = _unusable(work, version, shards, previous, config) if previous else NO_PREVIOUS_INDEX
    plan = {"shards": list(shards), "previous": None if reason else previous, "reason": reason,
            "config": config.fingerprint()}
    _save_json(fs, f"{root}/plan.json", plan)
    return plan


NO_PREVIOUS_INDEX = "no previous version with an index"  # a first build: its index is its own, as expected


def _unusable(work: str, version: str, shards: Sequence[dict[str, Any]], previous: str,
              config: DedupConfig) -> str | None:
    """Why the previous version's index cannot be extended (None when it can)."""
    if previous == version:
        return "the previous version is this one"
    index = load_index(work, previous)
    if index is None:
        return f"no finished index of version {previous} in {work}"
    if index.get("pairs_config") != config.pairs_fingerprint():
        return "the previous index was made with another DedupConfig"
    fs, root = dedup._fs(work)
    before = _plan(work, previous)["shards"]
    position = {s["name"]: i for i, s in enumerate(shards)}
    kept = [position[s["name"]] for s in before if s["name"] in position]
    if not kept:
        return "no shard in common with the previous version"
    if kept != sorted(kept):
        return "the shards in common are in another order"  # old pairs would lose their orientation
    missing = [s["minhash"] for s in before if signed_documents(work, s["minhash"]) is None]
    missing += [name for names in index["segments"] for name in names
                if not fs.exists(f"{root}/{SEGMENTS}/{name}/shards.json")]
    return f"the previous index lacks {missing[0]}" if missing else None


def _plan(work: str, version: str) -> dict[str, Any]:
    fs, root = dedup._fs(version_dir(work, version))
    return _load_json(fs, f"{root}/plan.json")


class _Version:
    """A version's shards as the reduce and cluster stages need them."""

    def __init__(self, work: str, shards: Sequence[dict[str, Any]]):
        self.work = work.rstrip("/")
        self.names = [s["name"] for s in shards]
        self.entries = [s["minhash"] for s in shards]
        self.position = {name: i for i, name in enumerate(self.names)}

    def signatures(self, fs: fsspec.AbstractFileSystem) -> _Signatures:
        return _Signatures(fs, self.work, lambda shard: (f"{self.work}/{MINHASH}/{self.entries[shard]}", 0))

    def buckets(self, fs: fsspec.AbstractFileSystem, shard: int, partition: int) -> _Rows:
        """The shard's bucket records of one partition (their `shard` is 0: see `_in_version`)."""
        return _Rows(fs, f"{self.work}/{MINHASH}/{self.entries[shard]}/buckets/p{partition:03d}/00000.npy")

    def table(self, names: Sequence[str]) -> np.ndarray:
        """Index in this version of each of `names` (-1: not in it)."""
        return np.array([self.position.get(n, -1) for n in names], dtype=np.int64)


def _remap(gids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Gids of one version in another: `table` maps shard index to index (-1 → _DEAD)."""
    if not len(gids):
        return gids.astype(np.uint64)
    shard = table[(gids >> np.uint64(32)).astype(np.int64)]
    out = (shard.astype(np.uint64) << np.uint64(32)) | (gids & _ROW)
    out[shard < 0] = _DEAD
    return out


# -- segments -----------------------------------------------------------------------------------
def _segment_dir(work: str, name: str) -> str:
    return f"{work}/{SEGMENTS}/{name}"


def _segment_shards(fs: fsspec.AbstractFileSystem, work: str, name: str) -> dict[str, Any]:
    return _load_json(fs, f"{_segment_dir(work, name)}/shards.json")


def _owned(fs: fsspec.AbstractFileSystem, work: str, segments: Sequence[str], version: _Version) -> list[np.ndarray]:
    """Per segment, the version index of each of its local shards (-1: dead or owned by a newer segment)."""
    listed = [_segment_shards(fs, work, name)["shards"] for name in segments]
    owner: dict[str, int] = {}
    for k, names in enumerate(listed):
        for n in names:
            owner[n] = k
    return [np.array([version.position.get(n, -1) if owner[n] == k else -1 for n in names], dtype=np.int64)
            for k, names in enumerate(listed)]


class _Segment:
    """A segment's key and ref columns (`dedup._Rows`), opened once for a reduce."""

    def __init__(self, fs: fsspec.AbstractFileSystem, work: str, name: str):
        folder = _segment_dir(work, name)
        self.keys, self.refs = _Rows(fs, f"{folder}/keys.npy"), _Rows(fs, f"{folder}/refs.npy")
        # the sparse index says which rows to read (files are read by byte ranges, not mapped)
        self.sample = _load_array(fs, f"{folder}/sparse.npy")
        self.stride = int(_segment_shards(fs, work, name)["sparse_stride"])

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (key, local ref) records whose key is one of the sorted `keys`: a binary search per
        key in the key column (`_Rows.searchsorted`), then the refs of the rows found, so a lookup
        reads a few pages or byte ranges, not the segment."""
        lo = self.keys.searchsorted(keys, "left", self.sample, self.stride)
        hi = self.keys.searchsorted(keys, "right", self.sample, self.stride)
        lengths = hi - lo
        total = int(lengths.sum())
        if not total:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        starts = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        return np.repeat(np.asarray(keys, dtype=np.uint64), lengths), self.refs.take(starts)


@contextmanager
def _segment_writer(fs: fsspec.AbstractFileSystem, work: str, name: str, rows: int, names: Sequence[str],
                    counts: Sequence[int]) -> Iterator[Callable[[np.ndarray], None]]:
    """Writes a segment of `rows` records block by block: the context gives `append(records)`
    (RECORD rows whose `shard` indexes `names`; each call's keys above the previous call's), and the
    files are those that one sort of all the records would give. `counts`: the records of each of
    `names`. The key and ref files are renamed into place at the end, then the sparse index, then
    shards.json, the marker; a failure leaves no file."""
    folder = _segment_dir(work, name)
    sample, written, stride = [], 0, dedup.CHUNK_ROWS
    with atomic_file(fs.unstrip_protocol(f"{folder}/keys.npy")) as keys, \
            atomic_file(fs.unstrip_protocol(f"{folder}/refs.npy")) as refs:
        keys.write(npy_header(np.uint64, rows))
        refs.write(npy_header(np.uint64, rows))

        def append(records: np.ndarray) -> None:
            nonlocal written
            records = records[np.lexsort((records["row"], records["shard"], records["key"]))]
            sample.append(records["key"][-written % stride::stride])
            keys.write(np.ascontiguousarray(records["key"]).tobytes())
            refs.write(dedup.gid(records["shard"], records["row"]).tobytes())
            written += len(records)

        yield append
        if written != rows:
            raise RuntimeError(f"segment {name}: {written} records written for {rows}")
    _save_array(fs, f"{folder}/sparse.npy", np.concatenate(sample + [np.empty(0, np.uint64)]))
    _save_json(fs, f"{folder}/shards.json", {"shards": list(names), "records": [int(c) for c in counts],
                                              "rows": int(rows), "sparse_stride": stride})


def _as_records(keys: np.ndarray, refs: np.ndarray, owned: np.ndarray) -> np.ndarray:
    """Live records (RECORD, `shard` = version index) of a segment's (key, local ref) rows."""
    shard = owned[(refs >> np.uint64(32)).astype(np.int64)] if len(refs) else np.empty(0, np.int64)
    live = shard >= 0
    out = np.empty(int(live.sum()), dtype=RECORD)
    out["key"], out["shard"], out["row"] = keys[live], shard[live], (refs[live] & _ROW)
    return out


def _column(keys: np.ndarray) -> np.ndarray:
    return keys


def _compact(fs: fsspec.AbstractFileSystem, work: str, partition: int, segments: list[str],
             version: _Version, block: int) -> list[str]:
    """Merges the two newest segments while the older is at most twice the newer (see module doc),
    block by block (`dedup.key_blocks`): a merge holds a block, not the segments."""
    segments = list(segments)
    while len(segments) >= 2:
        older, newer = segments[-2], segments[-1]
        listed = [_segment_shards(fs, work, name) for name in (older, newer)]
        if listed[0]["rows"] > 2 * listed[1]["rows"]:
            break
        owned = _owned(fs, work, segments, version)[-2:]
        live = {int(own[local]): count for info, own in zip(listed, owned)
                for local, count in enumerate(info["records"]) if own[local] >= 0 and count}
        shards = np.array(sorted(live), dtype=np.int64)  # the merged segment's, in version order
        names = [version.names[s] for s in shards.tolist()]
        name = f"p{partition:03d}-{_digest(['merge', older, newer, names])}"
        if not fs.exists(f"{_segment_dir(work, name)}/shards.json"):
            parts = [_Segment(fs, work, n) for n in (older, newer)]
            with _segment_writer(fs, work, name, sum(live.values()), names,
                                 [live[s] for s in shards.tolist()]) as append:
                for ranges in key_blocks([part.keys for part in parts], block, _column):
                    records = np.concatenate([_as_records(part.keys.slice(lo, hi), part.refs.slice(lo, hi), own)
                                              for part, own, (lo, hi) in zip(parts, owned, ranges)])
                    records["shard"] = np.searchsorted(shards, records["shard"])
                    append(records)
        segments[-2:] = [name]
    return segments


# -- reduce -------------------------------------------------------------------------------------
def _counted(pairs: np.ndarray, sign: int) -> np.ndarray:
    out = np.empty(len(pairs), dtype=COUNTED)
    out["a"], out["b"], out["kind"], out["count"] = pairs["a"], pairs["b"], pairs["kind"], sign
    return out


def _sum_counts(parts: Sequence[np.ndarray], final: bool = True) -> np.ndarray:
    """Pairs with the counts of equal (a, b, kind) added up; pairs left at zero dropped. `final`:
    the parts are all the partition's, so a count below zero is an error (else it is a part sum)."""
    pairs = np.concatenate(parts) if parts else np.empty(0, dtype=COUNTED)
    if not len(pairs):
        return pairs
    pairs = pairs[np.lexsort((pairs["kind"], pairs["b"], pairs["a"]))]
    first = np.r_[True, (pairs["a"][1:] != pairs["a"][:-1]) | (pairs["b"][1:] != pairs["b"][:-1])
                  | (pairs["kind"][1:] != pairs["kind"][:-1])]
    starts = np.flatnonzero(first)
    out = pairs[starts].copy()
    out["count"] = np.add.reduceat(pairs["count"], starts)
    if not final:
        return out[out["count"] != 0]
    if (out["count"] < 0).any():
        raise RuntimeError("dedup index: a pair was taken away more often than it was found; "
                           "the previous version's index does not match its shards")
    return out[out["count"] > 0]


def _in_version(parts: Sequence[np.ndarray], shards: Sequence[int]) -> np.ndarray:
    """Bucket records of some shards (a copy), `shard` set to each one's index in the version."""
    out = np.concatenate([*parts, np.empty(0, RECORD)])
    out["shard"] = np.repeat(np.asarray(shards, dtype=np.int64), [len(p) for p in parts]) if parts else 0
    return out


def reduce_partition(work: str, version: str, partition: int, config: DedupConfig) -> dict[str, Any]:
    """The version's confirmed pairs of one partition, and its segments (skipped when done).

    Block by block (`dedup.key_blocks` over the new and the removed shards' bucket files): the
    keys of the block are the touched buckets; their old members come from the previous segments,
    the pairs the old members made are taken away and those the members now make added, and the
    new shards' records of the block go to the new segment. Buckets never straddle two blocks."""
    fs, root = dedup._fs(work)
    state = version_dir(root, version)
    marker = f"{state}/pairs/p{partition:03d}.json"
    if fs.exists(marker):
        done = _load_json(fs, marker)
        dedup._check_fingerprint(marker, done.get("config"), config.fingerprint())
        return done
    plan = _plan(work, version)
    now = _Version(root, plan["shards"])
    previous = plan["previous"]
    before = _Version(root, _plan(work, previous)["shards"] if previous else [])
    old_segments = load_index(work, previous)["segments"][partition] if previous else []

    fresh = [i for i, name in enumerate(now.names) if name not in before.position]
    gone = [j for j, name in enumerate(before.names) if name not in now.position]
    files = [now.buckets(fs, i, partition) for i in fresh] + [before.buckets(fs, j, partition) for j in gone]
    owned = _owned(fs, root, old_segments, before)
    segments_before = [_Segment(fs, root, name) for name in old_segments]
    to_now = now.table(before.names)
    sigs_before, sigs_now = before.signatures(fs), now.signatures(fs)

    counts = [len(f) for f in files[:len(fresh)]]
    names = [now.names[i] for i in fresh]
    # named by what it extends too: a shard removed and added again gets a segment of its own
    added = f"p{partition:03d}-{_digest(['add', previous, names, config.pairs_fingerprint()])}" if sum(counts) else None
    writer = _segment_writer(fs, root, added, sum(counts), names, counts) \
        if added and not fs.exists(f"{_segment_dir(root, added)}/shards.json") else None
    summed, touched_keys, looked_up, checked = [], 0, 0, 0
    with writer or nullcontext() as append:
        for ranges in key_blocks(files, config.reduce_block_records, _record_keys):
            read = [f.slice(lo, hi) for f, (lo, hi) in zip(files, ranges)]
            fresh_records = _in_version(read[:len(fresh)], fresh)
            touched = dedup.sorted_unique(np.concatenate([fresh_records["key"], *(r["key"] for r in read[len(fresh):])]))
            # The touched buckets' members in the previous version, from its segments.
            old_members = np.concatenate([_as_records(*segment.lookup(touched), owned[k])
                                          for k, segment in enumerate(segments_before)] + [np.empty(0, RECORD)])
            # The same buckets now: their old members that are still in the version, and the new records.
            index_now = to_now[old_members["shard"].astype(np.int64)]
            still = old_members[index_now >= 0].copy()
            still["shard"] = index_now[index_now >= 0]
            new_members = np.concatenate([still, fresh_records])

            old_pairs, old_counts = dedup.star_pairs(old_members, sigs_before, config)
            new_pairs, new_counts = dedup.star_pairs(new_members, sigs_now, config)
            summed = merge_parts(summed, np.concatenate([_moved(_counted(old_pairs, -1), to_now), _counted(new_pairs, +1)]),
                                 lambda pairs: _sum_counts([pairs], final=False))
            touched_keys, looked_up = touched_keys + len(touched), looked_up + len(old_members)
            checked += old_counts["checked"] + new_counts["checked"]
            if append:
                fresh_records["shard"] = np.searchsorted(np.asarray(fresh, dtype=np.int64), fresh_records["shard"])
                append(fresh_records)
    carried_pairs = _load_array(fs, f"{version_dir(root, previous)}/pairs/p{partition:03d}.npy") if previous \
        else np.empty(0, dtype=COUNTED)
    pairs = _sum_counts([_moved(carried_pairs, to_now), *summed])

    segments = list(old_segments) + ([added] if added else [])
    segments = _compact(fs, root, partition, segments, now, config.reduce_block_records)

    _save_array(fs, f"{state}/pairs/p{partition:03d}.npy", pairs)
    done = {"segments": segments, "touched_keys": touched_keys, "looked_up": looked_up,
            "checked": checked, "pairs": int(len(pairs)), "config": config.fingerprint()}
    _save_json(fs, marker, done)
    return done


def _moved(pairs: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Counted pairs of the previous version in this one's gids; pairs with a removed shard dropped."""
    out = pairs.copy()
    out["a"], out["b"] = _remap(pairs["a"], table), _remap(pairs["b"], table)
    return out[(out["a"] != _DEAD) & (out["b"] != _DEAD)]


# -- cluster ------------------------------------------------------------------------------------
def _edges(pairs: np.ndarray) -> np.ndarray:
    """Distinct (a, b) of counted pairs as 16-byte values (set operations with np.isin)."""
    edges = np.empty(len(pairs), dtype=[("a", "<u8"), ("b", "<u8")])
    edges["a"], edges["b"] = pairs["a"], pairs["b"]
    return np.unique(edges.view("V16"))


def _all_pairs(fs: fsspec.AbstractFileSystem, state: str, config: DedupConfig) -> tuple[np.ndarray, list[dict]]:
    pairs, markers = [], []
    for p in range(config.partitions):
        marker = f"{state}/pairs/p{p:03d}.json"
        if not fs.exists(marker):
            raise FileNotFoundError(f"{marker}: reduce_partition({p}) has not finished")
        markers.append(_load_json(fs, marker))
        pairs.append(_load_array(fs, f"{state}/pairs/p{p:03d}.npy"))
    return (np.concatenate(pairs) if pairs else np.empty(0, dtype=COUNTED)), markers


def cluster(work: str, version: str, config: DedupConfig) -> dict[str, Any]:
    """Survivors of the version's clusters, reusing the previous version's where nothing changed;
    returns index.json: {summary (a DedupSummary), work, segments}."""
    fs, root = dedup._fs(work)
    state = version_dir(root, version)
    if fs.exists(f"{state}/index.json"):
        done = _load_json(fs, f"{state}/index.json")
        dedup._check_fingerprint(f"{state}/index.json", done.get("config"), config.fingerprint())
        return done
    plan = _plan(work, version)
    now = _Version(root, plan["shards"])
    previous = plan["previous"]
    counted, markers = _all_pairs(fs, state, config)
    as_pairs = np.zeros(len(counted), dtype=PAIR)
    as_pairs["a"], as_pairs["b"], as_pairs["kind"] = counted["a"], counted["b"], counted["kind"]
    found = _unique_pairs(as_pairs)
    nodes = dedup.sorted_unique(np.concatenate([found["a"], found["b"]]))
    component = _components(np.searchsorted(nodes, found["a"]), np.searchsorted(nodes, found["b"]), len(nodes))

    carried = np.empty(0, dtype=ASSIGNMENT)
    redo = np.ones(len(nodes), dtype=bool)
    if previous and load_index(work, previous)["config"] == config.fingerprint():  # ranked alike
        before = _Version(root, _plan(work, previous)["shards"])
        to_now = now.table(before.names)
        old, _ = _all_pairs(fs, version_dir(root, previous), config)
        old_edges = np.empty(len(old), dtype=[("a", "<u8"), ("b", "<u8")])
        old_edges["a"], old_edges["b"] = _remap(old["a"], to_now), _remap(old["b"], to_now)
        old_edges = np.unique(old_edges.view("V16"))
        new_edges = _edges(found)
        changed = np.concatenate([old_edges[~np.isin(old_edges, new_edges)],
                                  new_edges[~np.isin(new_edges, old_edges)]]).view([("a", "<u8"), ("b", "<u8")])
        touched = dedup.sorted_unique(np.concatenate([changed["a"], changed["b"]]))
        touched = touched[touched != _DEAD]
        redo = np.isin(component, component[np.isin(nodes, touched)])
        carried = _load_array(fs, f"{version_dir(root, previous)}/assignments.npy").copy()
        carried["dup"], carried["survivor"] = _remap(carried["dup"], to_now), _remap(carried["survivor"], to_now)
        keep = (carried["dup"] != _DEAD) & ~np.isin(carried["dup"], touched) & ~np.isin(carried["dup"], nodes[redo])
        carried = carried[keep]
        if (carried["survivor"] == _DEAD).any():  # a component that lost its survivor has a changed pair
            raise RuntimeError("dedup index: a kept duplicate's survivor was removed")

    survivor, kind, _ = dedup.assign_survivors(nodes[redo], component[redo], now.signatures(fs), config)
    redone = nodes[redo]
    is_dup = survivor != np.arange(len(redone))
    worked = np.empty(int(is_dup.sum()), dtype=ASSIGNMENT)
    worked["dup"], worked["survivor"], worked["kind"] = redone[is_dup], redone[survivor[is_dup]], kind[is_dup]
    assignments = np.concatenate([carried, worked])
    assignments = assignments[np.argsort(assignments["dup"], kind="stable")]
    dedup.save_duplicates(fs, state, len(now.names), assignments["dup"], assignments["survivor"],
                          assignments["kind"])
    _save_array(fs, f"{state}/assignments.npy", assignments)

    components = int(len(np.unique(component))) if len(nodes) else 0
    summary = dedup.DedupSummary(
        documents=sum(int(s["documents"]) for s in plan["shards"]),
        clusters=int(len(np.unique(assignments["survivor"]))),
        exact_duplicates=int((assignments["kind"] == EXACT).sum()),
        near_duplicates=int((assignments["kind"] == NEAR).sum()),
        pairs_checked=sum(int(m["checked"]) for m in markers),
        pairs_confirmed=int(len(found)),
        chain_splits=int(len(nodes) - len(assignments)) - components,
    )
    done = {"summary": summary.to_json(), "segments": [m["segments"] for m in markers],
            "work": {"previous": previous, "not_extended_because": plan["reason"] if not previous else None,
                     "touched_keys": sum(m["touched_keys"] for m in markers),
                     "looked_up_records": sum(m["looked_up"] for m in markers),
                     "pairs_checked": summary.pairs_checked,
                     "documents_reassigned": int(redo.sum())},
            "config": config.fingerprint(), "pairs_config": config.pairs_fingerprint()}
    _save_json(fs, f"{state}/index.json", done)
    return done

