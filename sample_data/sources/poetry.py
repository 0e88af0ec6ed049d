"""The chinese-poetry reader (npm): a bounded subset of classical poems."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from sample_data.sources.heldout import poem_held_out
from sample_data.sources.packages import FetchError, Package, download
from sample_data.sources.records import record

POETRY = Package("chinese-poetry", "2.0.1", "npm", "MIT")

# A bounded, deterministic subset (~6k poems of 389k): two files each of Tang poems (traditional
# characters), Song poems and Song ci, the Book of Songs, and both 300-poem anthologies, which
# repeat poems of the complete editions (near-duplicates for the dedup stage).
POETRY_FILES = (
    "dist/quantangshi/poet.tang.0.json", "dist/quantangshi/poet.tang.1000.json",
    "dist/quantangshi/poet.song.0.json", "dist/songci/ci.song.0.json", "dist/songci/ci.song.1000.json",
    "dist/shijing/shijing.json", "dist/quantangshi/唐诗三百首.json", "dist/songci/宋词三百首.json",
)


def poetry_files(wanted: Callable[[str], bool],
                 cache: str | os.PathLike[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The parsed JSON files of the package whose path (`dist/...`) `wanted` accepts; needs `npm`."""
    archive = download(POETRY, cache)
    found: dict[str, list[dict[str, Any]]] = {}
    # One streaming pass over the 360 MB tarball; random access into a .tgz re-reads it per member.
    with tarfile.open(archive, "r|gz") as tf:
        for info in tf:
            name = info.name.removeprefix("package/")
            if info.isfile() and name.endswith(".json") and wanted(name):
                fh = tf.extractfile(info)
                assert fh is not None
                found[name] = json.loads(fh.read())
    return found


def poem_parts(poem: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(title, author, verse lines) of one poem of any of the package's collections."""
    lines = poem.get("paragraphs") or poem.get("content") or []
    title = poem.get("title") or poem.get("rhythmic") or ""
    return title, poem.get("author") or "", [ln.strip() for ln in lines if ln and ln.strip()]


def read_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Poems as `title\\nauthor\\nline…`; needs `npm` (FetchError otherwise).

    Poems of the built-in evaluation set (`poem_held_out`, sample_data/sources/heldout.py) are left
    out; ids keep their position in the file, so they stay stable.
    """
    archive_name = f"{POETRY.name}-{POETRY.version}.tgz"
    found = poetry_files(set(POETRY_FILES).__contains__, cache)
    missing = set(POETRY_FILES) - set(found)
    if missing:
        raise FetchError(f"{archive_name}: missing {sorted(missing)}")
    for name in POETRY_FILES:
        stem = Path(name).stem
        for i, poem in enumerate(found[name]):
            title, author, body = poem_parts(poem)
            if body and not poem_held_out(body):
                head = [h for h in (title, author) if h]
                yield record("poetry", "poetry", f"{stem}-{i:04d}", "\n".join(head + body))


def iter_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_poetry(cache))
