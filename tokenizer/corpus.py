"""Streaming reads of a corpus version (SPEC §2.1): `DIR/data/part-NNNNN.parquet` with a `text` column.

Shards are read one record batch at a time through fsspec, so memory is bounded by a batch.
"""
from __future__ import annotations

import posixpath
from typing import BinaryIO, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class CorpusError(ValueError):
    """The corpus directory has no shards, or a shard is not readable Parquet or lacks its text column: the
    user's to fix (a ValueError), and the message names the shard."""


def _shown(shard: str) -> str:
    """A shard's URI as a message shows it: a local file as its path."""
    return shard.removeprefix("file://")


def unreadable_shard(shard: str, exc: BaseException) -> CorpusError:
    return CorpusError(f"{_shown(shard)} is not a readable Parquet file ({exc})")


# What a damaged shard raises: pyarrow's own errors (bad magic bytes, a footer that does not parse) and
# OSError (corrupt compressed pages, a file cut short while being read).
READ_ERRORS = (pa.ArrowException, OSError)


def open_shard(shard: str, fh: BinaryIO) -> pq.ParquetFile:
    """The Parquet file `shard` (open as `fh`), or a CorpusError naming it when it is not one."""
    try:
        return pq.ParquetFile(fh)
    except READ_ERRORS as exc:
        raise unreadable_shard(shard, exc) from exc


def check_text_column(shard: str, schema: pa.Schema, column: str) -> None:
    """Raise unless `schema` has `column` holding strings (or only nulls): a shard without its text is unusable."""
    if column not in schema.names:
        columns = ", ".join(schema.names) or "none"
        raise CorpusError(f"{_shown(shard)} has no {column!r} column (its columns: {columns})")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_null(kind)):
        raise CorpusError(f"{_shown(shard)}: column {column!r} holds {kind}, not text")


def list_shards(corpus: str, storage_options: dict | None = None) -> list[str]:
    """The corpus's `data/part-*.parquet` shards (or `part-*.parquet` of a data dir itself), sorted."""
    fs, root = fsspec.core.url_to_fs(corpus, **(storage_options or {}))
    root = root.rstrip("/")
    for pattern in (posixpath.join(root, "data", "part-*.parquet"), posixpath.join(root, "part-*.parquet")):
        found = sorted(fs.glob(pattern))
        if found:
            return [fs.unstrip_protocol(p) for p in found]
    if not fs.exists(root):
        raise CorpusError(f"corpus directory {corpus} does not exist")
    raise CorpusError(f"no corpus shards in {corpus}: expected {corpus}/data/part-*.parquet")


def iter_batches(
    shard: str, columns: Sequence[str], batch_size: int = 1024, storage_options: dict | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns`; the first is the text (it must be there, holding strings), a missing
    other one yields nulls. A shard that is not Parquet, or whose pages are damaged, is a CorpusError naming it."""
    with fsspec.open(shard, "rb", **(storage_options or {})) as fh:
        pf = open_shard(shard, fh)
        check_text_column(shard, pf.schema_arrow, columns[0])
        names = set(pf.schema_arrow.names)
        present = [c for c in columns if c in names]
        batches = pf.iter_batches(batch_size=batch_size, columns=present)
        while True:
            try:
                batch = next(batches)
                # pyarrow does not check UTF-8 when it reads: a damaged page would fail later, in to_pylist
                batch.validate(full=True)
            except StopIteration:
                return
            except READ_ERRORS as exc:
                raise unreadable_shard(shard, exc) from exc
            for c in columns:
                if c not in names:
                    batch = batch.append_column(c, pa.nulls(batch.num_rows, pa.string()))
            yield batch.select(list(columns))


def count_documents(shard: str, storage_options: dict | None = None) -> int:
    with fsspec.open(shard, "rb", **(storage_options or {})) as fh:
        return open_shard(shard, fh).metadata.num_rows


def shard_texts(shard: str, text_field: str = "text", limit: int | None = None,
                storage_options: dict | None = None) -> Iterator[str | None]:
    """The texts of one shard in order (None for a null), its first `limit` rows only where one is given."""
    if limit == 0:
        return
    seen = 0
    for batch in iter_batches(shard, [text_field], storage_options=storage_options):
        for text in batch.column(0).to_pylist():
            yield text
            seen += 1
            if limit is not None and seen >= limit:
                return


def iter_texts(
    corpus: str, text_field: str = "text", max_documents: int | None = None, storage_options: dict | None = None
) -> Iterator[str]:
    """Every document's text across the corpus shards, in shard order (nulls skipped; `max_documents` counts
    rows, nulls included)."""
    left = max_documents
    for shard in list_shards(corpus, storage_options):
        if left == 0:
            return
        for text in shard_texts(shard, text_field, left, storage_options):
            if left is not None:
                left -= 1
            if text is not None:
                yield text
