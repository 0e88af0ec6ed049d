"""The document that flows through the corpus build, and the schema it is stored with."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(slots=True)
class Document:
    id: str
    text: str
    domain: str
    source: str
    url: str | None = None
    quality: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Rejection:
    """A document that will not be kept, with the rule that dropped it and why."""

    doc: Document
    reason: str
    detail: str = ""
    dup_of: str | None = None


# Parquet schemas of the corpus contract (SPEC §2.1). `meta` is a JSON string: nested Parquet
# types vary per document and make `datasets.load_dataset("parquet")` fail on schema mismatch.
KEPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.large_string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("quality", pa.float32()),
        ("meta", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    list(KEPT_SCHEMA) + [("reason", pa.string()), ("detail", pa.string()), ("dup_of", pa.string())]
)


def writable(value: str) -> str:
    """`value` as text that UTF-8 (and so Parquet) can store: a lone surrogate becomes its escape
    (`\\ud800`), so a rejected record keeps what was there and never fails the write."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def kept_row(doc: Document) -> dict[str, Any]:
    meta = dict(doc.meta)
    if doc.url:
        meta["url"] = doc.url
    return {
        "id": doc.id,
        "text": doc.text,
        "domain": doc.domain,
        "source": doc.source,
        "quality": doc.quality,
        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }


def rejected_row(rejection: Rejection) -> dict[str, Any]:
    """A rejected record is whatever the input held: every string is made writable."""
    row = kept_row(rejection.doc)
    row["reason"] = rejection.reason
    row["detail"] = rejection.detail
    row["dup_of"] = rejection.dup_of
    return {key: writable(value) if isinstance(value, str) else value for key, value in row.items()}


def document_from_row(row: dict[str, Any]) -> Document:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    return Document(
        id=row["id"],
        text=row["text"],
        domain=row["domain"],
        source=row["source"],
        url=meta.pop("url", None),
        quality=row.get("quality"),
        meta=meta,
    )
