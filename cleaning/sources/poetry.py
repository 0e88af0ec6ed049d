"""The chinese-poetry reader (npm): a bounded subset of classical poems."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

from cleaning.sources.packages import FetchError, Package, download
from cleaning.sources.records import record

POETRY = Package("chinese-poetry", "2.0.1", "npm", "MIT")

# A bounded, deterministic subset (~6k poems of 389k): two files each of Tang poems (traditional
# characters), Song poems and Song ci, the Book of Songs, and both 300-poem anthologies, which
# repeat poems of the complete editions (near-duplicates for the dedup stage).
POETRY_FILES = (
    "dist/quantangshi/poet.tang.0.json", "dist/quantangshi/poet.tang.1000.json",
    "dist/quantangshi/poet.song.0.json", "dist/songci/ci.song.0.json", "dist/songci/ci.song.1000.json",
    "dist/shijing/shijing.json", "dist/quantangshi/唐诗三百首.json", "dist/songci/宋词三百首.json",
)


def read_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Poems as `title\\nauthor\\nline…`; needs `npm` (FetchError otherwise)."""
    archive = download(POETRY, cache)
    wanted = {f"package/{name}": name for name in POETRY_FILES}
    found: dict[str, bytes] = {}
    # One streaming pass over the 360 MB tarball; random access into a .tgz re-reads it per member.
    with tarfile.open(archive, "r|gz") as tf:
        for info in tf:
            if info.name in wanted:
                fh = tf.extractfile(info)
                assert fh is not None
                found[wanted[info.name]] = fh.read()
    missing = set(POETRY_FILES) - set(found)
    if missing:
        raise FetchError(f"{archive.name}: missing {sorted(missing)}")
    for name in POETRY_FILES:
        stem = Path(name).stem
        for i, poem in enumerate(json.loads(found[name])):
            lines = poem.get("paragraphs") or poem.get("content") or []
            title = poem.get("title") or poem.get("rhythmic") or ""
            head = [h for h in (title, poem.get("author")) if h]
            body = [ln.strip() for ln in lines if ln and ln.strip()]
            if body:
                yield record("poetry", "poetry", f"{stem}-{i:04d}", "\n".join(head + body))


def iter_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_poetry(cache))
