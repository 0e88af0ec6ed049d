"""The record every source reader yields: `{id, text, domain, source}` (+ `url` for Debian files)."""
from __future__ import annotations

from typing import Any


def record(source: str, domain: str, doc_id: str, text: str) -> dict[str, Any]:
    return {"id": f"{source}-{doc_id}", "text": text, "domain": domain, "source": source}


def deb_record(source: str, domain: str, doc_id: str, text: str, package: str, path: str) -> dict[str, Any]:
    # `url` names the file inside the package: the copyright file licenses by path (manpages-zh).
    return {**record(source, domain, doc_id, text), "url": f"deb:{package}/{path}"}
