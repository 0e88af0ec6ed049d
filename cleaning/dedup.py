"""Exact and MinHash-LSH deduplication as a multi-stage map-reduce (see DedupConfig, cleaning/dedup_config.py).

Stages and the files they leave in the work directory `dir` (local path or fsspec URI); every file
is written under a temporary name and renamed, and a stage whose output exists is skipped:

    map_shard(shard)          signatures/{shard:05d}.npy   uint32 (docs, num_perm), memory-mapped later
                              exact/{shard:05d}.npy        uint64 exact key per document
                              facts/{shard:05d}.npy        FACT per document: what ranks survivors
                              buckets/p{p:03d}/{shard:05d}.npy  records (key, shard, row), sorted by
                                                           key, then row
                              map/{shard:05d}.json         completion marker, written last; also
                                                           the shard's source names (FACT.source)
    reduce_partition(p)       pairs/p{p:03d}.json          counters of the partition
                              pairs/p{p:03d}.npy           confirmed pairs (a, b, kind, similarity)
    cluster()                 duplicates/{shard:05d}.npy   (row, survivor_shard, survivor_row, kind)
                              summary.json                 counters, written last

Memory: map holds one shard. Reduce merges the partition's sorted bucket files block by block
(`key_blocks`): a block is a range of keys holding about DedupConfig.reduce_block_records records,
and it holds one block plus a few thousand records per open file, whatever the size of the
partition; it reads the signatures of the documents that share a bucket by rows (`_Rows`: a memory
map on a local disk, byte ranges on an object store), never a whole signature file. Cluster holds
the confirmed pairs and the documents they touch, i.e. duplicates, never the corpus. Nor does it
read a text: a survivor is chosen by the facts the map stage kept of each document (source,
normalised length, quality).

A bucket record's key is either an exact key (top bit set) or an LSH band key (top bit clear,
the band index mixed into the hash), so one key order groups both kinds.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import xxhash
from fsspec.implementations.local import LocalFileSystem

from cleaning.dedup_config import NEUTRAL_QUALITY, DedupConfig
from cleaning.writers import atomic_file, write_bytes_atomic
from cleaning.minhash import MinHasher, code_points, estimated_jaccard, mix64, normalize


# -- record layouts -----------------------------------------------------------------------------
RECORD = np.dtype([("key", "<u8"), ("shard", "<u4"), ("row", "<u4")])
PAIR = np.dtype([("a", "<u8"), ("b", "<u8"), ("kind", "u1"), ("similarity", "<f4")])
DUPLICATE = np.dtype([("row", "<u4"), ("survivor_shard", "<u4"), ("survivor_row", "<u4"), ("kind", "u1")])
#: per document, what DedupConfig.survivor_order ranks by: the index of its source among the
#: shard's source names (map marker), its length after normalisation, its quality (NaN: unscored).
#: None of it depends on the survivor settings, so changing them re-ranks without hashing again.
FACT = np.dtype([("source", "<u4"), ("length", "<u4"), ("quality", "<f4")])
EXACT, NEAR = 0, 1
KIND_NAMES = {EXACT: "exact", NEAR: "near"}
EXACT_FLAG = np.uint64(1 << 63)

_SHARD_FILE = re.compile(r"^\d{5}\.npy$")  # temporary files (".name.xxxx.tmp") never match
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class DedupSummary:
    documents: int
    clusters: int                 # clusters with at least one duplicate
    exact_duplicates: int
    near_duplicates: int
    pairs_checked: int            # signature comparisons in the reduce (LSH candidates)
    pairs_confirmed: int          # distinct confirmed pairs (exact and near)
    chain_splits: int             # documents of a pair-connected component that the
                                  # representative check left as survivors (chaining guarded)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- public helpers -----------------------------------------------------------------------------
def exact_key(text: str) -> int:
    """uint64 xxh3 of the normalised text (NFKC, no whitespace / punctuation, lower case).

    The bytes hashed are the UTF-32-LE code points, the form the batch path already holds, so
    `map_shard` computes the same key without going back to a Python string.
    """
    return xxhash.xxh3_64_intdigest(normalize(text).encode("utf-32-le"))


def gid(shard: np.ndarray | int, row: np.ndarray | int) -> np.ndarray:
    """One uint64 per document whose order is the (shard, row) order."""
    return (np.asarray(shard, dtype=np.uint64) << np.uint64(32)) | np.asarray(row, dtype=np.uint64)


# -- file helpers -------------------------------------------------------------------------------
def _fs(dir: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(dir)
    return fs, root.rstrip("/")


def _save_array(fs: fsspec.AbstractFileSystem, path: str, array: np.ndarray) -> None:
    with atomic_file(fs.unstrip_protocol(path)) as fh:
        np.save(fh, array, allow_pickle=False)


def _save_json(fs: fsspec.AbstractFileSystem, path: str, payload: dict[str, Any]) -> None:
    write_bytes_atomic(fs.unstrip_protocol(path), json.dumps(payload, sort_keys=True).encode("utf-8"))


def _load_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    with fs.open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def _load_array(fs: fsspec.AbstractFileSystem, path: str, mmap: bool = False) -> np.ndarray:
    """Every whole array and every memory map is read through here (tests watch it to check what a
    stage opens); `_Rows` reads only some rows of a file on an object store, by byte ranges."""
    if mmap and isinstance(fs, LocalFileSystem):
        return np.load(path, mmap_mode="r")
    with fs.open(path, "rb") as fh:  # remote: one shard file, still bounded by a shard
        return np.load(fh, allow_pickle=False)


#: rows one step of a merge reads from a sorted file at most (less when many files share the
#: block), and the stride of a segment's sparse key index (`cleaning.dedup_index`)
CHUNK_ROWS = 4096
_HEADER_BYTES = 256  # read at once for an .npy header (ours take 128; a longer one is read again)
_GAP_BYTES = 4096  # rows wanted this close together are read in one request
_MERGE_SLACK = 1 << 16  # pairs a reduce gathers before it merges them (`merge_parts`)


def npy_header(dtype: np.dtype, rows: int) -> bytes:
    """The header `np.save` writes for a 1-d array of `rows` values of `dtype` (the data follows)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": (rows,)})
    return out.getvalue()


