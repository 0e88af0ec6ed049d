"""Writers that never leave a partial file behind: Parquet shards, and bytes or JSON in one piece.

Rows are buffered and written in row groups to a temporary name beside the target; `close()`
renames it into place, so a reader (or a rerun after a kill) sees either the whole shard or none.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import IO, Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cleaning.temporaries import temporary_path


def _fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


class ParquetShardWriter:
    def __init__(self, uri: str, schema: pa.Schema, rows_per_group: int = 2048):
        self.fs, self.path = _fs_and_path(uri)
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.rows_written = 0
        self._buffer: list[dict[str, Any]] = []
        self.fs.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._tmp = temporary_path(self.path)
        self._handle = self.fs.open(self._tmp, "wb")
        # Document text (large_string) is written without dictionary encoding or min/max
        # statistics: unique kilobyte strings gain nothing from either, and both cost a third of
        # the write.
        small = [f.name for f in schema if not pa.types.is_large_string(f.type)]
        self._writer = pq.ParquetWriter(self._handle, schema, compression="zstd", use_dictionary=small,
                                        write_statistics=small)

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def write_table(self, table: pa.Table | pa.RecordBatch) -> None:
        """Rows already in Arrow form (after the rows buffered so far), as one row group."""
        self._flush()
        if table.num_rows:
            if isinstance(table, pa.RecordBatch):
                table = pa.Table.from_batches([table])
            self._writer.write_table(table.cast(self.schema))
            self.rows_written += table.num_rows

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self.rows_written += len(self._buffer)
            self._buffer.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._handle.close()
        self.fs.mv(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._handle.close()
        finally:
            if self.fs.exists(self._tmp):
                self.fs.rm(self._tmp)

    def __enter__(self) -> "ParquetShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextmanager
def atomic_file(uri: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file handle on a temporary name beside `uri` (an fsspec URI or a local path),
    renamed into place when the block ends, so a reader sees the old file or the new one, never a
    part. A local file is fsynced before the rename; the temporary is removed when the block fails."""
    fs, path = _fs_and_path(os.fspath(uri))
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
            if isinstance(fs, LocalFileSystem):
                fh.flush()
                os.fsync(fh.fileno())
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except OSError:
            pass
        raise


def write_bytes_atomic(uri: str | os.PathLike[str], data: bytes) -> None:
    """`data` written through `atomic_file`."""
    with atomic_file(uri) as fh:
        fh.write(data)


def write_json_atomic(uri: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON (UTF-8, indented, sorted keys) atomically (used for markers and manifests)."""
    write_bytes_atomic(uri, json.dumps(payload, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8"))


def link_or_copy(source_uri: str, target_uri: str) -> str:
    """Puts the file `source` at `target` too, without writing its bytes again where the store
    allows it: a hard link on a local file system (both names are one inode: a corpus version that
    reuses a shard costs no space, and the shard stays readable through either name whichever is
    deleted), a copy on other stores (object stores have no links) or where linking fails (another
    device, a file system without hard links). `target` appears whole or not at all: the link or
    copy is made under a temporary name and renamed over it. Returns "link" or "copy"."""
    fs, source = _fs_and_path(source_uri)
    target = _fs_and_path(target_uri)[1]
    fs.makedirs(os.path.dirname(target), exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.copy(source, target)  # one object written by one request: whole or absent
        return "copy"
    if os.path.exists(target) and os.path.samefile(source, target):
        return "link"
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)
        how = "link"
    except OSError:
        shutil.copyfile(source, tmp)
        how = "copy"
    os.replace(tmp, target)
    return how


def read_json(uri: str) -> Any:
    """A JSON file (a path or an fsspec URI). One that is not JSON (damaged, or edited by hand) is a
    ValueError that names it: the command lines print that as one line."""
    try:
        with fsspec.open(uri, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{uri}: not JSON (not UTF-8 text at byte {exc.start})") from exc
