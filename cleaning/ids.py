"""Document ids across the whole input: how generated ids are made, and the check that finds ids
held by more than one document.

Generated ids (`generated_id`: `NAME:LINE`, NAME the path relative to the input root, or the name the
file had in the version a refresh extends (`inputs.input_names`), so that ids stay put; `NAME:LINE#K`
for the K-th piece of a plain-text block cut to a bounded size; `NAME` alone for a file that is one
document, a web page) are unique by construction: NAMEs are distinct, and an id with a line ends
in `:LINE` or `:LINE#K`, which no supported file name does. Explicit ids (the records' own `id`
field) are the input's, and two inputs may share one. Such a collision is reported in the
manifest, never merged: both documents stay, each accounted for.

The clean stage writes each shard's id keys (uint64 xxh3 of the id, sorted) beside its outputs;
`find_collisions` merges them one range of the key space at a time, so memory holds about
`budget` keys whatever the size of the corpus.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import fsspec
import numpy as np
import xxhash

from cleaning.dedup import _load_array, _save_array


def generated_id(name: str, line: int | None = None, piece: int | None = None) -> str:
    """The id of a record that has none of its own: file NAME, the line (or row) it starts on, and
    its piece number when one record was cut into several documents."""
    if line is None:
        return name
    return f"{name}:{line}" if piece is None else f"{name}:{line}#{piece}"


def id_key(doc_id: str) -> int:
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8", "surrogatepass"))


def save_keys(uri: str, keys: Iterable[int]) -> None:
    """The sorted id keys of one shard, written atomically (temporary name, then rename)."""
    fs, path = fsspec.core.url_to_fs(uri)
    _save_array(fs, path, np.sort(np.asarray(keys, dtype=np.uint64)))


@dataclass
class Collisions:
    ids: int = 0  # ids held by more than one document
    documents: int = 0  # documents beyond the first of each such id
    examples: dict[int, list[int]] = field(default_factory=dict)  # key -> indexes of the files holding it


def find_collisions(key_files: Sequence[str | None], total: int, budget: int = 1 << 25,
                    examples: int = 10) -> Collisions:
    """Keys held more than once across the sorted key files (None: a shard with no file)."""
    found = Collisions()
    ranges = max(1, -(-total // budget))
    bounds = [(r << 64) // ranges for r in range(ranges)]
    for r, low in enumerate(bounds):
        keys, owners = [], []
        for index, uri in enumerate(key_files):
            if uri is None:
                continue
            fs, path = fsspec.core.url_to_fs(uri)
            array = _load_array(fs, path, mmap=True)  # a memory map on local disk; one shard elsewhere
            start = int(np.searchsorted(array, np.uint64(low)))
            stop = int(np.searchsorted(array, np.uint64(bounds[r + 1]))) if r + 1 < ranges else len(array)
            keys.append(np.asarray(array[start:stop]))
            owners.append(np.full(stop - start, index, dtype=np.int64))
        if not keys:
            continue
        merged, owner = np.concatenate(keys), np.concatenate(owners)
        order = np.argsort(merged, kind="stable")
        merged, owner = merged[order], owner[order]
        repeat = merged[1:] == merged[:-1]
        if not repeat.any():
            continue
        found.documents += int(repeat.sum())
        colliding = np.unique(merged[1:][repeat])
        found.ids += len(colliding)
        for key in colliding[: max(0, examples - len(found.examples))].tolist():
            found.examples[key] = sorted(set(owner[merged == key].tolist()))
    return found