def _read_header(fs: fsspec.AbstractFileSystem, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an .npy file, from a ranged read of its start."""
    head = fs.cat_file(path, start=0, end=_HEADER_BYTES)
    version = np.lib.format.read_magic(io.BytesIO(head))
    prefix = 10 if version == (1, 0) else 12  # magic, version, header length
    length = prefix + int.from_bytes(head[8:prefix], "little")
    if length > len(head):
        head = fs.cat_file(path, start=0, end=length)
    fh = io.BytesIO(head)
    np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    if fortran:
        raise ValueError(f"{path}: a Fortran-ordered array")
    return shape, dtype, length


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` by sorting: numpy 2 answers a plain `np.unique` with a hash table,
    12× slower than a sort on two million uint64 bucket keys here."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _pread_ranges(path: str, starts: list[int], stops: list[int]) -> list[bytes]:
    """The bytes [start, stop) of a local file for each range."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for start, stop in zip(starts, stops):
            data = os.pread(fd, stop - start, start)
            while len(data) < stop - start:  # a short read: go on from where it stopped
                more = os.pread(fd, stop - start - len(data), start + len(data))
                if not more:
                    raise OSError(f"{path}: bytes {start}-{stop} requested, the file ends at {start + len(data)}")
                data += more
            out.append(data)
        return out
    finally:
        os.close(fd)


class _Rows:
    """One .npy array file read by rows, by byte ranges after the header, so that rows are read,
    never the file. Local files too: through a memory map the pages a reduce touches stayed mapped,
    and the workers' resident memory grew with the corpus (1.32× for 5× the input on the benchmark,
    1.11× with ranged reads, which were also faster).

    `slice` reads forward: on an object store it keeps the rows of the last call from `lo` on, so
    the merge of `key_blocks` and its caller read each row of a file once."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        self.shape, self.dtype, self._offset = _read_header(fs, path)
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._buffer, self._buffer_lo = self._empty(), 0

    def __len__(self) -> int:
        return int(self.shape[0])

    def _empty(self) -> np.ndarray:
        return np.empty((0,) + tuple(self.shape[1:]), dtype=self.dtype)

    def _runs(self, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
        base, size = self._offset, self._row_bytes
        offsets, stops = (base + starts * size).tolist(), (base + ends * size).tolist()
        if isinstance(self.fs, LocalFileSystem):
            # One open and a pread per range: fsspec's cat_ranges opens a local file once per range,
            # and a reduce reads tens of thousands of ranges (half its time at 1 GB of input).
            return _pread_ranges(self.fs._strip_protocol(self.path), offsets, stops)
        return self.fs.cat_ranges([self.path] * len(starts), offsets, stops, on_error="raise")

    def _frombytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=self.dtype).reshape((-1,) + tuple(self.shape[1:]))

    def slice(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1."""
        buffer, start = self._buffer, self._buffer_lo
        if not start <= lo <= start + len(buffer):
            buffer, start = self._empty(), lo
        buffer = buffer[lo - start:]
        if lo + len(buffer) < hi:
            fresh = self._runs(np.array([lo + len(buffer)]), np.array([hi]))[0]
            buffer = np.concatenate([buffer, self._frombytes(fresh)])
        self._buffer, self._buffer_lo = buffer, lo
        return buffer[:hi - lo]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the positions `rows` (ascending, repeats allowed): one byte range per run of rows
        closer together than _GAP_BYTES."""
        if not len(rows):
            return self._empty()
        rows = np.asarray(rows, dtype=np.int64)
        gap = max(1, _GAP_BYTES // max(1, self._row_bytes))
        cut = np.flatnonzero(np.diff(rows) > gap) + 1
        first, last = np.r_[0, cut], np.r_[cut, len(rows)]
        starts, ends = rows[first], rows[last - 1] + 1
        data = self._frombytes(b"".join(self._runs(starts, ends)))
        run_at = np.r_[0, np.cumsum(ends - starts)[:-1]]
        run = np.repeat(np.arange(len(first)), last - first)
        return data[run_at[run] + rows - starts[run]]

    def searchsorted(self, keys: np.ndarray, side: str, sample: np.ndarray | None = None,
                     stride: int = CHUNK_ROWS) -> np.ndarray:
        """`np.searchsorted` of the sorted `keys` in this sorted 1-d file. It reads only the windows of `stride` rows that `sample` (every stride-th value of the file,
        from row 0) says hold the answers, some windows per request."""
        keys = np.asarray(keys, dtype=self.dtype)
        window = np.searchsorted(sample, keys, side=side) - 1  # window of each answer (-1: row 0)
        out = np.zeros(len(keys), dtype=np.int64)
        windows = np.unique(window[window >= 0])
        for lo in range(0, len(windows), 256):  # 256 windows (8 MiB of uint64 keys) at a time
            batch = windows[lo:lo + 256]
            starts = batch * stride
            ends = np.minimum(starts + stride, len(self))
            values = self._frombytes(b"".join(self._runs(starts, ends)))
            at = np.r_[0, np.cumsum(ends - starts)[:-1]]
            sel = slice(int(np.searchsorted(window, batch[0], side="left")),
                        int(np.searchsorted(window, batch[-1], side="right")))  # `window` ascends
            k = np.searchsorted(batch, window[sel])
            # an earlier window's values are all below the key (left; not above it: right), a later
            # window's all above it: the key's place in the concatenation falls in its own window
            found = np.searchsorted(values, keys[sel], side=side) - at[k]
            out[sel] = starts[k] + np.clip(found, 0, ends[k] - starts[k])
        return out


def key_blocks(files: Sequence[_Rows], block: int, key: Callable[[np.ndarray], np.ndarray]
               ) -> Iterator[list[tuple[int, int]]]:
    """Blocks of the rows of files sorted by key (`key` gives the keys of some rows), in ascending
    key order: per block, the row range (lo, hi) of each file. A block ends at a key boundary, so
    the rows of one key (a bucket) are never split between blocks; it holds `block` rows, fewer at
    the end, or more when its last key has more rows.

    A k-way merge that reads each file forward: the keys below the smallest last key read of the
    files not read to the end are all read, so the files with few rows read above that bound read
    on until `block` rows lie below it. What it holds at once: the block, and about a chunk of rows
    per file beyond it (CHUNK_ROWS, less when many files share the block; more where one key has
    more rows), i.e. memory per open file, not per record.
    """
    sizes = [len(f) for f in files]
    chunk = max(16, min(CHUNK_ROWS, block // max(1, len(files))))
    pos = [0] * len(files)  # first row not yet in a block
    end = [0] * len(files)  # first row not yet read
    keys = [np.empty(0, np.uint64) for _ in files]  # keys of rows pos..end

    def read_on(i: int, rows: int) -> None:
        stop = min(sizes[i], end[i] + rows)
        found = key(files[i].slice(pos[i], stop))
        new = found[max(0, end[i] - pos[i] - 1):]  # with the last row read before: the order across
        if len(new) > 1 and (new[1:] < new[:-1]).any():
            raise ValueError(f"{files[i].path} is not sorted by key (written by an older map stage?); "
                             "use a fresh work directory")
        keys[i], end[i] = found, stop

    for i in range(len(files)):
        read_on(i, chunk)
    while True:
        unread = [i for i, n in enumerate(sizes) if end[i] < n]
        bound = min(keys[i][-1] for i in unread) if unread else None  # every key below it is read
        below = [len(k) if bound is None else int(np.searchsorted(k, bound, side="left")) for k in keys]
        if unread and sum(below) < block:
            step = max(chunk, (block - sum(below)) // len(unread))
            for i in unread:
                if len(keys[i]) - below[i] < chunk or keys[i][-1] == bound:
                    read_on(i, step)
            continue
        if not sum(below):
            return
        if sum(below) > block:  # the block ends with the block-th smallest key, and all its rows
            last = np.partition(np.concatenate([k[:b] for k, b in zip(keys, below)]), block - 1)[block - 1]
            below = [int(np.searchsorted(k, last, side="right")) for k in keys]
        yield [(p, p + b) for p, b in zip(pos, below)]
        for i, b in enumerate(below):
            pos[i] += b
            keys[i] = keys[i][b:]
            if pos[i] == end[i] < sizes[i]:  # read on, so that the next bound knows this file
                read_on(i, chunk)


def _check_fingerprint(path: str, found: str | None, expected: str) -> None:
    """`expected`: `config.fingerprint()`, or `config.pairs_fingerprint()` for map and reduce files."""
    if found != expected:
        raise ValueError(f"{path} was written with another DedupConfig; use a fresh work directory")


def _paths(root: str, shard: int, partitions: int) -> dict[str, Any]:
    return {
        "signatures": f"{root}/signatures/{shard:05d}.npy",
        "exact": f"{root}/exact/{shard:05d}.npy",
        "facts": f"{root}/facts/{shard:05d}.npy",
        "buckets": [f"{root}/buckets/p{p:03d}/{shard:05d}.npy" for p in range(partitions)],
        "marker": f"{root}/map/{shard:05d}.json",
    }


# -- map ----------------------------------------------------------------------------------------
def band_keys(signatures: np.ndarray, config: DedupConfig) -> np.ndarray:
    """uint64 (docs, bands): one hash of the rows_per_band values of each band, band index mixed in.

    A random linear combination (mod 2^64) of the band's values, then a 64-bit mixer: vectorised,
    and two different bands of values collide with probability ~2^-32 at worst, which costs one
    needless signature comparison in the reduce, never a wrong pair.
    """
    n, r = config.bands, config.rows_per_band
    rng = np.random.Generator(np.random.PCG64([config.seed, 0xBA4D]))
    coef = rng.integers(0, 2**64, size=(n, r), dtype=np.uint64) | np.uint64(1)
    salt = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    values = signatures.astype(np.uint64).reshape(len(signatures), n, r)
    keys = (values * coef).sum(axis=2, dtype=np.uint64) + salt
    # mixed, so that the partition (key % partitions) and the exact-flag bit are uniform
    return mix64(keys) & ~EXACT_FLAG


def map_shard(dir: str, shard: int, texts: Sequence[str], config: DedupConfig,
              sources: Sequence[str | None] | None = None,
              qualities: Sequence[float | None] | None = None) -> None:
    """Map stage for one shard: signatures, exact keys, rank facts and partitioned bucket records.
    `sources` and `qualities` (the candidates' `source` and `quality` columns; None: unknown) rank
    the survivors of clusters (DedupConfig.survivor_order)."""
    fs, root = _fs(dir)
    paths = _paths(root, shard, config.partitions)
    if fs.exists(paths["marker"]):
        _check_fingerprint(paths["marker"], _load_json(fs, paths["marker"]).get("config"),
                           config.pairs_fingerprint())
        return
    if len(texts) >= 2**32:
        raise ValueError("a shard holds at most 2^32 documents (rows are uint32)")
    for name, column in (("sources", sources), ("qualities", qualities)):
        if column is not None and len(column) != len(texts):
            raise ValueError(f"{name}: {len(column)} values for {len(texts)} texts")
    cps, lengths = code_points(texts)
    ends = np.cumsum(lengths)
    keys = np.fromiter((xxhash.xxh3_64_intdigest(cps[e - l:e].astype("<u4", copy=False).tobytes())
                        for e, l in zip(ends.tolist(), lengths.tolist())),
                       dtype=np.uint64, count=len(texts))
    if config.fuzzy:
        signatures = MinHasher(config).signatures_from_code_points(cps, lengths)
    else:  # exact-only runs need no signatures; an empty column keeps the file layout
        signatures = np.zeros((len(texts), 0), dtype=np.uint32)
    del cps

    rows = np.arange(len(texts), dtype=np.uint32)
    parts: list[np.ndarray] = []
    if config.exact:
        parts.append(_records(keys | EXACT_FLAG, shard, rows))
    if config.fuzzy and len(texts):
        # a text with no characters left has no n-grams: the exact key alone handles it
        has_text = lengths > 0
        bands = band_keys(signatures[has_text], config)
        parts.append(_records(bands.ravel(), shard, np.repeat(rows[has_text], config.bands)))
    records = np.concatenate(parts) if parts else np.empty(0, dtype=RECORD)
    partition = records["key"] % np.uint64(config.partitions)
    # by partition, then key (the reduce merges the files by key), then row
    order = np.lexsort((records["row"], records["key"], partition))
    records, partition = records[order], partition[order]
    bounds = np.searchsorted(partition, np.arange(config.partitions + 1))
    for p, path in enumerate(paths["buckets"]):
        _save_array(fs, path, records[bounds[p]:bounds[p + 1]])
    facts, source_names = _facts(lengths, sources, qualities)
    _save_array(fs, paths["exact"], keys)
    _save_array(fs, paths["facts"], facts)
    _save_array(fs, paths["signatures"], signatures)
    _save_json(fs, paths["marker"], {"documents": len(texts), "records": int(len(records)),
                                     "empty": int((lengths == 0).sum()), "sources": source_names,
                                     "config": config.pairs_fingerprint()})


def _facts(lengths: np.ndarray, sources: Sequence[str | None] | None,
           qualities: Sequence[float | None] | None) -> tuple[np.ndarray, list[str]]:
    """FACT rows of a shard and its source names (FACT.source indexes them)."""
    facts = np.empty(len(lengths), dtype=FACT)
    facts["length"] = np.minimum(lengths, 2**32 - 1)
    names: dict[str, int] = {}
    facts["source"] = [names.setdefault(s or "", len(names)) for s in sources] if sources is not None else 0
    facts["quality"] = np.nan if qualities is None else \
        [np.nan if q is None else q for q in qualities]
    return facts, list(names) if sources is not None else [""]


def _records(keys: np.ndarray, shard: int, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(keys), dtype=RECORD)
    out["key"], out["shard"], out["row"] = keys, shard, rows
    return out


# -- reduce -------------------------------------------------------------------------------------
class _Signatures:
    """Rows of chosen documents from the map stage's per-shard files (signatures, exact keys,
    facts), read by rows (`_Rows`: byte ranges of the rows wanted), never a whole file.

    `locate(shard)` gives the map directory that holds a shard's files and its number there: by
    default the work directory itself (`root`, shard numbers as given); the incremental index
    (`cleaning.dedup_index`) points each shard at its own cached entry instead."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str,
                 locate: Callable[[int], tuple[str, int]] | None = None):
        self.fs, self.root = fs, root
        self.locate = locate or (lambda shard: (root, shard))
        self._files: dict[tuple[str, int], _Rows] = {}

    def _file(self, what: str, shard: int) -> str:
        directory, number = self.locate(shard)
        return f"{directory}/{what}/{number:05d}.npy"

    def _rows(self, what: str, shard: int) -> _Rows:
        # kept: the signature maps, and on an object store every file's header (no descriptor)
        if (what, shard) in self._files:
            return self._files[what, shard]
        rows = _Rows(self.fs, self._file(what, shard))
        if what == "signatures" or not isinstance(self.fs, LocalFileSystem):
            self._files[what, shard] = rows
        return rows

    def source_names(self, shard: int) -> list[str]:
        """The names that the shard's FACT.source values index (its map marker)."""
        directory, number = self.locate(shard)
        return _load_json(self.fs, f"{directory}/map/{number:05d}.json")["sources"]

    def take(self, gids: np.ndarray, what: str = "signatures") -> np.ndarray:
        """Rows for `gids` (any order); `what` is "signatures", "exact" or "facts"."""
        shards = (gids >> np.uint64(32)).astype(np.int64)
        rows = (gids & np.uint64(0xFFFFFFFF)).astype(np.int64)
        out = None
        for s in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == s)
            r = rows[sel]
            order = np.argsort(r, kind="stable")  # ascending reads: sequential pages, fewer ranges
            block = self._rows(what, s).take(r[order])
            if out is None:
                out = np.empty((len(gids),) + block.shape[1:], dtype=block.dtype)
            out[sel[order]] = block
        if out is None:
            out = {"exact": np.empty(0, np.uint64), "facts": np.empty(0, FACT)}.get(
                what, np.empty((0, 0), np.uint32))
        return out


