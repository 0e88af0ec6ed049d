"""Streaming readers over fsspec URIs: JSONL (optionally gzipped), Parquet and plain text.

A reader never loads a whole file. Every physical record comes out as either a `Document` or a
`Rejection` naming the file and line, so that input = kept + rejected holds from the first step.
A problem that stops the rest of a file from being read (truncated gzip, unreadable path) raises
`ShardReadError` after everything readable before it has been yielded.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import fsspec
import pyarrow.parquet as pq

from cleaning.document import Document, Rejection

Format = Literal["jsonl", "parquet", "txt"]


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the text, id, domain, source and url."""

    text: str = "text"
    id: str = "id"
    domain: str = "domain"
    source: str = "source"
    url: str = "url"


class ShardReadError(Exception):
    """A file could not be read (further); the message names the file and where."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.message = message


_SUFFIXES: list[tuple[str, Format]] = [
    (".jsonl.gz", "jsonl"), (".json.gz", "jsonl"), (".jsonl", "jsonl"), (".json", "jsonl"),
    (".ndjson", "jsonl"), (".parquet", "parquet"), (".txt.gz", "txt"), (".txt", "txt"),
]


def detect_format(path: str) -> Format:
    lowered = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    raise ShardReadError(path, "unknown input format (expected .jsonl[.gz], .json[.gz], .parquet, .txt[.gz])")


def is_supported(path: str) -> bool:
    lowered = path.lower()
    return any(lowered.endswith(suffix) for suffix, _ in _SUFFIXES)


def shard_name(path: str) -> str:
    """Short name of an input file, used in generated ids: the basename without extensions."""
    base = os.path.basename(path.rstrip("/"))
    for suffix, _ in _SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _preview(raw: bytes | str, limit: int = 2000) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text[:limit]


@dataclass
class RecordReader:
    """Reads one input file into documents. `max_record_bytes` bounds memory per record."""

    fields: FieldMap = FieldMap()
    txt_split: Literal["blank_line", "line"] = "blank_line"
    max_record_bytes: int = 64 * 1024 * 1024
    default_domain: str | None = None
    storage_options: dict[str, Any] | None = None

    def read(self, path: str) -> Iterator[Document | Rejection]:
        fmt = detect_format(path)
        try:
            if fmt == "parquet":
                yield from self._read_parquet(path)
            elif fmt == "jsonl":
                yield from self._read_jsonl(path)
            else:
                yield from self._read_txt(path)
        except ShardReadError:
            raise
        except FileNotFoundError as err:
            raise ShardReadError(path, f"file not found ({err})") from err
        except PermissionError as err:
            raise ShardReadError(path, f"permission denied ({err})") from err
        except (OSError, EOFError, zlib.error) as err:
            raise ShardReadError(path, f"unreadable: {type(err).__name__}: {err}") from err

    # -- record assembly -------------------------------------------------------------------
    def _document(self, record: dict[str, Any], path: str, line: int) -> Document | Rejection:
        f = self.fields
        name = shard_name(path)
        rid = record.get(f.id)
        doc_id = str(rid) if rid not in (None, "") else f"{name}:{line}"
        source = record.get(f.source) or record.get(f.domain) or self.default_domain or name
        domain = record.get(f.domain) or record.get(f.source) or self.default_domain or name
        url = record.get(f.url)
        meta = {"input": path, "line": line}
        text = record.get(f.text)
        doc = Document(id=doc_id, text=text if isinstance(text, str) else "", domain=str(domain),
                       source=str(source), url=str(url) if url else None, meta=meta)
        if text is None:
            return Rejection(doc, "missing_text", f"{path}, line {line}: no '{f.text}' field")
        if not isinstance(text, str):
            doc.text = json.dumps(text, ensure_ascii=False)[:2000]
            return Rejection(doc, "missing_text",
                             f"{path}, line {line}: '{f.text}' is {type(text).__name__}, not a string")
        return doc

    def _raw_rejection(self, path: str, line: int, raw: bytes, reason: str, detail: str) -> Rejection:
        doc = Document(id=f"{shard_name(path)}:{line}", text=_preview(raw, 1 << 20),
                       domain=self.default_domain or shard_name(path),
                       source=self.default_domain or shard_name(path),
                       meta={"input": path, "line": line})
        return Rejection(doc, reason, f"{path}, line {line}: {detail}")

    # -- formats ---------------------------------------------------------------------------
    def _lines(self, path: str) -> Iterator[tuple[int, bytes, bool]]:
        """(line number, raw bytes, complete) for every line; oversized lines are cut short.

        A truncated gzip stream yields every complete line before the damage, then the partial
        last line as incomplete, then raises `ShardReadError`.
        """
        with fsspec.open(path, "rb", **(self.storage_options or {})) as raw:
            stream = _GzipLines(raw, path) if path.lower().endswith(".gz") else raw
            number = 0
            while True:
                chunk = stream.readline(self.max_record_bytes + 1)
                if not chunk:
                    return
                number += 1
                if len(chunk) > self.max_record_bytes and not chunk.endswith(b"\n"):
                    while True:  # drain the rest of the oversized line without holding it
                        rest = stream.readline(self.max_record_bytes)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield number, chunk[:4096], False
                    continue
                yield number, chunk, True

    def _read_jsonl(self, path: str) -> Iterator[Document | Rejection]:
        lines = self._lines(path)
        last = 0
        try:
            for number, raw, complete in lines:
                last = number
                if not complete:
                    yield self._raw_rejection(path, number, raw, "record_too_large",
                                              f"record exceeds {self.max_record_bytes} bytes")
                    continue
                if not raw.strip():
                    continue  # blank line between records: nothing to account for
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield self._raw_rejection(path, number, raw, "invalid_utf8",
                                              f"invalid UTF-8 at byte {err.start}")
                    continue
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as err:
                    yield self._raw_rejection(path, number, raw, "corrupt_json",
                                              f"corrupt JSON: {err.msg} at column {err.colno}")
                    continue
                if not isinstance(record, dict):
                    yield self._raw_rejection(path, number, raw, "corrupt_json",
                                              f"expected a JSON object, got {type(record).__name__}")
                    continue
                yield self._document(record, path, number)
        except _TruncatedStream as err:
            raise ShardReadError(path, f"truncated or corrupt gzip stream after line {last}: {err}",
                                 line=last + 1) from err

    def _read_txt(self, path: str) -> Iterator[Document | Rejection]:
        block: list[str] = []
        start = 0
        last = 0

        def flush() -> Iterator[Document | Rejection]:
            if block:
                yield self._document({self.fields.text: "".join(block).strip("\n")}, path, start)
                block.clear()

        try:
            for number, raw, complete in self._lines(path):
                last = number
                if not complete:
                    yield from flush()
                    yield self._raw_rejection(path, number, raw, "record_too_large",
                                              f"line exceeds {self.max_record_bytes} bytes")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield from flush()
                    yield self._raw_rejection(path, number, raw, "invalid_utf8",
                                              f"invalid UTF-8 at byte {err.start}")
                    continue
                if self.txt_split == "line":
                    if line.strip():
                        yield self._document({self.fields.text: line.rstrip("\n")}, path, number)
                    continue
                if not line.strip():
                    yield from flush()
                    continue
                if not block:
                    start = number
                block.append(line)
            yield from flush()
        except _TruncatedStream as err:
            raise ShardReadError(path, f"truncated or corrupt gzip stream after line {last}: {err}",
                                 line=last + 1) from err

    def _read_parquet(self, path: str) -> Iterator[Document | Rejection]:
        with fsspec.open(path, "rb", **(self.storage_options or {})) as fh:
            try:
                pf = pq.ParquetFile(fh)
            except Exception as err:  # pyarrow raises ArrowInvalid for corrupt footers
                raise ShardReadError(path, f"not a readable Parquet file: {err}") from err
            names = set(pf.schema_arrow.names)
            if self.fields.text not in names:
                raise ShardReadError(path, f"no '{self.fields.text}' column (columns: {sorted(names)})")
            wanted = [c for c in {self.fields.text, self.fields.id, self.fields.domain,
                                  self.fields.source, self.fields.url} if c in names]
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=wanted):
                for record in batch.to_pylist():
                    row += 1
                    yield self._document(record, path, row)


class _TruncatedStream(Exception):
    pass


class _GzipLines:
    """Line reader over a gzip stream that keeps what was decompressed before a truncation.

    `gzip.GzipFile` raises before handing out lines it has already decompressed when the end of
    the stream is missing; here complete lines come out first, and the partial tail after them.
    Concatenated gzip members are read one after another, as gzip(1) does.
    """

    def __init__(self, raw, path: str, chunk: int = 1 << 20):
        self._raw = raw
        self._chunk = chunk
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._eof = False
        self._error: str | None = None
        self._started = False

    def _fill(self) -> None:
        data = self._raw.read(self._chunk)
        if not data:
            self._eof = True
            if self._started and not self._inflate.eof:
                self._error = "stream ended before the gzip end-of-stream marker"
            return
        self._started = True
        try:
            self._buffer += self._inflate.decompress(data)
            while self._inflate.eof and self._inflate.unused_data:
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._buffer += self._inflate.decompress(rest)
        except zlib.error as err:
            self._error = f"corrupt gzip data ({err})"
            self._eof = True

    def readline(self, limit: int) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", 0, limit)
            if newline >= 0:
                line = bytes(self._buffer[: newline + 1])
                del self._buffer[: newline + 1]
                return line
            if len(self._buffer) >= limit:
                line = bytes(self._buffer[:limit])
                del self._buffer[:limit]
                return line
            if self._eof:
                if self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line
                if self._error:
                    error, self._error = self._error, None
                    raise _TruncatedStream(error)
                return b""
            self._fill()
