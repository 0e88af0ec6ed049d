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
    index/segments/<name>/    the bucket records of some shards for one partition, sorted by key:
                              keys.npy (uint64), refs.npy (segment-local shard << 32 | row),
                              shards.json (the shards' names and the row count)
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
segments (a binary search per key in a memory map), takes away the pairs the old members made and
adds the pairs the new members make; every other bucket keeps its pairs. Unchanged shards keep
their relative order (inputs are sorted by URI; checked, else the index is not reused), so an old
pair keeps its orientation. The survivor of a cluster depends only on its connected component of
pairs and its members' ranks (`dedup.assign_survivors`; a rank is a function of the document's own
facts and of its gid's order, which unchanged shards keep): components whose pairs did not change
keep the previous version's survivors, and only the others are worked out again. A previous
version ranked with other survivor settings (`source_priority`, `survivor_order`) is still
extended, its pairs being the same, but every component is ranked again.

Segments: a refresh adds one per partition (the new shards' records). A version's shard is owned by
the newest of the version's segments that lists it (a shard removed and added again is listed
twice; the older copy is dead). The two newest segments are merged while the older of the two is
at most twice the size of the newer, dropping dead records: a partition keeps O(log N) segments,
and a record is rewritten O(log N) times over the life of the index.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import fsspec
import numpy as np

from cleaning import dedup
from cleaning.dedup import (EXACT, NEAR, PAIR, RECORD, _Signatures, _components, _load_array, _load_json,
                            _save_array, _save_json, _unique_pairs)
from cleaning.dedup_config import DedupConfig

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
    reason = _unusable(work, version, shards, previous, config) if previous else "no previous version with an index"
    plan = {"shards": list(shards), "previous": None if reason else previous, "reason": reason,
            "config": config.fingerprint()}
    _save_json(fs, f"{root}/plan.json", plan)
    return plan


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

    def buckets(self, fs: fsspec.AbstractFileSystem, shard: int, partition: int) -> np.ndarray:
        """The shard's bucket records of one partition, with its index in this version."""
        records = _load_array(fs, f"{self.work}/{MINHASH}/{self.entries[shard]}/buckets/p{partition:03d}/00000.npy")
        records = np.array(records)
        records["shard"] = shard
        return records

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


def _lookup(fs: fsspec.AbstractFileSystem, work: str, name: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (key, local ref) records of a segment whose key is one of the sorted `keys`: a binary
    search per key in the memory-mapped key column, so a lookup reads a few pages, not the segment."""
    folder = _segment_dir(work, name)
    stored = _load_array(fs, f"{folder}/keys.npy", mmap=True)
    lo = np.searchsorted(stored, keys, side="left")
    hi = np.searchsorted(stored, keys, side="right")
    lengths = hi - lo
    total = int(lengths.sum())
    if not total:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    starts = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    refs = _load_array(fs, f"{folder}/refs.npy", mmap=True)
    return np.asarray(stored[starts]), np.asarray(refs[starts])


def _write_segment(fs: fsspec.AbstractFileSystem, work: str, name: str, records: np.ndarray,
                   names: Sequence[str]) -> None:
    """A segment from RECORD rows whose `shard` indexes `names` (skipped when it is there)."""
    folder = _segment_dir(work, name)
    if fs.exists(f"{folder}/shards.json"):
        return
    records = records[np.lexsort((records["row"], records["shard"], records["key"]))]
    _save_array(fs, f"{folder}/keys.npy", np.ascontiguousarray(records["key"]))
    _save_array(fs, f"{folder}/refs.npy", dedup.gid(records["shard"], records["row"]))
    _save_json(fs, f"{folder}/shards.json", {"shards": list(names), "rows": int(len(records))})


def _segment_records(fs: fsspec.AbstractFileSystem, work: str, name: str, owned: np.ndarray) -> np.ndarray:
    """All live records of a segment (RECORD, `shard` = version index): for merging."""
    folder = _segment_dir(work, name)
    keys, refs = _load_array(fs, f"{folder}/keys.npy"), _load_array(fs, f"{folder}/refs.npy")
    return _as_records(keys, refs, owned)


def _as_records(keys: np.ndarray, refs: np.ndarray, owned: np.ndarray) -> np.ndarray:
    shard = owned[(refs >> np.uint64(32)).astype(np.int64)] if len(refs) else np.empty(0, np.int64)
    live = shard >= 0
    out = np.empty(int(live.sum()), dtype=RECORD)
    out["key"], out["shard"], out["row"] = keys[live], shard[live], (refs[live] & _ROW)
    return out


def _compact(fs: fsspec.AbstractFileSystem, work: str, partition: int, segments: list[str],
             version: _Version) -> list[str]:
    """Merges the two newest segments while the older is at most twice the newer (see module doc)."""
    segments = list(segments)
    while len(segments) >= 2:
        older, newer = segments[-2], segments[-1]
        if _segment_shards(fs, work, older)["rows"] > 2 * _segment_shards(fs, work, newer)["rows"]:
            break
        owned = _owned(fs, work, segments, version)
        records = np.concatenate([_segment_records(fs, work, older, owned[-2]),
                                  _segment_records(fs, work, newer, owned[-1])])
        shards = np.unique(records["shard"]).astype(np.int64)
        local = np.searchsorted(shards, records["shard"])
        names = [version.names[s] for s in shards.tolist()]
        merged = np.empty(len(records), dtype=RECORD)
        merged["key"], merged["shard"], merged["row"] = records["key"], local, records["row"]
        name = f"p{partition:03d}-{_digest(['merge', older, newer, names])}"
        _write_segment(fs, work, name, merged, names)
        segments[-2:] = [name]
    return segments


# -- reduce -------------------------------------------------------------------------------------
def _counted(pairs: np.ndarray, sign: int) -> np.ndarray:
    out = np.empty(len(pairs), dtype=COUNTED)
    out["a"], out["b"], out["kind"], out["count"] = pairs["a"], pairs["b"], pairs["kind"], sign
    return out


def _sum_counts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Pairs with the counts of equal (a, b, kind) added up; pairs left at zero dropped."""
    pairs = np.concatenate(parts) if parts else np.empty(0, dtype=COUNTED)
    if not len(pairs):
        return pairs
    pairs = pairs[np.lexsort((pairs["kind"], pairs["b"], pairs["a"]))]
    first = np.r_[True, (pairs["a"][1:] != pairs["a"][:-1]) | (pairs["b"][1:] != pairs["b"][:-1])
                  | (pairs["kind"][1:] != pairs["kind"][:-1])]
    starts = np.flatnonzero(first)
    out = pairs[starts].copy()
    out["count"] = np.add.reduceat(pairs["count"], starts)
    if (out["count"] < 0).any():
        raise RuntimeError("dedup index: a pair was taken away more often than it was found; "
                           "the previous version's index does not match its shards")
    return out[out["count"] > 0]


def reduce_partition(work: str, version: str, partition: int, config: DedupConfig) -> dict[str, Any]:
    """The version's confirmed pairs of one partition, and its segments (skipped when done)."""
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
    fresh_records = np.concatenate([now.buckets(fs, i, partition) for i in fresh] + [np.empty(0, RECORD)])
    gone_keys = [before.buckets(fs, j, partition)["key"] for j in gone]
    touched = np.unique(np.concatenate([fresh_records["key"], *gone_keys, np.empty(0, np.uint64)]))

    # The touched buckets' members in the previous version, from its segments.
    owned = _owned(fs, root, old_segments, before)
    found = [_as_records(*_lookup(fs, root, name, touched), owned[k]) for k, name in enumerate(old_segments)]
    old_members = np.concatenate(found + [np.empty(0, RECORD)])
    # The same buckets now: their old members that are still in the version, and the new records.
    to_now = now.table(before.names)
    index_now = to_now[old_members["shard"].astype(np.int64)]
    still = old_members[index_now >= 0].copy()
    still["shard"] = index_now[index_now >= 0]
    new_members = np.concatenate([still, fresh_records])

    old_pairs, old_counts = dedup.star_pairs(old_members, before.signatures(fs), config)
    new_pairs, new_counts = dedup.star_pairs(new_members, now.signatures(fs), config)
    carried_pairs = _load_array(fs, f"{version_dir(root, previous)}/pairs/p{partition:03d}.npy") if previous \
        else np.empty(0, dtype=COUNTED)
    parts = [_moved(carried_pairs, to_now), _moved(_counted(old_pairs, -1), to_now), _counted(new_pairs, +1)]
    pairs = _sum_counts(parts)

    segments = list(old_segments)
    if len(fresh_records):
        local = np.searchsorted(np.asarray(fresh, dtype=np.int64), fresh_records["shard"].astype(np.int64))
        records = fresh_records.copy()
        records["shard"] = local
        names = [now.names[i] for i in fresh]
        # named by what it extends too: a shard removed and added again gets a segment of its own
        name = f"p{partition:03d}-{_digest(['add', previous, names, config.pairs_fingerprint()])}"
        _write_segment(fs, root, name, records, names)
        segments.append(name)
    segments = _compact(fs, root, partition, segments, now)

    _save_array(fs, f"{state}/pairs/p{partition:03d}.npy", pairs)
    done = {"segments": segments, "touched_keys": int(len(touched)), "looked_up": int(len(old_members)),
            "checked": old_counts["checked"] + new_counts["checked"], "pairs": int(len(pairs)),
            "config": config.fingerprint()}
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
    nodes = np.unique(np.concatenate([found["a"], found["b"]]))
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
        touched = np.unique(np.concatenate([changed["a"], changed["b"]]))
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