def _similarity(sigs: _Signatures, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Estimated Jaccard of pairs of documents, in chunks so the gathered rows stay small."""
    # float64: the comparison with the threshold must not see a float32 rounding (0.7 -> 0.69999)
    out = np.empty(len(a), dtype=np.float64)
    for lo in range(0, len(a), chunk):
        sa, sb = sigs.take(a[lo:lo + chunk]), sigs.take(b[lo:lo + chunk])
        out[lo:lo + chunk] = estimated_jaccard(sa, sb) if sa.shape[1] else 0.0
    return out


def reduce_partition(dir: str, partition: int, config: DedupConfig) -> None:
    """Reduce stage for one partition: group equal keys, emit confirmed pairs. The shards' sorted
    bucket files are merged block by block (`key_blocks`); a bucket's pairs depend on its own
    members only (`star_pairs`), so the blocks' pairs are the partition's, whatever the block size
    (only the `checked` count can differ: a pair that two buckets of one block share is compared once)."""
    fs, root = _fs(dir)
    out = f"{root}/pairs/p{partition:03d}.npy"
    stats_path = f"{root}/pairs/p{partition:03d}.json"
    if fs.exists(out):
        _check_fingerprint(out, _load_json(fs, stats_path).get("config"), config.pairs_fingerprint())
        return
    folder = f"{root}/buckets/p{partition:03d}"
    paths = sorted(p for p in fs.ls(folder, detail=False) if _SHARD_FILE.match(p.rsplit("/", 1)[-1])) \
        if fs.exists(folder) else []
    files = [_Rows(fs, path) for path in paths]
    sigs = _Signatures(fs, root)
    found, counts = [], {"grouped": 0, "checked": 0}
    for ranges in key_blocks(files, config.reduce_block_records, _record_keys):
        records = np.concatenate([f.slice(lo, hi) for f, (lo, hi) in zip(files, ranges)])
        pairs, done = star_pairs(records, sigs, config)
        found = merge_parts(found, pairs, _unique_pairs)
        counts = {k: counts[k] + done[k] for k in counts}
    found = _unique_pairs(np.concatenate(found + [np.empty(0, dtype=PAIR)]))
    _save_json(fs, stats_path, {"records": sum(len(f) for f in files), **counts, "confirmed": int(len(found)),
                                "config": config.pairs_fingerprint()})
    _save_array(fs, out, found)


def _record_keys(records: np.ndarray) -> np.ndarray:
    return records["key"]


def merge_parts(parts: list[np.ndarray], part: np.ndarray, merge: Callable[[np.ndarray], np.ndarray]
                ) -> list[np.ndarray]:
    """`parts` and `part`, merged (`merge` of their concatenation) once the unmerged ones outgrow
    the merged one: a pair that many buckets of many blocks confirm is held about once, not once
    a bucket, so the pairs of a reduce stay within a few times the pair count."""
    parts = parts + [part]
    if sum(len(p) for p in parts[1:]) > len(parts[0]) + _MERGE_SLACK:
        parts = [merge(np.concatenate(parts))]
    return parts


def star_pairs(records: np.ndarray, sigs: _Signatures, config: DedupConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The confirmed pairs of the buckets that `records` (RECORD) hold, one row per bucket that
    confirms a pair (a pair found in several buckets comes once per bucket: `_unique_pairs` merges
    them), and the counts `grouped` (records in buckets of two or more) and `checked` (signature
    comparisons made).

    What a bucket yields depends only on its own members and their (shard, row) order, never on
    other buckets: the incremental index relies on this to redo only the buckets a refresh touches.
    """
    # sorted by key, then (shard, row): the first member of a group is its smallest document
    records = records[np.lexsort((records["row"], records["shard"], records["key"]))]
    key = records["key"]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, len(key)])
    in_group = np.repeat(sizes > 1, sizes)
    records, group = records[in_group], np.repeat(np.arange(len(sizes)), sizes)[in_group]
    ids = gid(records["shard"], records["row"])
    exact = (records["key"] & EXACT_FLAG) != 0

    pairs: list[np.ndarray] = []
    # Exact groups: equality is transitive, so a star to the smallest member is the whole group.
    e_ids, e_group = ids[exact], group[exact]
    first = np.r_[True, e_group[1:] != e_group[:-1]] if len(e_group) else np.empty(0, bool)
    if len(e_ids):
        pivot = e_ids[first][np.cumsum(first) - 1]
        pairs.append(_pairs(pivot[~first], e_ids[~first], EXACT, np.ones((~first).sum(), np.float32)))

    # LSH groups: similarity is not transitive. Each round compares every remaining member with
    # the smallest remaining member of its bucket (vectorised over all buckets); confirmed members
    # and the pivots leave, the others try again with the next pivot, so two similar members of a
    # bucket whose first member is unrelated to them still meet.
    checked = 0
    l_ids, l_group = ids[~exact], group[~exact]
    remaining = np.ones(len(l_ids), dtype=bool)
    while remaining.any():
        idx = np.flatnonzero(remaining)
        g = l_group[idx]
        first = np.r_[True, g[1:] != g[:-1]]
        pivot = idx[first][np.cumsum(first) - 1]
        others, pivot = idx[~first], pivot[~first]
        remaining[idx[first]] = False
        if not len(others):
            break
        # a pair that shares several bands is compared once
        wanted = np.empty(len(others), dtype=[("a", "<u8"), ("b", "<u8")])
        wanted["a"], wanted["b"] = l_ids[pivot], l_ids[others]
        distinct, back = np.unique(wanted, return_inverse=True)
        sim = _similarity(sigs, distinct["a"], distinct["b"])[back.reshape(-1)]
        checked += len(distinct)
        ok = sim >= config.threshold
        pairs.append(_pairs(l_ids[pivot[ok]], l_ids[others[ok]], NEAR, sim[ok]))
        remaining[others[ok]] = False
    return (np.concatenate(pairs) if pairs else np.empty(0, dtype=PAIR)), {"grouped": int(len(ids)), "checked": checked}


