"""Web pages to text: the encoding of a page's bytes, and its main content without navigation,
footers, related-link lists and share bars.

Main content is extracted with trafilatura (lxml's libxml2 HTML parser underneath). Compared on
Chinese pages written for the tests (a news article between a menu, breadcrumbs, share bar,
related links, a sidebar and an ICP footer) and on the 2,561 LibreOffice zh-CN help pages of the
registry sample:
- trafilatura kept every article paragraph and none of the menu, footer, share or related-link
  text (about 7.5 ms a page);
- resiliparse's `extract_plain_text(main_content=True)` kept the login links and the share bar,
  and dropped inline spans inside sentences (「左」 came out as 「」 on the help pages);
- selectolax (lexbor) parses fast but has no main-content extraction: its text is the whole page,
  menu and footer included.
`favor` is trafilatura's trade-off. "balanced" (its default) is the default here: after the rules
(no model filters) it keeps 769 of the help pages (359k characters), "precision" 566 (283k), and
what precision loses is mostly step-by-step instructions, some pages entirely. The price: a page
with almost no article falls back to its whole text, menu included, which the boilerplate-line
and length rules then judge; "precision" returns nothing for a page that is only a menu.

Encodings follow what browsers do, biased to Chinese: a byte-order mark, then the page's own
declaration (`<meta charset>`, `http-equiv` or an XML declaration) when the bytes decode with it,
then UTF-8, then a statistical guess among GB18030, Big5-HKSCS and Windows-1252. GB2312 and GBK
labels decode as GB18030, their superset (pages labelled GB2312 routinely hold GBK characters).
"""
from __future__ import annotations

import codecs
import functools
import logging
import re
import threading
from typing import Literal

Favor = Literal["precision", "balanced", "recall"]

# Bytes of a page searched for its encoding declaration; pages put long comments and scripts first.
_DECLARATION_WINDOW = 4096
_META_CHARSET = re.compile(rb"<meta[^>]*?charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_XML_ENCODING = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Labels decoded with a superset, as browsers do (WHATWG Encoding Standard).
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030", "euc-cn": "gb18030",
              "big5": "big5hkscs", "x-x-big5": "big5hkscs", "latin-1": "cp1252", "iso8859-1": "cp1252",
              "ascii": "cp1252"}
# What an undeclared page that is not UTF-8 is guessed among. The corpus is Chinese: unrestricted,
# charset-normalizer took a short GBK page for EUC-KR, and a wrong guess ruins every character.
_GUESSES = ["gb18030", "big5hkscs", "cp1252"]

# One extraction at a time in a process. trafilatura's lxml (libxml2) is not safe to enter from two
# threads at once: concurrent extractions now and then abort the whole process with glibc's
# "munmap_chunk(): invalid pointer" (trafilatura 2.3, lxml 6.1; an open upstream report). The corpus
# build cleans two shards at once in threads of one process under `--workers 1` (and Dask workers run
# threads), and it aborted that way once, when two shards of web pages were cleaned together.
# Parallel extraction is what worker processes (`--workers N`) are for; two threads extracted no
# faster than one (600 pages: 4.9-7.7 s either way on 2 cores).
_EXTRACTION_LOCK = threading.Lock()

# An HTML document starts with a doctype or an html/head/body tag, after whitespace, a BOM, an
# XML declaration or comments. Anchored at the start, so text that only mentions a tag is not one.
_DOCUMENT_START = re.compile(
    r"\ufeff?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)[\s>/]",
    re.IGNORECASE | re.DOTALL)
_DOCUMENT_START_WINDOW = 65536  # characters a document's leading comments may take


def looks_like_html_document(text: str) -> bool:
    """Whether `text` is a whole HTML document (not text with a tag in it). Reads only its start."""
    return _DOCUMENT_START.match(text, 0, _DOCUMENT_START_WINDOW) is not None


