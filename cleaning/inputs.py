"""Expanding INPUT arguments (files, directories, globs; any fsspec URI) into input shards."""
from __future__ import annotations

import glob as globlib
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

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
    name: str = ""  # path relative to the input root: the prefix of generated document ids

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


def input_root(raw: str, storage_options: dict | None = None) -> str:
    """The directory an INPUT argument names files under, as a URI: the directory itself, the part
    of a glob before its first wildcard, or a file's parent directory."""
    fs, path = fsspec.core.url_to_fs(raw, **(storage_options or {}))
    if _has_magic(path):
        parts = path.split("/")
        root = "/".join(parts[:next(i for i, part in enumerate(parts) if _has_magic(part))])
    elif fs.isdir(path):
        root = path
    else:
        root = posixpath.dirname(path.rstrip("/"))
    return fs.unstrip_protocol(root.rstrip("/") or "/")


def _split(uri: str) -> tuple[str, list[str]]:
    protocol, _, path = uri.rpartition("://")
    return protocol, path.rstrip("/").split("/")


def input_names(inputs: Iterable[str], entries: Sequence[tuple[str, str | None]],
                storage_options: dict | None = None) -> dict[str, str]:
    """Each entry of `expand_inputs` named by its path relative to the input root, the deepest
    directory that holds the root of every INPUT argument that was found. Distinct URIs give
    distinct names, so ids made from them are unique across the whole input
    (`crawl2019/part-00000.jsonl` and `crawl2020/part-00000.jsonl` stay apart), and a name does not
    change when files are added under the same arguments."""
    missing = {uri for uri, error in entries if error}
    roots = []
    for raw in inputs:
        if raw in missing:
            continue
        try:
            roots.append(_split(input_root(raw, storage_options)))
        except (OSError, ValueError):  # an argument that cannot be resolved: its error is reported
            continue
    protocols = {protocol for protocol, _ in roots}
    common: list[str] = []
    if len(protocols) == 1:
        common = roots[0][1]
        for _, parts in roots[1:]:
            n = 0
            while n < min(len(common), len(parts)) and common[n] == parts[n]:
                n += 1
            common = common[:n]
    names = {}
    for uri, _ in entries:
        try:
            fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
            protocol, parts = _split(fs.unstrip_protocol(path))
        except (OSError, ValueError):
            protocol, parts = "", []
        inside = len(protocols) == 1 and protocol in protocols and parts[:len(common)] == common \
            and len(parts) > len(common)
        names[uri] = "/".join(parts[len(common):]) if inside else uri
    return names


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