def _pairs(a: np.ndarray, b: np.ndarray, kind: int, similarity: np.ndarray) -> np.ndarray:
    out = np.empty(len(a), dtype=PAIR)
    out["a"], out["b"], out["kind"], out["similarity"] = a, b, kind, similarity
    return out


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    # a pair met in several bands (or as exact and near) is kept once, exact first
    pairs = pairs[np.lexsort((pairs["kind"], pairs["b"], pairs["a"]))]
    keep = np.r_[True, (pairs["a"][1:] != pairs["a"][:-1]) | (pairs["b"][1:] != pairs["b"][:-1])] \
        if len(pairs) else np.empty(0, bool)
    return pairs[keep]


# -- cluster ------------------------------------------------------------------------------------
def _components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Smallest node index of each node's connected component (vectorised union-find).

    Hooking: every edge points the larger of its two roots at the smaller (np.minimum.at resolves
    conflicts); pointer jumping then flattens the trees. parent[x] <= x always holds, so the
    forest never has a cycle and the root of a component is its smallest node.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        low = np.minimum(pa[differ], pb[differ])
        np.minimum.at(parent, pa[differ], low)
        np.minimum.at(parent, pb[differ], low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def cluster(dir: str, num_shards: int, config: DedupConfig) -> DedupSummary:
    """Clusters of confirmed pairs, one deterministic survivor each; writes duplicates per shard.

    Chaining guard: pairs only say "these two are similar", and similarity is not transitive
    (A~B, B~C with A and C unrelated). So the connected components of the pairs are only the
    places to look; inside a component every document is checked directly against the
    representative, the best-ranked document not yet placed (`survivor_positions`: the keys of
    DedupConfig.survivor_order, then (shard, row) order): it joins that cluster if its exact key
    equals the representative's or the estimated Jaccard of the two signatures is >= threshold.
    The documents that fail stay in play, and the best-ranked of them is the next representative
    (a survivor). So every removed document is itself confirmed against the survivor that
    replaces it, and a chain can never glue unrelated documents into one cluster.
    """
    fs, root = _fs(dir)
    summary_path = f"{root}/summary.json"
    if fs.exists(summary_path):
        saved = _load_json(fs, summary_path)
        _check_fingerprint(summary_path, saved.pop("config", None), config.fingerprint())
        if saved.pop("num_shards", None) == num_shards:
            return DedupSummary(**saved)

    pairs, checked = [], 0
    for p in range(config.partitions):
        path = f"{root}/pairs/p{p:03d}.npy"
        if not fs.exists(path):
            raise FileNotFoundError(f"{path}: reduce_partition({p}) has not finished")
        pairs.append(_load_array(fs, path))
        checked += int(_load_json(fs, f"{root}/pairs/p{p:03d}.json")["checked"])
    found = _unique_pairs(np.concatenate(pairs))
    documents = 0
    for s in range(num_shards):
        marker = f"{root}/map/{s:05d}.json"
        if not fs.exists(marker):
            raise FileNotFoundError(f"{marker}: map_shard({s}) has not finished")
        documents += int(_load_json(fs, marker)["documents"])

    nodes = sorted_unique(np.concatenate([found["a"], found["b"]]))
    component = _components(np.searchsorted(nodes, found["a"]), np.searchsorted(nodes, found["b"]),
                            len(nodes))
    survivor, kind, representatives = assign_survivors(nodes, component, _Signatures(fs, root), config)

    is_dup = survivor != np.arange(len(nodes))
    components = int(len(np.unique(component))) if len(nodes) else 0
    dup_gid, surv_gid, dup_kind = nodes[is_dup], nodes[survivor[is_dup]], kind[is_dup]
    save_duplicates(fs, root, num_shards, dup_gid, surv_gid, dup_kind)

    summary = DedupSummary(
        documents=documents,
        clusters=int(len(np.unique(survivor[is_dup]))),
        exact_duplicates=int((dup_kind == EXACT).sum()),
        near_duplicates=int((dup_kind == NEAR).sum()),
        pairs_checked=checked,
        pairs_confirmed=int(len(found)),
        chain_splits=representatives - components,
    )
    _save_json(fs, summary_path, {**summary.to_json(), "num_shards": num_shards,
                                  "config": config.fingerprint()})
    return summary


def save_duplicates(fs: fsspec.AbstractFileSystem, root: str, num_shards: int, dup_gid: np.ndarray,
                    surv_gid: np.ndarray, dup_kind: np.ndarray) -> None:
    """`duplicates/{shard:05d}.npy` for every shard (empty ones too), rows in order."""
    dup_shard = (dup_gid >> np.uint64(32)).astype(np.int64)
    for s in range(num_shards):
        sel = dup_shard == s
        rows = np.empty(int(sel.sum()), dtype=DUPLICATE)
        rows["row"] = dup_gid[sel] & np.uint64(0xFFFFFFFF)
        rows["survivor_shard"] = surv_gid[sel] >> np.uint64(32)
        rows["survivor_row"] = surv_gid[sel] & np.uint64(0xFFFFFFFF)
        rows["kind"] = dup_kind[sel]
        _save_array(fs, f"{root}/duplicates/{s:05d}.npy", rows[np.argsort(rows["row"], kind="stable")])


def assign_survivors(nodes: np.ndarray, component: np.ndarray, sigs: _Signatures,
                     config: DedupConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """The chaining-guarded survivor of every node (see `cluster`): for sorted gids `nodes` and
    their component labels, the node index of each one's survivor, the kind (EXACT / NEAR) of
    each duplicate, and the number of representatives. Components are independent of each other,
    so the nodes of some whole components give the same answer for them as all nodes would (a
    node's rank depends on its own facts and gid only)."""
    survivor = np.arange(len(nodes))             # node index of each node's survivor
    kind = np.zeros(len(nodes), dtype=np.uint8)
    exact_keys = sigs.take(nodes, "exact")
    position = survivor_positions(nodes, sigs, config)
    representatives = 0
    unplaced = np.ones(len(nodes), dtype=bool)
    while unplaced.any():
        idx = np.flatnonzero(unplaced)
        idx = idx[np.lexsort((position[idx], component[idx]))]  # by component, best-ranked first
        comp = component[idx]
        first = np.r_[True, comp[1:] != comp[:-1]]
        rep = idx[first][np.cumsum(first) - 1]
        members, rep = idx[~first], rep[~first]
        unplaced[idx[first]] = False
        representatives += int(first.sum())
        same = exact_keys[members] == exact_keys[rep]
        ok = same.copy()
        if config.fuzzy and (~same).any():
            ok[~same] = _similarity(sigs, nodes[members[~same]], nodes[rep[~same]]) >= config.threshold
        survivor[members[ok]] = rep[ok]
        kind[members[ok]] = np.where(same[ok], EXACT, NEAR)
        unplaced[members[ok]] = False
    return survivor, kind, representatives


def survivor_positions(nodes: np.ndarray, sigs: _Signatures, config: DedupConfig) -> np.ndarray:
    """Place of each of the sorted gids `nodes` in the survivor order (0: the best): the keys of
    `config.survivor_order` in turn, higher wins, then gid order. Reads the map stage's FACT rows
    of these documents (and, for "priority", their shards' source names), never a text."""
    keys = [np.arange(len(nodes))]  # nodes are sorted: the last resort is (shard, row) order
    facts = sigs.take(nodes, "facts") if config.survivor_order else None
    for key in reversed(config.survivor_order):  # np.lexsort: the last key is the primary one
        if key == "priority":
            keys.append(-_priorities(nodes, facts["source"], sigs, config.source_priority))
        elif key == "quality":
            quality = facts["quality"].astype(np.float64)
            keys.append(-np.where(np.isnan(quality), NEUTRAL_QUALITY, quality))
        else:
            keys.append(-facts["length"].astype(np.int64))
    position = np.empty(len(nodes), dtype=np.int64)
    position[np.lexsort(keys)] = np.arange(len(nodes))
    return position


def _priorities(nodes: np.ndarray, source: np.ndarray, sigs: _Signatures,
                source_priority: dict[str, int]) -> np.ndarray:
    out = np.zeros(len(nodes), dtype=np.int64)
    if not source_priority:
        return out
    shards = (nodes >> np.uint64(32)).astype(np.int64)
    for s in np.unique(shards).tolist():
        sel = shards == s
        table = np.array([source_priority.get(name, 0) for name in sigs.source_names(s)], dtype=np.int64)
        out[sel] = table[source[sel]]
    return out


def load_duplicates(dir: str, shard: int) -> dict[int, tuple[int, int, str]]:
    """row -> (survivor_shard, survivor_row, "exact" | "near") for the duplicates of one shard."""
    fs, root = _fs(dir)
    rows = _load_array(fs, f"{root}/duplicates/{shard:05d}.npy")
    return {int(r["row"]): (int(r["survivor_shard"]), int(r["survivor_row"]), KIND_NAMES[int(r["kind"])])
            for r in rows}
