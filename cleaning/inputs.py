"""Expanding INPUT arguments (files, directories, globs; any fsspec URI) into input shards."""
from __future__ import annotations

import glob as globlib
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import fsspec
import xxhash

import pyarrow.parquet as pq

from cleaning.compression import compression
from cleaning.readers import (JSON_SNIFF_BYTES, PARQUET_MAGIC, UNPACK_HINT, detect_format, is_json_document,
                              is_supported, supported_suffixes, utf16_codec)

#: a part of a large input: (start, stop, records before start, bytes): byte offsets of a JSON-lines
#: file, cut just after a newline, or row-group numbers of a Parquet file
Part = tuple[int, int, int, int]


@dataclass(frozen=True)
class InputShard:
    """One unit of work of the build: a whole input file, or a part of a large one (`part`), so that
    a task's memory is bounded by the shard size, not by the largest input."""

    index: int
    uri: str
    content_hash: str  # xxh3-128 of the whole file's bytes; "" when the file could not be read
    size: int  # bytes of the shard (of its part, for a part)
    error: str | None = None  # set when the input could not be listed or hashed
    name: str = ""  # path relative to the input root: the prefix of generated document ids
    part: Part | None = None  # None: the whole file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _has_magic(path: str) -> bool:
    return globlib.has_magic(path)


# What `datasets.save_to_disk` writes beside a Hugging Face dataset's .arrow files: descriptions of the
# dataset, not its text.
_DATASET_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}


def _without_dataset_metadata(paths: list[str]) -> list[str]:
    """`paths` without the metadata files of Hugging Face datasets saved to disk (`_DATASET_METADATA` in a
    directory that holds .arrow files, or above one)."""
    arrow_dirs = {posixpath.dirname(p) for p in paths if p.lower().endswith(".arrow")}

    def metadata(path: str) -> bool:
        folder = posixpath.dirname(path)
        return posixpath.basename(path) in _DATASET_METADATA and any(
            d == folder or d.startswith(folder + "/") for d in arrow_dirs)

    return [p for p in paths if not metadata(p)] if arrow_dirs else paths


def _outside(fs: Any, roots: Sequence[str]) -> Callable[[str], bool]:
    """Whether a path of `fs` lies outside every one of `roots` (URIs or paths, normalised by `fs`)."""
    prefixes = [fs._strip_protocol(root).rstrip("/") + "/" for root in roots]
    return lambda path: not any(path.startswith(prefix) for prefix in prefixes)


def _undecodable_name(uri: str) -> str | None:
    """The error of a file whose name is not valid UTF-8 (Python holds its bytes as surrogates, which no
    manifest, id or cache key can hold), with the name's bad bytes shown as U+FFFD; None for a good name."""
    try:
        uri.encode("utf-8")
        return None
    except UnicodeEncodeError:
        shown = uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return f"file name is not valid UTF-8: {shown}: rename it to read it"


def expand_inputs(inputs: Iterable[str], storage_options: dict | None = None,
                  unsupported: list[str] | None = None, exclude: Sequence[str] = (),
                  excluded: list[str] | None = None) -> list[tuple[str, str | None]]:
    """(uri, error) pairs in a stable order. A path that does not exist is kept with its error,
    so that the run reports it instead of silently building a corpus without it. The files a directory
    or glob holds that no reader takes (a PDF, an image) are appended to `unsupported`, to be reported;
    a saved Hugging Face dataset's metadata files are neither. Files a directory or glob holds under one
    of `exclude` (the build's own output, where it lies inside an input directory) are left out and
    appended to `excluded`: a rebuild read its own output back as input."""
    found: dict[str, str | None] = {}
    for raw in inputs:
        fs, path = fsspec.core.url_to_fs(raw, **(storage_options or {}))
        outside = _outside(fs, exclude)

        def kept(paths: list[str]) -> list[str]:
            if excluded is not None:
                excluded.extend(fs.unstrip_protocol(p) for p in paths if not outside(p))
            return [p for p in paths if outside(p)]

        if _has_magic(path):
            listed = kept(_without_dataset_metadata([p for p in fs.glob(path) if fs.isfile(p)]))
            matches = [p for p in listed if is_supported(p)]
            if unsupported is not None:
                unsupported += [fs.unstrip_protocol(p) for p in listed if not is_supported(p)]
            if not matches:
                found[raw] = f"glob matched no supported input files: {raw}"
            for match in matches:
                _add(found, fs.unstrip_protocol(match))
        elif fs.isdir(path):
            listed = kept(_without_dataset_metadata([p for p in fs.find(path) if not _hidden(p)]))
            files = [p for p in listed if is_supported(p)]
            if unsupported is not None:
                unsupported += [fs.unstrip_protocol(p) for p in listed if not is_supported(p)]
            if not files:
                found[raw] = f"directory holds no supported input files: {raw}" + (
                    f": {describe_unsupported(unsupported_summary([fs.unstrip_protocol(p) for p in listed]))}"
                    if listed else "")
            for file in files:
                _add(found, fs.unstrip_protocol(file))
        elif fs.exists(path):
            if is_supported(path):
                _add(found, fs.unstrip_protocol(path))
            else:  # named on its own: refused by name, where a directory's such files are only counted
                found[raw] = not_an_input(raw)
        else:
            found[raw] = f"input not found: {raw}"
    return sorted(found.items())


