"""Expanding INPUT arguments (files, directories, globs; any fsspec URI) into input shards."""
from __future__ import annotations

import glob as globlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import fsspec
import xxhash

from cleaning.readers import is_supported


@dataclass(frozen=True)
class InputShard:
    index: int
    uri: str
    content_hash: str  # xxh3-128 of the file's bytes; "" when the file could not be read
    size: int
    error: str | None = None  # set when the input could not be listed or hashed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _has_magic(path: str) -> bool:
    return globlib.has_magic(path)


def expand_inputs(inputs: Iterable[str], storage_options: dict | None = None) -> list[tuple[str, str | None]]:
    """(uri, error) pairs in a stable order. A path that does not exist is kept with its error,
    so that the run reports it instead of silently building a corpus without it."""
    found: dict[str, str | None] = {}
    for raw in inputs:
        fs, path = fsspec.core.url_to_fs(raw, **(storage_options or {}))
        if _has_magic(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p) and is_supported(p)]
            if not matches:
                found[raw] = f"glob matched no supported input files: {raw}"
            for match in matches:
                found.setdefault(fs.unstrip_protocol(match), None)
        elif fs.isdir(path):
            files = [p for p in fs.find(path) if is_supported(p) and not _hidden(p)]
            if not files:
                found[raw] = f"directory holds no supported input files: {raw}"
            for file in files:
                found.setdefault(fs.unstrip_protocol(file), None)
        elif fs.exists(path):
            found.setdefault(fs.unstrip_protocol(path), None)
        else:
            found[raw] = f"input not found: {raw}"
    return sorted(found.items())


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def content_hash(uri: str, storage_options: dict | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
    h = xxhash.xxh3_128()
    size = 0
    with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def file_signature(uri: str, storage_options: dict | None = None) -> str:
    """Cheap change detector (size + modification time or ETag) that gates re-hashing."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return f"{info.get('size')}:{stamp}"
