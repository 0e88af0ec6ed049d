"""Streaming reads of a corpus version (SPEC §2.1): `DIR/data/part-NNNNN.parquet` with a `text` column.

Shards are read one record batch at a time through fsspec, so memory is bounded by a batch.
"""
from __future__ import annotations

import posixpath
from typing import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class CorpusError(ValueError):
    """The corpus directory has no shards, or a shard lacks a needed column."""


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
    """Record batches of `columns`; a missing column other than the first yields nulls."""
    with fsspec.open(shard, "rb", **(storage_options or {})) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        if columns[0] not in names:
            raise CorpusError(f"{shard} has no {columns[0]!r} column (columns: {sorted(names)})")
        present = [c for c in columns if c in names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=present):
            for c in columns:
                if c not in names:
                    batch = batch.append_column(c, pa.nulls(batch.num_rows, pa.string()))
            yield batch.select(list(columns))


def count_documents(shard: str, storage_options: dict | None = None) -> int:
    with fsspec.open(shard, "rb", **(storage_options or {})) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def iter_texts(
    corpus: str, text_field: str = "text", max_documents: int | None = None, storage_options: dict | None = None
) -> Iterator[str]:
    """Every document's text across the corpus shards, in shard order (nulls skipped)."""
    seen = 0
    for shard in list_shards(corpus, storage_options):
        for batch in iter_batches(shard, [text_field], storage_options=storage_options):
            for text in batch.column(0).to_pylist():
                if max_documents is not None and seen >= max_documents:
                    return
                seen += 1
                if text is not None:
                    yield text