def _add(found: dict[str, str | None], uri: str) -> None:
    """`uri` found: to read, or, where its name is not UTF-8, reported under a printable name."""
    error = _undecodable_name(uri)
    if error is None:
        found.setdefault(uri, None)
    else:
        found[uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")] = error


_ARCHIVES = ((".zip", "a zip archive"), (".7z", "a 7z archive"), (".rar", "a rar archive"), (".tgz", "a tar archive"))
_TAR = re.compile(r"\.tar(\.[a-z0-9]+)?$")


def _archive(path: str) -> str | None:
    """What kind of archive `path` names by its suffix, or None."""
    lowered = path.lower()
    if _TAR.search(lowered):
        return "a tar archive"
    return next((what for suffix, what in _ARCHIVES if lowered.endswith(suffix)), None)


def not_an_input(path: str) -> str:
    """Why a file no reader takes, given by name, is not read."""
    archive = _archive(path)
    if archive:
        return f"{path}: {archive}, which is not read: {UNPACK_HINT}"
    return f"{path}: not an input format (expected {supported_suffixes()})"


def unsupported_summary(uris: Sequence[str], shown: int = 5) -> dict[str, Any]:
    """The manifest's record of the files found but not read: how many, per suffix, the first few."""
    by_suffix = Counter(posixpath.splitext(uri.rsplit("/", 1)[-1])[1].lower() or "(none)" for uri in uris)
    return {"files": len(uris), "by_suffix": dict(sorted(by_suffix.items())), "first": sorted(uris)[:shown]}


def describe_unsupported(summary: dict[str, Any]) -> str:
    """One sentence on an `unsupported_summary`, for the log and the corpus report alike."""
    kinds = ", ".join(f"{n:,} {suffix}" for suffix, n in summary["by_suffix"].items())
    archives = any(_archive(f"x{suffix}") for suffix in summary["by_suffix"])
    return (f"{summary['files']:,} file(s) of a kind no reader takes ({kinds}; first: {summary['first'][0]})"
            + ("; archives are not read: unpack them and give their files" if archives else ""))


def require_some_input(inputs: Sequence[str], entries: Sequence[tuple[str, str | None]], shown: int = 3) -> None:
    """Raises FileNotFoundError, naming the INPUT arguments, when none of them holds a file to read
    (`entries` of `expand_inputs` all have an error): a build would make an empty corpus version.
    When at least one input is found, the missing ones are only reported: the run goes on."""
    if any(error is None for _, error in entries):
        return
    kinds = f"a file, a directory of {supported_suffixes()} files, or a glob"
    given = list(inputs)
    if not given:
        raise FileNotFoundError(f"no input given ({kinds})")
    named = ", ".join(given[:shown]) + (f", ... ({len(given) - shown} more)" if len(given) > shown else "")
    count = f" in {len(given)} inputs" if len(given) > 1 else ""
    refused = [error for _, error in entries if error and any(why in error for why in (
        " which is not read: ", ": not an input format ", " of a kind no reader takes "))]
    if refused:  # files that are there, that no reader takes: why, not "not found"
        more = f"; ... ({len(refused) - shown} more)" if len(refused) > shown else ""
        raise FileNotFoundError(f"no input to read{count}: " + "; ".join(refused[:shown]) + more)
    raise FileNotFoundError(f"no input found{count}: {named} ({kinds})")


def check_some_input(inputs: Sequence[str], exclude: Sequence[str] = ()) -> None:
    """`require_some_input` on a listing of `inputs` (as a build lists them, `exclude` left out): what a
    command checks before it starts anything."""
    require_some_input(inputs, expand_inputs(inputs, exclude=exclude))


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
                storage_options: dict | None = None, earlier: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each entry of `expand_inputs` named by its path relative to the input root, the deepest
    directory that holds the root of every INPUT argument that was found. Distinct URIs give
    distinct names, so ids made from them are unique across the whole input
    (`crawl2019/part-00000.jsonl` and `crawl2020/part-00000.jsonl` stay apart).

    `earlier` maps the URIs of a previous version's inputs to the names they had there: such a file
    keeps its name, so that its documents keep their ids (and its cleaned shards are reused) when an
    input from another directory is added or one is dropped and the input root moves. A new file
    whose relative name an earlier file already holds is named by its full URI, which no relative
    name equals (relative names hold no "://")."""
    earlier = earlier or {}
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
    kept = {earlier[uri] for uri, _ in entries if uri in earlier}
    names = {}
    for uri, _ in entries:
        if uri in earlier:
            names[uri] = earlier[uri]
            continue
        try:
            fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
            protocol, parts = _split(fs.unstrip_protocol(path))
        except (OSError, ValueError):
            protocol, parts = "", []
        inside = len(protocols) == 1 and protocol in protocols and parts[:len(common)] == common \
            and len(parts) > len(common)
        name = "/".join(parts[len(common):]) if inside else uri
        names[uri] = uri if name in kept else name
    return names


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def content_hash(uri: str, storage_options: dict | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
    """xxh3-128 of a file's bytes, and its size."""
    digest, size, _ = hash_and_split(uri, 0, storage_options, chunk)
    return digest, size


def remembered_content_hash(uri: str, memo: str) -> str:
    """`content_hash(uri)`'s digest, remembered in the JSON file `memo` with the file's `file_signature`: an
    unchanged file (a checkpoint of many GB, evaluated again) is not read again."""
    from cleaning.writers import read_json, write_json_atomic

    signature = file_signature(uri)
    try:
        remembered = read_json(memo)
    except (OSError, ValueError):  # none yet, or damaged: hashed again below
        remembered = {}
    if isinstance(remembered, dict) and (remembered.get("uri"), remembered.get("signature")) == (uri, signature) \
            and signature.split(":", 1)[1]:  # no modification time: nothing to trust
        return remembered["hash"]
    digest, _ = content_hash(uri)
    write_json_atomic(memo, {"uri": uri, "signature": signature, "hash": digest})
    return digest


def hash_and_split(uri: str, shard_bytes: int, storage_options: dict | None = None,
                   chunk: int = 1 << 20) -> tuple[str, int, list[Part]]:
    """A file's content hash and size and, when it is larger than `shard_bytes` (> 0) and can be
    cut, its parts, found in the same single read. A JSON-lines file is cut just after the first
    newline at or past every `shard_bytes`, and each part records the lines before it (so ids,
    `NAME:LINE`, are the same as when the file is read whole); a Parquet file is cut between row
    groups of about `shard_bytes` compressed bytes. Compressed streams, plain text, web pages, a .json file that is one
    JSON document (`cleaning.readers.is_json_document`), UTF-16 (`cleaning.readers.utf16_codec`: a 0x0A byte
    of it need not end a line) and a file whose first `JSON_SNIFF_BYTES` are ASCII stay whole."""
    h = xxhash.xxh3_128()
    size = lines = 0
    cuts: list[tuple[int, int]] = []  # (byte offset just after a newline, lines before it)
    splittable = shard_bytes > 0 and detect_format(uri) == "jsonl"
    target = shard_bytes
    with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            opening = block[:JSON_SNIFF_BYTES]
            if size == 0 and (compression(block) or block.startswith(PARQUET_MAGIC) or is_json_document(opening)
                              or utf16_codec(opening) or (len(block) > len(opening) and opening.isascii())):
                # read whole: a stream, row groups (below), one JSON value, UTF-16, or an ASCII opening, whose
                # encoding its first other bytes decide (cleaning.readers: each part would decide its own)
                splittable = False
            h.update(block)
            if splittable:
                while size + len(block) > target:
                    newline = block.find(b"\n", max(0, target - size))
                    if newline < 0:
                        break  # the cut falls in the next block
                    cut = size + newline + 1
                    cuts.append((cut, lines + block.count(b"\n", 0, newline + 1)))
                    target = cut + shard_bytes
                lines += block.count(b"\n")
            size += len(block)
    digest = h.hexdigest()
    if splittable:
        bounds = [(0, 0)] + [c for c in cuts if c[0] < size] + [(size, lines)]
        parts = [(start, stop, before, stop - start) for (start, before), (stop, _) in zip(bounds, bounds[1:])]
        return digest, size, parts if len(parts) > 1 else []
    if shard_bytes > 0 and size > shard_bytes and (detect_format(uri) == "parquet" or _is_parquet(uri, storage_options)):
        return digest, size, _row_group_parts(uri, shard_bytes, storage_options)
    return digest, size, []


def _is_parquet(uri: str, storage_options: dict | None) -> bool:
    with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
        return fh.read(4) == PARQUET_MAGIC


def _row_group_parts(uri: str, shard_bytes: int, storage_options: dict | None) -> list[Part]:
    """Consecutive row groups of about `shard_bytes` compressed bytes; an unreadable footer leaves the
    file whole (its reader reports the damage)."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - reported by the clean stage's reader, not here
        return []
    parts: list[Part] = []
    start = rows_before = rows = held = 0
    for group in range(meta.num_row_groups):
        rg = meta.row_group(group)
        held += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        rows += rg.num_rows
        if held >= shard_bytes or group == meta.num_row_groups - 1:
            parts.append((start, group + 1, rows_before, held))
            start, rows_before, rows, held = group + 1, rows_before + rows, 0, 0
    return parts if len(parts) > 1 else []


def file_signature(uri: str, storage_options: dict | None = None) -> str:
    """Cheap change detector (size + modification time or ETag) that gates re-hashing."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return f"{info.get('size')}:{stamp}"