def _codec(label: bytes | str) -> str | None:
    """The Python codec for an encoding label, with the superset browsers use; None if unknown."""
    name = label.decode("ascii", "replace") if isinstance(label, bytes) else label
    name = name.strip().lower()
    try:
        codec = codecs.lookup(_SUPERSETS.get(name, name)).name
    except LookupError:
        return None
    codec = _SUPERSETS.get(codec, codec)
    # A page read as bytes cannot be UTF-16 when its ASCII declaration was readable (WHATWG: UTF-8).
    return "utf-8" if codec.startswith("utf-16") else codec


def declared_encoding(raw: bytes) -> str | None:
    """The encoding a page declares in its first bytes (`<meta charset>`, `http-equiv`, XML)."""
    head = raw[:_DECLARATION_WINDOW]
    for pattern in (_META_CHARSET, _XML_ENCODING):
        found = pattern.search(head)
        if found and (codec := _codec(found.group(1))):
            return codec
    return None


def decode_html(raw: bytes) -> tuple[str, str]:
    """The text of a page's bytes and the codec that decoded it (see the module docstring).

    A page that no candidate decodes cleanly is decoded with the one that leaves the fewest
    undecodable bytes (each becomes U+FFFD), never an exception."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return raw.decode(codec, errors="replace"), codec
    candidates = [codec for codec in (declared_encoding(raw), "utf-8") if codec]
    for codec in dict.fromkeys(candidates):
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            continue
    codec = legacy_codec(raw, candidates)
    return raw.decode(codec, errors="replace"), codec


def legacy_codec(raw: bytes, tried: list[str] | tuple[str, ...] = ()) -> str:
    """The codec of bytes that are not UTF-8 (nor what `tried` names): the statistical guess among
    GB18030, Big5-HKSCS and Windows-1252 when it decodes them cleanly, else whichever of `tried`, the
    guess and GB18030 leaves the fewest undecodable bytes."""
    guess = _guess_encoding(raw)
    if guess:
        try:
            raw.decode(guess)
            return guess
        except UnicodeDecodeError:
            pass
    pool = dict.fromkeys([*tried, *([guess] if guess else []), "gb18030"])
    return min(pool, key=lambda codec: raw.decode(codec, errors="replace").count("\ufffd"))


def _guess_encoding(raw: bytes) -> str | None:
    from charset_normalizer import from_bytes

    best = from_bytes(raw, cp_isolation=_GUESSES).best()
    return _codec(best.encoding) if best is not None else None


def extract_main_content(markup: str, favor: Favor = "balanced", fallback: bool = False) -> str:
    """The main content of an HTML page as plain text, one paragraph per line; "" when the page has
    none (empty, only scripts, not HTML at all). Text that is not a whole document (a fragment such
    as `<p>…</p>`) is wrapped in one first: trafilatura takes a lone block for something other
    than HTML. `fallback`: also run trafilatura's fallback extractors (readability, jusText) and
    keep the better result; on the benchmark corpus's 554 web pages that took 2.2× the time and
    changed one page by one space, so it is off by default."""
    import trafilatura  # imported here: readers of JSONL and Parquet without HTML never load it

    _quiet_trafilatura()
    if not looks_like_html_document(markup):
        markup = f"<html><body><div>{markup}</div></body></html>"
    with _EXTRACTION_LOCK:
        text = trafilatura.extract(markup, options=_extractor(favor, fallback))
    return (text or "").strip()


@functools.lru_cache(maxsize=8)
def _extractor(favor: Favor, fallback: bool):
    """trafilatura's options, made once: building them per page (its config parsing) was a tenth of
    the extraction. trafilatura copies them where an extraction changes them, so they can be shared."""
    from trafilatura.settings import Extractor

    return Extractor(output_format="txt", comments=False, tables=True, images=False, links=False, formatting=False,
                     dedup=False, with_metadata=False, fast=not fallback, precision=favor == "precision",
                     recall=favor == "recall")


def _quiet_trafilatura() -> None:
    """trafilatura logs a warning for every page it finds no content in; the reader records each as
    a rejection with its reason already. A level someone set on its logger is left alone."""
    logger = logging.getLogger("trafilatura")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
