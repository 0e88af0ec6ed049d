"""Readers of the Debian sources: manpages-zh (roff → text), LibreOffice help (raw HTML) and
fortunes-zh. Unpinned: the version and licence come from the .deb (sample_data/sources/debian.py)."""
from __future__ import annotations

import gzip
import os
import re
from typing import Any, Iterator

from sample_data.sources.debian import deb_download, deb_files
from sample_data.sources.heldout import poem_held_out
from sample_data.sources.packages import Package
from sample_data.sources.records import deb_record
from sample_data.sources.roff import roff_to_text


# -- manpages-zh ------------------------------------------------------------------------------

MANPAGES_ZH = Package("manpages-zh", "", "debian", "")  # version and licence come from the .deb


def read_manpages_zh(lang: str, cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per man page of `usr/share/man/<lang>/man*/` (lang `zh_CN` or `zh_TW`), as text.

    The id is `<section>-<page>` (`man1-ls.1`), the same in both languages: zh_TW pages are a
    converted copy of the zh_CN ones. Aliases (symlinks) and `.so` redirects are left out.
    """
    source = f"manpages_{lang.lower()}"
    deb = deb_download(MANPAGES_ZH.name, cache)
    prefix = f"usr/share/man/{lang}/"
    pages = sorted(deb_files(deb, lambda p: p.startswith(prefix) and re.search(r"/man\w+/[^/]+$", p) is not None))
    for path, blob in pages:
        if path.endswith(".gz"):
            blob = gzip.decompress(blob)
        try:
            roff = blob.decode("utf-8")
        except UnicodeDecodeError:
            roff = blob.decode("gb18030" if lang == "zh_CN" else "big5", "replace")
        if re.match(r"\s*\.so\s", roff) and len(roff.strip().splitlines()) == 1:
            continue
        text = roff_to_text(roff)
        if len(text.strip()) < 10:
            continue
        section, page = path[len(prefix):].split("/", 1)
        page = re.sub(r"\.gz$", "", page)
        yield deb_record(source, "manual", f"{section}-{page}", text, MANPAGES_ZH.name, path)


def read_manpages_zh_cn(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_manpages_zh("zh_CN", cache)


def read_manpages_zh_tw(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_manpages_zh("zh_TW", cache)


# -- LibreOffice help ------------------------------------------------------------------------

LIBREOFFICE_HELP_ZH_CN = Package("libreoffice-help-zh-cn", "", "debian", "")
LIBREOFFICE_HELP_ZH_TW = Package("libreoffice-help-zh-tw", "", "debian", "")
# 2,561 pages (29 MB of HTML) per language in 7.4; a bound in case a later version grows.
LIBREOFFICE_MAX_PAGES = 3000


def read_libreoffice_help(lang: str, cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per help page (`zh-CN` or `zh-TW`), the raw HTML as text: navigation,
    scripts, and English command names and examples included, for the cleaning stage to strip."""
    pkg = LIBREOFFICE_HELP_ZH_CN if lang == "zh-CN" else LIBREOFFICE_HELP_ZH_TW
    source = "libreoffice_help_" + lang.lower().replace("-", "_")
    prefix = f"usr/share/libreoffice/help/{lang}/text/"
    deb = deb_download(pkg.name, cache)
    pages = sorted(deb_files(deb, lambda p: p.startswith(prefix) and p.endswith((".html", ".xhtml"))))
    for path, blob in pages:
        html = blob.decode("utf-8", "replace")
        if not html.strip():
            continue
        doc_id = re.sub(r"\.x?html$", "", path[len(prefix):]).replace("/", "-")
        yield deb_record(source, "web", doc_id, html, pkg.name, path)


def read_libreoffice_help_zh_cn(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_libreoffice_help("zh-CN", cache)


def read_libreoffice_help_zh_tw(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_libreoffice_help("zh-TW", cache)


# -- fortunes-zh ------------------------------------------------------------------------------

FORTUNES_ZH = Package("fortunes-zh", "", "debian", "")
FORTUNES_DIR = "usr/share/games/fortunes/"


def split_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: separated by lines holding only `%`; blank entries dropped."""
    entries = re.split(r"(?m)^%[ \t]*\r?\n?", text)
    return [e.strip("\n") for e in entries if e.strip()]


# Poem fortunes (`tang300`, `song100`) are `《title》` or `题目:《title》`, `作者：author`, then the
# verses, the head lines in ANSI colours; `chinese` quotes couplets followed by `-- author《title》`.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_POEM_HEAD = re.compile(r"^(?:题目[:：]\s*)?《.*》$|^作者[:：]")


def fortune_verses(entry: str) -> list[str]:
    """A fortune's lines without colour escapes, poem titles and author lines: the verses of a poem."""
    lines = (_ANSI.sub("", line).strip() for line in entry.splitlines())
    return [line for line in lines if line and not _POEM_HEAD.match(line)]


def read_fortunes_zh(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per fortune (files `chinese`, `song100`, `tang300`), ANSI colour escapes kept.

    The anthologies repeat poems of the complete Tang and Song editions and `chinese` quotes famous
    couplets: a fortune that opens like a poem of the built-in evaluation set (`poem_held_out`,
    sample_data/sources/heldout.py) is left out here too. The rule looks only at the first clause, so
    one other fortune in 40 goes as well: a small, deterministic loss. Ids keep their position in
    the file.
    """
    deb = deb_download(FORTUNES_ZH.name, cache)
    files = sorted(deb_files(deb, lambda p: p.startswith(FORTUNES_DIR) and "/" not in p[len(FORTUNES_DIR):]
                             and not p.endswith((".dat", ".u8"))))
    for path, blob in files:
        stem = path[len(FORTUNES_DIR):]
        for i, entry in enumerate(split_fortunes(blob.decode("utf-8", "replace"))):
            if poem_held_out(fortune_verses(entry)):
                continue
            yield deb_record("fortunes_zh", "literature", f"{stem}-{i:04d}", entry, FORTUNES_ZH.name, path)
