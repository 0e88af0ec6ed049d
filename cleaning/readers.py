"""Streaming readers over fsspec URIs: JSONL and JSON, Parquet, Arrow (Hugging Face datasets saved to disk),
CSV and TSV, plain text, web pages and WikiExtractor's output; the text formats also compressed (`cleaning.compression`).

A reader never loads a whole file (a web page, one document, is held up to `max_record_bytes`), except
a .json file that is one JSON document (`is_json_document`: an array of records, or one pretty-printed
object), read whole up to `JSON_DOCUMENT_MAX_BYTES`: its records cannot be told apart line by line. Its
elements are numbered from 1 (`NAME:K`, meta `element`). Pretty-printed objects one after another
(`jq . FILE` writes them so) are records numbered by the line each starts on; one that does not parse
is one rejection, and reading resumes at the next line that opens an object at its first column; an
array that does not parse is read so too, element by element (`_array_elements`; on one line, from the
commas before objects). A CSV quote that is never closed where its field ends loses its own line only
(`_stray_quote`).
JSON lines and plain text decode as their opening reads (`_text_codec`: UTF-8 with or without a
byte-order mark, or GB18030 / Big5 for legacy Chinese files); an opening that is all ASCII decides
nothing, and the first lines with other bytes decide instead (`RecordReader._text_lines`). UTF-16, with
or without a byte-order mark (`utf16_codec`), is read as UTF-8 (`_Utf16AsUtf8`), since its line ends
cannot be found in its bytes.
Every physical record comes out as either a `Document` or a `Rejection` naming the file and line,
so that input = kept + rejected holds from the first step.
Damage that can be read past (a corrupt gzip member followed by intact ones, an unreadable Parquet
row group) comes out as a `ReadFault` counting what was lost, and reading goes on. A problem that
stops the rest of a file from being read (truncated gzip, unreadable path) raises `ShardReadError`
after everything readable before it has been yielded.

Compression (and Parquet under a JSONL name) is recognised from a file's first bytes, not its name.
WikiExtractor's files (`wiki_00`, no suffix) hold `<doc ...>` articles or JSON lines (`_read_wiki`).
Generated ids are `NAME:LINE` (`NAME:ROW` for Parquet), NAME being the file's path relative to the
input root (the build passes it; the file's base name when reading a file on its own); see
`cleaning.ids.generated_id`.

Plain text is one document per blank-line-separated block, or per line (`txt_split`). A block or
line longer than `txt_max_chars` is cut at sentence ends into documents of at most that size,
`NAME:LINE#K` for its K-th piece, so that no document, and no reader's memory, grows with the file.

A web page (`.html`, `.htm`, `.xhtml`) is one document, id `NAME`: its bytes are decoded as the
page declares or as they look (GBK and Big5 included), and its main content is extracted
(`cleaning.webpage`). A JSONL or Parquet record whose text is an HTML document goes through the
same extraction (`html`: "auto" when it starts like one, "always", "never"). A page with no main
content, or one the parser fails on, is a rejection (`html_no_content`), never a stopped shard.
"""
from __future__ import annotations

import codecs
import contextlib
import functools
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractBufferedFile

from cleaning.compression import STREAM_ERRORS, compression, decompressed
from cleaning.compression import SUFFIXES as COMPRESSED_SUFFIXES
from cleaning.document import Document, Rejection, writable
from cleaning.ids import generated_id
from cleaning.webpage import Favor, decode_html, extract_main_content, legacy_codec, looks_like_html_document

Format = Literal["jsonl", "parquet", "arrow", "csv", "txt", "html", "wiki"]


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the text, id, domain, source and url."""

    text: str = "text"
    id: str = "id"
    domain: str = "domain"
    source: str = "source"
    url: str = "url"


class ShardReadError(Exception):
    """A file could not be read (further); the message names the file and where."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.message = message


@dataclass(frozen=True)
class ReadFault:
    """A part of a file that could not be read, while the rest of the file was: what and how much.

    `rows` counts the records lost where the format knows it (Parquet row groups), `bytes` the
    compressed bytes skipped where it does not (gzip members)."""

    path: str
    where: str
    message: str
    rows: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        lost = ", ".join(f"{n} {unit} lost" for n, unit in ((self.rows, "rows"), (self.bytes, "bytes")) if n)
        return f"{self.path}, {self.where}: {self.message}" + (f" ({lost})" if lost else "")


# Input suffixes and their formats; the text formats may also end in a compression's suffix
# (`cleaning.compression.SUFFIXES`: `.jsonl.zst`, `.txt.gz`), Parquet compresses inside.
_FORMATS: list[tuple[str, Format]] = [
    (".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"), (".arrow", "arrow"),
    (".csv", "csv"), (".tsv", "csv"), (".txt", "txt"), (".html", "html"), (".htm", "html"), (".xhtml", "html"),
]
_COLUMNAR: tuple[Format, ...] = ("parquet", "arrow")  # compressed inside, never as a whole file

# First bytes of the containers a mislabelled input may hold.
PARQUET_MAGIC = b"PAR1"
_ARCHIVE_MAGIC = {b"PK\x03\x04": "a zip archive", b"7z\xbc\xaf\x27\x1c": "a 7z archive"}
UNPACK_HINT = "unpack it and give its files (JSON lines and text may stay compressed, as gzip, bzip2, xz or zstd)"


# A line that opens an object and holds nothing else: no JSON line is one.
_LONE_BRACE = re.compile(rb"(?m)^\{[ \t\r]*$")
#: how much of a .json file's content tells JSON lines from one JSON document (`is_json_document`)
JSON_SNIFF_BYTES = 64 * 1024
#: the largest JSON document read whole (its content, decompressed); larger ones must be JSON lines
JSON_DOCUMENT_MAX_BYTES = 256 * 1024 * 1024


def is_json_document(opening: bytes) -> bool:
    """Whether content starting with `opening` is one JSON document (an array of records, or
    pretty-printed objects) rather than JSON lines: it opens an array; or it has a line that is a lone
    `{` (what pretty-printers open an object with, also after a damaged first line); or its first line
    opens an object that the line does not close and the next line does not open another (a JSON line
    cut short)."""
    start = opening.lstrip(b"\xef\xbb\xbf").lstrip()
    if start.startswith(b"["):
        return True
    # An opening cut just after `\n{` ends in a lone brace that opens the next JSON line: complete lines only
    whole = start if len(opening) < JSON_SNIFF_BYTES else start[: start.rfind(b"\n") + 1]
    if _LONE_BRACE.search(whole):
        return True
    if not start.startswith(b"{"):
        return False
    first, _, rest = start.partition(b"\n")
    first = first.rstrip()
    if not rest.strip() and len(opening) >= JSON_SNIFF_BYTES:
        return False  # a first line longer than the opening: a JSON-lines record
    if rest.lstrip(b"\r\n").startswith(b"{"):
        return False  # the next line opens an object: JSON lines whose first record is broken
    try:
        json.loads(first.decode("utf-8", "replace"))
    except json.JSONDecodeError as err:
        return err.pos >= len(first.decode("utf-8", "replace"))  # the line ended before the object did
    except RecursionError:
        return False
    return False


# Raised when the readers give other documents for the same bytes (cleaning.build's clean cache keys on it):
# 2 reads UTF-16 without a byte-order mark, decides the encoding of an ASCII opening by its first other bytes,
# ends lines at lone CRs, names generic shard files (part-00000) after their folder, and drops the blanks
# around a record's source and domain names.
READER_REVISION = 2

# A surrogate left alone by a UTF-16 decoder ("surrogatepass"): a unit that is not UTF-16.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The characters of text a Chinese corpus takes in: Latin, Greek and Cyrillic, punctuation and symbols, CJK
# (punctuation, kana, bopomofo, ideographs, fullwidth forms). Other bytes read as UTF-16 give mostly others
# (UTF-8 or GBK Chinese: Hangul, Yi, private use), and so does UTF-16 read in the wrong byte order.
_TEXT_CHARACTERS = re.compile("[\t\n\r\x20-\u024f\u0370-\u04ff\u2000-\u27bf\u3000-\u312f\u4e00-\u9fff"
                              "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U0001f000-\U0001faff\U00020000-\U0003ffff]+")


def utf16_codec(opening: bytes) -> str | None:
    """The UTF-16 codec of content that starts with `opening`, or None: "utf-16" after a byte-order mark;
    without one (what some Windows tools write), "utf-16-le" or "utf-16-be" when the opening holds NUL
    bytes and reads as text in that byte order. No UTF-8, GB18030 or Big5 text holds a NUL byte, while
    UTF-16 holds one in every character below U+0100, its line ends among them; but a stray NUL (or a run
    of them, padding) in a file of another encoding must not make it UTF-16. So the reading must hold
    (in its first `JSON_SNIFF_BYTES`):
    - no NUL character (what a run of NUL bytes gives) and at most one lone surrogate in a thousand
      characters (one damaged unit does not make a UTF-16 file GB18030; other bytes give one in dozens);
    - nine characters in ten of text (`_TEXT_CHARACTERS`);
    - a line end for at least every 64 0x0A bytes, and one at all where there are some: in UTF-16 a 0x0A
      byte that is not a line end is half of a character such as 上 (U+4E0A, 0A 4E), while the line ends
      of a UTF-8 file read as UTF-16 pair with their neighbours into other characters.
    Where both byte orders pass, the one with more characters of text wins."""
    if opening.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if not opening or opening.count(b"\x00") * 2048 < len(opening):
        return None  # none, or strays: UTF-16 has one in every character below U+0100, a line end among them
    line_ends = opening.count(b"\n")
    found: list[tuple[int, str]] = []
    for codec in ("utf-16-le", "utf-16-be"):
        text = codecs.getincrementaldecoder(codec)("surrogatepass").decode(opening)  # a cut character waits
        if "\x00" in text or len(_SURROGATE.findall(text)) * 1000 > len(text):
            continue
        lines = text.count("\n")
        readable = sum(len(run) for run in _TEXT_CHARACTERS.findall(text))
        if readable * 10 >= len(text) * 9 and lines * 64 >= line_ends:
            found.append((readable, codec))
    return max(found)[1] if found else None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _sniffed_codec(sample: bytes, cut: bool) -> str:
    """The codec of text whose bytes start with `sample` (`cut`: it ends where the content goes on, maybe
    inside a character): UTF-8, or, when the sample is mostly not UTF-8, the legacy Chinese encoding it
    reads as (GB18030, which GBK and GB2312 files are, or Big5-HKSCS; `cleaning.webpage.legacy_codec`). A
    few bad bytes in UTF-8 text stay UTF-8: those lines are rejected, not read as another encoding."""
    sample = sample[:-3] if cut else sample  # not a character cut in two
    decoded = sample.decode("utf-8", errors="replace")
    bad = decoded.count("\ufffd")
    if bad == 0 or bad * 4 < sum(1 for char in decoded if ord(char) > 127):
        return "utf-8"
    # Or most of its lines with other bytes than ASCII are UTF-8: a damaged line among a few others, in a
    # mostly English stretch, outvotes them by its bytes but not by its lines. (A GBK or Big5 line of more
    # than a character or two is never UTF-8.)
    others = [line for line in sample.split(b"\n")[: -1 if cut else None] if not line.isascii()]
    if 2 * sum(1 for line in others if _is_utf8(line)) > len(others):
        return "utf-8"
    return legacy_codec(sample, ("gb18030", "big5hkscs"))


# The names of a dataset's splits, and its `data` folder (the Hub's `ds/data/train-00000-of-00001.parquet`):
# folders above a file that name no source.
_SPLIT_NAMES = {"train", "validation", "valid", "dev", "test"}
_NO_SOURCE_FOLDERS = _SPLIT_NAMES | {"data"}
# A file name that only counts shards (without its suffixes): `part-00000`, `part-r-00000` (Hadoop),
# `part-00000-<uuid>-c000.snappy` (Spark), `data-00000-of-00001` (`datasets.save_to_disk`),
# `train-00000-of-00012-<hash>` (the Hub), `shard_07`, `chunk-3`, `00012`.
# A bare number counts shards only zero-padded: `2021.jsonl` and `2022.jsonl` are two years, two sources.
_SHARD_COUNTER = re.compile(r"(?:(?:part|data|shard|chunk|train|validation|valid|dev|test)(?:-[rm])?[-_.]?\d+|0\d+)"
                            r"(?:-of-\d+)?(?:-[0-9a-f]{8,}(?:-[0-9a-f]{4,})*)?(?:-c\d+)?"
                            r"(?:\.(?:snappy|zstd|gz|lz4|brotli))?", re.IGNORECASE)
# WikiExtractor's output files (`text/AA/wiki_00`, `wiki_00.bz2` with --compress), which have no suffix:
# the tool every Chinese Wikipedia corpus is made with.
_WIKIEXTRACTOR_FILE = re.compile(r"wiki_\d{2,}")


def _suffix(path: str) -> tuple[str, Format] | None:
    """The input suffix `path` ends with (a compression's suffix after it included) and its format."""
    lowered = path.lower()
    for compressed in ("", *COMPRESSED_SUFFIXES):
        if compressed and not lowered.endswith(compressed):
            continue
        base = lowered[:len(lowered) - len(compressed)]
        for suffix, fmt in _FORMATS:
            if base.endswith(suffix) and (fmt not in _COLUMNAR or not compressed):
                return suffix + compressed, fmt
        if _WIKIEXTRACTOR_FILE.fullmatch(os.path.basename(base)):
            return compressed, "wiki"
    return None


def detect_format(path: str) -> Format:
    found = _suffix(path)
    if found is None:
        raise ShardReadError(path, f"unknown input format (expected {supported_suffixes()})")
    return found[1]


def supported_suffixes() -> str:
    """The input file suffixes, as messages name them: `.jsonl/.json/..., plain or .gz/.zst/..., or .parquet/.arrow`."""
    texts = "/".join(suffix for suffix, fmt in _FORMATS if fmt not in _COLUMNAR)
    columnar = "/".join(suffix for suffix, fmt in _FORMATS if fmt in _COLUMNAR)
    return f"{texts}, plain or {'/'.join(COMPRESSED_SUFFIXES)}, or {columnar}"


def is_supported(path: str) -> bool:
    return _suffix(path) is not None


def shard_name(path: str) -> str:
    """Short name of an input file, the default source and domain: the basename without extensions; for a
    file whose name only counts shards (`_SHARD_COUNTER`: `weibo/part-00000.jsonl`, a Hugging Face dataset's
    `ds/train/data-00000-of-00001.arrow` or `ds/data/train-00000-of-00001.parquet`), the name of the nearest
    folder above it that is not a split or `data`: the dataset's name is its folder's, and `part-00000` of
    two sources must not make them one domain."""
    base = os.path.basename(path.rstrip("/"))
    found = _suffix(base)
    if found is None:
        return base
    if found[1] == "wiki":
        return "wiki"  # one source for the whole dump, not one per file of it
    stem = base[: len(base) - len(found[0])]
    parents = [part for part in path.split("://", 1)[-1].rstrip("/").split("/")[:-1] if part]
    if _SHARD_COUNTER.fullmatch(stem) and parents:
        while len(parents) > 1 and parents[-1].lower() in _NO_SOURCE_FOLDERS:
            parents.pop()  # `DatasetDict.save_to_disk`: DIR/train/data-00000-of-00001.arrow
        return parents[-1]
    return stem


@functools.lru_cache(maxsize=64)
def _path_names(path: str) -> tuple[str, str]:
    """The path and its `shard_name`, storable (`writable`): asked for every record of a file."""
    return writable(path), writable(shard_name(path))


def _field_text(value: Any) -> str:
    """A record's id, domain, source or url as text: a list or an object as JSON (Python's repr, with its
    single quotes, is no format a consumer reads), bytes decoded, a number as written."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _name_text(*values: Any) -> str:
    """A source or domain name: the first of `values` with text, its surrounding blanks dropped (" web " and
    "web" are one domain, one set of PanGu-Σ experts, not two)."""
    for value in values:
        text = _field_text(value).strip() if value else ""  # 0, False, [] and {} name nothing, as before
        if text:
            return text
    return ""


def _preview(raw: bytes | str, limit: int = 2000) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else writable(raw)
    return text[:limit]


def _unencodable(value: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return err.start


# Where a plain-text block too long for one document is cut: after a sentence end, and after the
# closing quotes or brackets that follow it.
_SENTENCE_ENDS = "。！？!?；\n"
_CLOSERS = "”’」』）)》】\"'"


def sentence_cut(text: str, limit: int) -> int:
    """Where to cut `text` so that its first piece holds at most `limit` characters: after the last
    sentence end within them, or at `limit` when they hold none."""
    end = max(text.rfind(mark, 0, limit) for mark in _SENTENCE_ENDS)
    if end < 0:
        return limit
    cut = end + 1
    while cut < limit and text[cut] in _CLOSERS:
        cut += 1
    return cut


# Bytes that a text's codec did not decode, kept as lone surrogates by the "surrogateescape" handler.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _first_escaped_byte(text: str, codec: str) -> int | None:
    """The offset, in `text`'s bytes, of the first byte that `codec` did not decode (`_ESCAPED_BYTE`), or None."""
    bad = _ESCAPED_BYTE.search(text)
    return None if bad is None else len(text[:bad.start()].encode(codec, "surrogateescape"))
# What may stand between JSON values one after another: JSON's whitespace, and commas (an array's
# elements written without their brackets).
_BETWEEN_VALUES = re.compile(r"[ \t\n\r,]*")
_DECODER = json.JSONDecoder()
# The indentation of a pretty-printed array's elements: that of its first line opening an object.
_ELEMENT_INDENT = re.compile(r"\n([ \t]*)\{")


@dataclass(frozen=True)
class _JsonValue:
    start: int  # offsets in the text
    end: int
    line: int  # the line it starts on (from 1)
    last_line: int  # the line it ends on
    value: Any = None
    error: str | None = None  # why the text from `start` to `end` does not parse
    next_line: int = 0  # the line the next value is looked for from
    unit: str = "line"  # what `line`, `last_line` and `next_line` count (a one-line array's "element")


def _json_values(text: str, pos: int = 0, stop: int | None = None, line: int = 1,
                 indent: str = "") -> list[_JsonValue]:
    """The objects of JSON text holding several one after another (from `pos`, which is on `line`, to
    `stop`), with the lines each spans. Text that is not one (it does not parse, or it is another kind of
    value) is one error value up to the next line that opens an object after `indent` (at its first
    column: where the next pretty-printed object or JSON line starts), where reading resumes."""
    stop = len(text) if stop is None else stop
    next_object = re.compile("\n" + re.escape(indent) + r"(?=\{)")
    values: list[_JsonValue] = []
    while True:
        start = _BETWEEN_VALUES.match(text, pos, stop).end()
        line += text.count("\n", pos, start)
        if start >= stop:
            return values
        value, error = None, None
        if text[start] != "{":
            error = f"a line that does not open an object ({text[start:start + 20]!r})"
        else:
            try:
                value, end = _DECODER.raw_decode(text, start)
            except json.JSONDecodeError as err:
                error = _json_error(err, f"line {line + text.count(chr(10), start, err.pos)}")
            except RecursionError:
                error = "nested too deeply"
        if error is None:
            last = next_line = line + text.count("\n", start, end)
        else:
            resume = next_object.search(text, start, stop)
            end = resume.end() if resume else stop
            next_line = line + text.count("\n", start, end)
            last = next_line - 1 if resume else next_line  # the span ends with the newline before the next object
        values.append(_JsonValue(start, end, line, last, value, error, next_line))
        pos, line = end, next_line


def _array_elements(text: str) -> list[_JsonValue]:
    """The elements of a JSON array that does not parse as a whole (a download cut short, one broken
    element): each element that parses, and the text between them that does not, found from the lines
    that open an object at the indentation of the elements; in an array written on one line, from the
    commas before an object (`_one_line_elements`)."""
    opening = text.index("[")
    content = text.rstrip()
    stop = len(content) - 1 if content.endswith("]") and len(content) - 1 > opening else len(text)  # a cut: no "]"
    first = _ELEMENT_INDENT.search(text, opening, stop)
    if first is None:  # no element opens a line (a newline, if any, is damage inside one)
        return _one_line_elements(text, opening + 1, stop)
    return _json_values(text, opening + 1, stop, 1 + text.count("\n", 0, opening), first.group(1))


# Where the next element of an array written on one line may start: a comma, then an object.
_NEXT_ELEMENT = re.compile(r",[ \t\r]*(?=\{)")
_SPACE = re.compile(r"[ \t\r]*")


def _one_line_elements(text: str, pos: int, stop: int) -> list[_JsonValue]:
    """The elements of an array written on one line (`json.dump`'s default), from `pos` to `stop`, numbered
    from 1 as a whole array's are: each that parses, and text that does not as one error value up to the
    next comma before an object that parses and ends where an element ends (at a comma or at `stop`: an
    object nested in the broken element is not taken for one)."""
    values: list[_JsonValue] = []
    number = 1
    while True:
        start = _BETWEEN_VALUES.match(text, pos, stop).end()
        if start >= stop:
            return values
        value, end, error = _element(text, start)
        if error is not None:
            end = stop
            for comma in _NEXT_ELEMENT.finditer(text, start + 1, stop):
                _, after, wrong = _element(text, comma.end())
                follow = _SPACE.match(text, after, stop).end() if wrong is None else stop
                if wrong is None and (follow >= stop or text[follow] == ","):
                    end = comma.start()
                    break
        values.append(_JsonValue(start, end, number, number, value, error, number + 1, unit="element"))
        pos, number = end, number + 1


def _element(text: str, start: int) -> tuple[Any, int, str | None]:
    """The object that starts at `start`, where it ends, and why it is not one (None when it is)."""
    if text[start] != "{":
        return None, start, f"not an object ({text[start:start + 20]!r})"
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as err:
        return None, start, _json_error(err, f"column {err.colno}")
    except RecursionError:
        return None, start, "nested too deeply"
    return value, end, None


def _json_error(err: json.JSONDecodeError, place: str) -> str:
    """The parser's message with where it failed: "Unterminated string starting at column 9" (its message
    for a string already ends with "at"), "Expecting ':' delimiter at line 5"."""
    return f"{err.msg} {place}" if err.msg.endswith(" at") else f"{err.msg} at {place}"


# WikiExtractor's article tags: `<doc id="13" url="https://zh.wikipedia.org/wiki?curid=13" title="数学">`.
_WIKI_OPEN = re.compile(r"<doc\s+([^>]*)>\s*$")
_WIKI_ATTR = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class _TextEncoding:
    """How a text file's content becomes text (`RecordReader._encoding`)."""

    opening: bytes  # its first `JSON_SNIFF_BYTES`, as UTF-8 when it is UTF-16: what the sniffers read
    codec: str | None  # what its lines decode with; None: its opening is ASCII, which decides nothing
    utf16: str | None = None  # the UTF-16 codec its content is read through as UTF-8 (`_Utf16AsUtf8`)


# A CR that ends a line on its own, as Mac OS before X wrote text.
_LONE_CR = re.compile(rb"\r(?!\n)")


@dataclass
class RecordReader:
    """Reads one input file into documents. `max_record_bytes` bounds memory per record (and per web
    page), `txt_max_chars` the size of a plain-text document."""

    fields: FieldMap = FieldMap()
    txt_split: Literal["blank_line", "line"] = "blank_line"
    txt_max_chars: int = 100_000
    html: Literal["auto", "always", "never"] = "auto"
    html_favor: Favor = "balanced"
    html_fallback: bool = False
    max_record_bytes: int = 64 * 1024 * 1024
    default_domain: str | None = None
    storage_options: dict[str, Any] | None = None

    def read(self, path: str, name: str | None = None,
             part: tuple[int, ...] | None = None) -> Iterator[Document | Rejection | ReadFault]:
        """Records of one file, or of one part of it (`cleaning.inputs.hash_and_split`: byte offsets
        of a JSON-lines file, row groups of a Parquet file, and the records before the part, so that
        line and row numbers are the file's). `name` (default: the base name) prefixes generated ids;
        a build passes the path relative to the input root so that ids are unique across its inputs."""
        fmt = detect_format(path)
        name = writable(name or os.path.basename(path.rstrip("/")))
        try:
            head = self._head(path)
            if fmt == "jsonl" and head.startswith(PARQUET_MAGIC):  # no JSON line starts so
                fmt = "parquet"
            kind = compression(head)
            if part is not None and (fmt not in ("jsonl", "parquet") or kind):
                raise ShardReadError(path, f"a {fmt} file{f' ({kind})' if fmt == 'jsonl' else ''} is "
                                           f"read whole, not in parts")
            archive = next((what for magic, what in _ARCHIVE_MAGIC.items() if head.startswith(magic)), None)
            if archive and fmt not in _COLUMNAR:
                raise ShardReadError(path, f"{archive}, which is not read: {UNPACK_HINT}")
            if fmt == "parquet":
                yield from self._read_parquet(path, name, part)
            elif fmt == "arrow":
                yield from self._read_arrow(path, name)
            elif fmt == "jsonl":
                yield from self._read_jsonl(path, name, head, part)
            elif fmt == "html":
                yield from self._read_html(path, name, head)
            elif fmt == "wiki":
                yield from self._read_wiki(path, name, head)
            elif fmt == "csv":
                yield from self._read_csv(path, name, head)
            else:
                yield from self._read_txt(path, name, head)
        except ShardReadError:
            raise
        except FileNotFoundError as err:
            raise ShardReadError(path, f"file not found ({err})") from err
        except PermissionError as err:
            raise ShardReadError(path, f"permission denied ({err})") from err
        except Exception as err:  # noqa: BLE001 - whatever stops a file is reported, never fatal to a build
            raise ShardReadError(path, f"unreadable: {type(err).__name__}: {err}") from err

    def _head(self, path: str) -> bytes:
        with fsspec.open(path, "rb", **(self.storage_options or {})) as fh:
            return fh.read(8)

    # -- record assembly -------------------------------------------------------------------
    def _document(self, record: dict[str, Any], path: str, name: str, line: int | None, piece: int | None = None,
                  html: bool | None = None, meta: dict[str, Any] | None = None,
                  unit: str = "line") -> Document | Rejection:
        """A record as a document, or the rejection that says why it cannot be one. `html`: whether
        its text is a web page to extract the main content of (None: as `self.html` says);
        `line` None: the file is one document; `unit`: what `line` counts (an array's "element")."""
        f = self.fields
        writable_path, base = _path_names(path)
        rid = record.get(f.id)
        doc_id = _field_text(rid) if rid not in (None, "") else generated_id(name, line, piece)
        source = _name_text(record.get(f.source), record.get(f.domain), self.default_domain, base)
        domain = _name_text(record.get(f.domain), record.get(f.source), self.default_domain, base)
        url = record.get(f.url)
        url = _field_text(url) if url else None
        meta = {"input": writable_path, **({unit: line} if line is not None else {}), **(meta or {})}
        text = record.get(f.text)
        where = f"{path}, {unit} {line}" if line is not None else path
        if text is not None and not isinstance(text, str):
            text = json.dumps(text, ensure_ascii=False, default=str)[:2000]
            return self._rejection(doc_id, text, domain, source, url, meta, "invalid_text",
                                   f"{where}: '{f.text}' is {type(record.get(f.text)).__name__}, not a string")
        for field_name, value in ((f.text, text), (f.id, doc_id), (f.domain, domain), (f.source, source),
                                  (f.url, url)):
            bad = _unencodable(value) if value else None
            if bad is not None:
                return self._rejection(doc_id, text or "", domain, source, url, meta, "invalid_unicode",
                                       f"{where}: '{field_name}' holds U+{ord(value[bad]):04X} at character "
                                       f"{bad}, a lone surrogate that UTF-8 cannot encode")
        if text is None:
            if f.text in record:  # a JSON null, a Parquet null: the field is there, empty
                return self._rejection(doc_id, "", domain, source, url, meta, "missing_text",
                                       f"{where}: '{f.text}' is null")
            keys = ", ".join(map(str, list(record)[:8])) + (", ..." if len(record) > 8 else "")
            return self._rejection(doc_id, "", domain, source, url, meta, "missing_text",
                                   f"{where}: no '{f.text}' field" + (f" (it has {keys})" if keys else ""))
        if "\x00" in text:
            return self._rejection(doc_id, text, domain, source, url, meta, "control_characters",
                                   f"{where}: '{f.text}' holds {text.count(chr(0))} NUL characters "
                                   "(binary data, or text in another encoding)")
        doc = Document(id=doc_id, text=text, domain=domain, source=source, url=url, meta=meta)
        if html is None:
            html = self.html == "always" or (self.html == "auto" and looks_like_html_document(text))
        return self._main_content(doc, where) if html else doc

    def _main_content(self, doc: Document, where: str) -> Document | Rejection:
        """`doc` with its HTML replaced by the page's main content; a rejection keeping the HTML when
        there is none or the parser fails."""
        markup = doc.text
        try:
            text = extract_main_content(markup, self.html_favor, self.html_fallback)
        except Exception as err:  # noqa: BLE001 - a page the parser chokes on is one rejection, not a stopped shard
            return Rejection(doc, "html_no_content", f"{where}: the HTML parser failed: {type(err).__name__}: "
                                                     f"{str(err)[:500]}")
        if not text:
            what = "an empty page" if not markup.strip() else f"{len(markup)} characters of HTML"
            return Rejection(doc, "html_no_content", f"{where}: no main content in {what}")
        doc.text = text
        doc.meta["html_chars"] = len(markup)
        return doc

    @staticmethod
    def _rejection(doc_id: str, text: str, domain: str, source: str, url: str | None, meta: dict,
                   reason: str, detail: str) -> Rejection:
        doc = Document(id=writable(doc_id), text=writable(text), domain=writable(domain), source=writable(source),
                       url=writable(url) if url else None, meta=meta)
        return Rejection(doc, reason, detail)

    def _raw_rejection(self, path: str, name: str, line: int | None, raw: bytes | str, reason: str, detail: str,
                       source: str | None = None, domain: str | None = None, unit: str = "line") -> Rejection:
        """A record that never became a document (undecodable, too large, incomplete), with its
        first bytes. `line` None: the file is one document."""
        base = self.default_domain or shard_name(path)
        meta: dict[str, Any] = {"input": writable(path), **({unit: line} if line is not None else {})}
        doc = Document(id=writable(generated_id(name, line)), text=_preview(raw, 1 << 20),
                       domain=writable(domain or base), source=writable(source or base), meta=meta)
        where = f"{path}, {unit} {line}" if line is not None else path
        return Rejection(doc, reason, f"{where}: {detail}")

    # -- formats ---------------------------------------------------------------------------
    def _lines(self, path: str, head: bytes, part: tuple[int, ...] | None = None, utf16: str | None = None,
               cr_lines: bool = False) -> Iterator[tuple[int, bytes, bool] | ReadFault]:
        """(line number, raw bytes, complete) for every line; oversized lines are cut short.

        Compressed content is read when the bytes say so, whatever the name (`cleaning.compression`).
        A corrupt gzip member is skipped up to the next intact member (a `ReadFault` counts the bytes
        skipped); a gzip stream that ends early yields every complete line before the damage, then the
        partial last line as incomplete, then raises `ShardReadError`. Damage to a bzip2, xz or zstd
        stream raises `ShardReadError` after the whole lines before it. `utf16`: the content's UTF-16
        codec, its lines come out as UTF-8 (`_Utf16AsUtf8`; a damaged gzip stream of it is read up to the
        damage only: what follows a skipped gap need not start on a character); `cr_lines`: a lone CR
        ends a line too (`_CrLines`).
        """
        kind = compression(head)
        gzip_lines = kind == "gzip" and not utf16
        with self._content(path, None if gzip_lines else kind, utf16) as (raw, content):
            gz = _GzipLines(raw) if gzip_lines else None  # skips a corrupt member to the next one
            stream = _CrLines(gz or content) if cr_lines else gz or content
            damage = STREAM_ERRORS if kind and gz is None else ()  # what a plain file raises is not damage
            number = 0
            stop = None
            if part is not None:  # parts of plain files only (`read`): offsets are the file's bytes
                start, stop, number = part[:3]
                raw.seek(start)

            def gaps(passed: bool) -> Iterator[ReadFault]:
                for start, end, why in gz.pop_gaps(passed) if gz is not None else ():
                    yield ReadFault(path, f"compressed bytes {start}-{end}, after line {number}", why,
                                    bytes=end - start)

            try:
                while True:
                    # A part's last line is the one that ends at `stop` (parts are cut after a newline).
                    chunk = stream.readline(self.max_record_bytes + 1) if stop is None or raw.tell() < stop else b""
                    yield from gaps(passed=bool(chunk))  # damage before this line (or at the end)
                    if not chunk:
                        return
                    number += 1
                    if len(chunk) > self.max_record_bytes and not chunk.endswith(b"\n"):
                        while True:  # drain the rest of the oversized line without holding it
                            rest = stream.readline(self.max_record_bytes)
                            if not rest or rest.endswith(b"\n"):
                                break
                        yield number, chunk[:4096], False
                    else:
                        yield number, chunk, True
                    yield from gaps(passed=False)  # the damage came right after it
            except _TruncatedStream as err:
                raise ShardReadError(path, f"truncated or corrupt gzip stream after line {number}: {err}",
                                     line=number + 1) from err
            except damage as err:
                raise ShardReadError(path, f"truncated or corrupt {kind} stream after line {number}: "
                                           f"{type(err).__name__}: {err}", line=number + 1) from err

    def _read_jsonl(self, path: str, name: str, head: bytes, part: tuple[int, ...] | None = None,
                    encoding: _TextEncoding | None = None) -> Iterator[Document | Rejection | ReadFault]:
        encoding = self._encoding(path, head) if encoding is None else encoding
        if part is None and is_json_document(encoding.opening):
            records = self._json_document(path, name, compression(head), encoding)
            if records is not None:
                yield from records
                return
        for item in self._text_lines(path, head, encoding, part):
            if isinstance(item, ReadFault):
                yield item
                continue
            number, raw, complete, codec = item
            if not complete:
                yield self._raw_rejection(path, name, number, raw, "record_too_large",
                                          f"record exceeds {self.max_record_bytes} bytes")
                continue
            if not raw.strip():
                continue  # blank line between records: nothing to account for
            try:
                decoded = raw.decode(codec)
            except UnicodeDecodeError as err:
                yield self._undecodable(path, name, number, raw, codec, err.start)
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as err:
                yield self._raw_rejection(path, name, number, raw, "corrupt_json",
                                          f"corrupt JSON: {_json_error(err, f'column {err.colno}')}")
                continue
            except RecursionError:
                yield self._raw_rejection(path, name, number, raw, "corrupt_json", "corrupt JSON: nested too deeply")
                continue
            if not isinstance(record, dict):
                yield self._raw_rejection(path, name, number, raw, "corrupt_json",
                                          f"expected a JSON object, got {type(record).__name__}")
                continue
            yield self._document(record, path, name, number)

    @contextlib.contextmanager
    def _content(self, path: str, kind: str | None, utf16: str | None = None) -> Iterator[tuple[BinaryIO, BinaryIO]]:
        """(raw, content): the file's bytes, buffered, and its content, decompressed as `kind`
        (`cleaning.compression`) says (`raw` itself when None), and read as UTF-8 from `utf16`, the
        UTF-16 codec it is in (`_Utf16AsUtf8`)."""
        with fsspec.open(path, "rb", **(self.storage_options or {})) as raw:
            if isinstance(raw, AbstractBufferedFile):  # object stores: their readline() takes no limit
                raw = io.BufferedReader(raw, 1 << 20)
            content = decompressed(raw, kind) if kind else raw
            yield raw, (io.BufferedReader(_Utf16AsUtf8(content, utf16), 1 << 20) if utf16 else content)

    def _opening(self, path: str, head: bytes) -> bytes:
        """The first `JSON_SNIFF_BYTES` of the file's content (decompressed when the bytes say so)."""
        kind = compression(head)
        with self._content(path, kind) as (_, content):
            try:
                return content.read(JSON_SNIFF_BYTES)
            except STREAM_ERRORS:
                if not kind:
                    raise
                return b""  # damaged: the line reader recovers what it can and reports the rest

    def _encoding(self, path: str, head: bytes) -> _TextEncoding:
        """How a text file (plain text, JSON, CSV) decodes, from its opening: UTF-16 (`utf16_codec`) is read
        as UTF-8; the rest as `_text_codec` says."""
        opening = self._opening(path, head)
        utf16 = utf16_codec(opening)
        if utf16 is None:
            return _TextEncoding(opening, self._text_codec(opening))
        decoder = codecs.getincrementaldecoder(utf16)("surrogatepass")  # as `_Utf16AsUtf8` reads it
        return _TextEncoding(decoder.decode(opening).encode("utf-8", "surrogatepass"), "utf-8", utf16)

    @staticmethod
    def _text_codec(opening: bytes) -> str | None:
        """How a text file's lines (plain text or JSON) decode, from its opening: UTF-8 (its byte-order
        mark dropped) or a legacy Chinese encoding (`_sniffed_codec`); None when the opening is ASCII and
        the file goes on after it: ASCII is what every one of these encodings starts with, so the first
        bytes that are not ASCII decide (`_text_lines`). A GBK file that opens with 64 KiB of English lost
        its Chinese, each line an `invalid_utf8` rejection."""
        if opening.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        if len(opening) == JSON_SNIFF_BYTES and opening.isascii():
            return None
        return _sniffed_codec(opening, cut=len(opening) == JSON_SNIFF_BYTES)

    def _text_lines(self, path: str, head: bytes, encoding: _TextEncoding, part: tuple[int, ...] | None = None,
                    cr_lines: bool = False) -> Iterator[tuple[int, bytes, bool, str] | ReadFault]:
        """`_lines`, each with the codec it decodes with: the file's (`_encoding`), or, when its opening was
        ASCII, the one that its first lines with other bytes read as (`_sniffed_codec` over up to
        `JSON_SNIFF_BYTES` of them, held back until then). No line is read twice: a large UTF-8 file costs
        what it did, one `isascii` a line until its first other byte."""
        lines = self._lines(path, head, part, encoding.utf16, cr_lines)
        codec = encoding.codec
        held: list[tuple[int, bytes, bool] | ReadFault] = []  # from the first line that is not ASCII on
        size = 0

        def decided() -> Iterator[tuple[int, bytes, bool, str] | ReadFault]:
            nonlocal codec
            if not held:
                return
            sample = b"".join(item[1] for item in held if not isinstance(item, ReadFault))
            codec = _sniffed_codec(sample[:JSON_SNIFF_BYTES], cut=len(sample) > JSON_SNIFF_BYTES)
            yield from (item if isinstance(item, ReadFault) else (*item, codec) for item in held)
            held.clear()

        try:
            for item in lines:
                if codec is None and (held or not (isinstance(item, ReadFault) or item[1].isascii())):
                    held.append(item)
                    size += 0 if isinstance(item, ReadFault) else len(item[1])
                    if size >= JSON_SNIFF_BYTES:
                        yield from decided()
                elif isinstance(item, ReadFault):
                    yield item
                else:
                    yield (*item, codec or "utf-8")  # ASCII before the first other byte: UTF-8 reads it
        except Exception:  # damage, or a read error of the filesystem: the lines before it are not lost
            yield from decided()
            raise
        yield from decided()

    def _undecodable(self, path: str, name: str, line: int, raw: bytes | str, codec: str, at: int,
                     unit: str = "line") -> Rejection:
        """The rejection of a record that its file's codec (`_text_lines`) does not decode at byte `at` (`raw`:
        its bytes, or its text with the bytes kept as `_ESCAPED_BYTE`)."""
        if isinstance(raw, str):
            raw = raw.encode(codec, "surrogateescape")
        if codec.startswith("utf-8"):
            return self._raw_rejection(path, name, line, raw, "invalid_utf8", f"invalid UTF-8 at byte {at}", unit=unit)
        return self._raw_rejection(path, name, line, raw, "invalid_encoding",
                                   f"not {codec} at byte {at} (the file reads as {codec}: its opening is not UTF-8)",
                                   unit=unit)

    def _json_document(self, path: str, name: str, kind: str | None,
                       encoding: _TextEncoding) -> Iterator[Document | Rejection] | None:
        """The records of a .json file read whole: one JSON document (an array's elements, or one object),
        or objects one after another (`_json_values`); None when its values are JSON lines after all
        (each on a line of its own: the line reader reads them). An array that does not parse gives the
        elements that do, numbered by line (`_array_elements`); a document in which no record can be told
        apart stops the file, with one message."""
        with self._content(path, kind, encoding.utf16) as (_, content):
            try:
                data = content.read(JSON_DOCUMENT_MAX_BYTES + 1)
            except STREAM_ERRORS as err:
                if not kind:
                    raise
                raise ShardReadError(path, f"one JSON document in a damaged {kind} stream ({err})") from None
        if len(data) > JSON_DOCUMENT_MAX_BYTES:
            raise ShardReadError(path, f"one JSON document larger than {JSON_DOCUMENT_MAX_BYTES >> 20} MiB, which is "
                                       "not read whole; write it as JSON lines (one record per line: "
                                       "`jq -c '.[]' FILE > FILE.jsonl` for an array, `jq -c . FILE > "
                                       "FILE.jsonl` for objects one after another)")
        codec = encoding.codec
        if codec is None:  # an ASCII opening: the bytes from the first that is not decide, as in `_text_lines`
            other = re.search(rb"[^\x00-\x7f]", data)
            sample = data[other.start():other.start() + JSON_SNIFF_BYTES + 1] if other else b""
            codec = _sniffed_codec(sample[:JSON_SNIFF_BYTES], cut=len(sample) > JSON_SNIFF_BYTES)
        # Bytes the codec does not decode become lone surrogates, found again per value below.
        text = data.decode(codec, "surrogateescape")
        undecodable = _first_escaped_byte(text, codec)
        failure = None
        if undecodable is None:
            try:
                return self._json_records(json.loads(text), path, name)
            except json.JSONDecodeError as err:
                failure = err
            except RecursionError:
                pass
        values = _json_values(text)
        array = text.lstrip("\ufeff \t\r\n").startswith("[")
        if all(value.last_line == value.line for value in values) and not (array and len(values) == 1):
            return None  # JSON lines (an array on one line is one value: its elements are read below)
        if array:
            values = _array_elements(text)
        if len(values) <= 1 and not any(value.error is None for value in values):
            if undecodable is not None:
                raise ShardReadError(path, f"one JSON document with bytes that are not {codec} at byte {undecodable}")
            if failure is None:
                raise ShardReadError(path, "one JSON document nested too deeply")
            raise ShardReadError(path, f"one JSON document, corrupt at column {failure.colno}: {failure.msg}",
                                 line=failure.lineno)
        return self._json_stream(values, text, codec, path, name)

    def _json_stream(self, values: list[_JsonValue], text: str, codec: str, path: str,
                     name: str) -> Iterator[Document | Rejection]:
        """Objects one after another as records, each numbered by the line it starts on (and by its place
        on that line, `NAME:LINE#K`, where a line starts several: ids stay unique)."""
        sharing = Counter(item.line for item in values)
        place: Counter[int] = Counter()
        for index, item in enumerate(values):
            place[item.line] += 1
            piece = place[item.line] if sharing[item.line] > 1 else None
            raw = text[item.start:item.end]
            if item.error is not None:
                # A broken stretch ends where the next value starts, so only the last one runs to the end.
                after = "it runs to the end of the text" if index == len(values) - 1 else \
                    f"read on from {item.unit} {item.next_line}"
                yield self._raw_rejection(path, name, item.line, raw, "corrupt_json",
                                          f"corrupt JSON: {item.error} ({after})", unit=item.unit)
                continue
            bad = _first_escaped_byte(raw, codec)
            if bad is not None:
                yield self._undecodable(path, name, item.line, raw, codec, bad, unit=item.unit)
            else:
                yield self._document(item.value, path, name, item.line, piece=piece, unit=item.unit)

    def _json_records(self, value: Any, path: str, name: str) -> Iterator[Document | Rejection]:
        """An array's objects, element by element (numbered from 1, as lines are); an object is one record."""
        if isinstance(value, dict):
            yield self._document(value, path, name, None)
            return
        if not isinstance(value, list):
            raise ShardReadError(path, f"one JSON document holding a {type(value).__name__}, not an object or an "
                                       "array of objects")
        for number, record in enumerate(value, 1):
            if isinstance(record, dict):
                yield self._document(record, path, name, number, unit="element")
            else:
                raw = json.dumps(record, ensure_ascii=False, default=str)[:4096]
                yield self._raw_rejection(path, name, number, raw, "corrupt_json",
                                          f"expected a JSON object, got {type(record).__name__}", unit="element")

    def _read_txt(self, path: str, name: str, head: bytes) -> Iterator[Document | Rejection | ReadFault]:
        block: list[str] = []  # lines of the block being read (the part not yet handed out)
        block_chars = 0
        start = 0  # line the block starts on: its documents' ids
        piece_line = 0  # line the part not yet handed out starts on
        pieces = 0  # documents already cut from the block

        def text_document(text: str, line: int, piece: int | None, first_line: int) -> Iterator[Document | Rejection]:
            text = text.strip("\n")
            if text.strip():
                meta = {"line": first_line, "piece": piece} if piece is not None else None
                yield self._document({self.fields.text: text}, path, name, line, piece=piece, html=False, meta=meta)

        def cut_pieces() -> Iterator[Document | Rejection]:
            """Hands out the pieces of an over-long block, keeping the rest (at most txt_max_chars
            without its line end)."""
            nonlocal block_chars, piece_line, pieces
            text = "".join(block)
            while len(text) - text.endswith("\n") > self.txt_max_chars:
                cut = sentence_cut(text, self.txt_max_chars)
                pieces += 1
                yield from text_document(text[:cut], start, pieces, piece_line)
                while cut < len(text) and text[cut] == "\n":  # the next piece starts on the next line
                    cut += 1
                piece_line += text.count("\n", 0, cut)
                text = text[cut:]
            block[:] = [text]
            block_chars = len(text)

        def flush() -> Iterator[Document | Rejection]:
            nonlocal block_chars, pieces
            if block:
                if pieces:  # the end of a block that was cut: its last piece
                    yield from text_document("".join(block), start, pieces + 1, piece_line)
                else:
                    yield from text_document("".join(block), start, None, start)
                block.clear()
                block_chars = pieces = 0

        encoding = self._encoding(path, head)
        # Lines that end with a lone CR (old Mac OS text) are lines too, or a file of them is one block.
        # Only a file whose opening has no LF is read that way: in any other, a CR is no line end (ids stay).
        cr_lines = b"\n" not in encoding.opening and _LONE_CR.search(encoding.opening) is not None
        try:
            for item in self._text_lines(path, head, encoding, cr_lines=cr_lines):
                if isinstance(item, ReadFault):
                    yield from flush()
                    yield item
                    continue
                number, raw, complete, codec = item
                if not complete:
                    yield from flush()
                    yield self._raw_rejection(path, name, number, raw, "record_too_large",
                                              f"line exceeds {self.max_record_bytes} bytes")
                    continue
                try:
                    line = raw.decode(codec)
                except UnicodeDecodeError as err:
                    yield from flush()
                    yield self._undecodable(path, name, number, raw, codec, err.start)
                    continue
                if self.txt_split == "line":
                    if line.strip():
                        block[:], block_chars, start, piece_line = [line], len(line), number, number
                        if block_chars > self.txt_max_chars:
                            yield from cut_pieces()
                        yield from flush()
                    continue
                if not line.strip():
                    yield from flush()
                    continue
                if not block:
                    start = piece_line = number
                block.append(line)
                block_chars += len(line)
                if block_chars > self.txt_max_chars:
                    yield from cut_pieces()
        except ShardReadError:
            yield from flush()  # the block read before the damage is not lost
            raise
        yield from flush()

    def _read_html(self, path: str, name: str, head: bytes) -> Iterator[Document | Rejection | ReadFault]:
        """One web page: its bytes up to `max_record_bytes`, decoded, then its main content. A page
        that is too large, or that lost bytes to damage, is a rejection; the damage is still reported
        (a `ReadFault`, or `ShardReadError` after the rejection)."""
        # Pages of one directory (one site or crawl) share a source; a page is web text.
        source = writable(os.path.basename(os.path.dirname(path.rstrip("/"))) or shard_name(path))
        domain = self.default_domain or "web"
        chunks: list[bytes] = []
        size = 0
        faults: list[ReadFault] = []

        def rejected(reason: str, detail: str) -> Rejection:
            return self._raw_rejection(path, name, None, decode_html(b"".join(chunks))[0], reason, detail,
                                       source, domain)

        try:
            for item in self._lines(path, head):
                if isinstance(item, ReadFault):
                    faults.append(item)
                    continue
                _, raw, complete = item
                size += len(raw)
                if not complete or size > self.max_record_bytes:
                    yield rejected("record_too_large", f"page exceeds {self.max_record_bytes} bytes")
                    return
                chunks.append(raw)
        except ShardReadError as err:
            yield rejected("html_incomplete", f"the page was cut short: {err.message}")
            raise
        if faults:
            yield from faults
            yield rejected("html_incomplete", f"{len(faults)} damaged part(s) of the page were skipped")
            return
        raw = b"".join(chunks)
        if not raw.strip():
            yield rejected("html_no_content", "empty file")
            return
        markup, encoding = decode_html(raw)
        yield self._document({self.fields.text: markup, self.fields.source: source, self.fields.domain: domain},
                             path, name, None, html=True, meta={"encoding": encoding})

    def _read_wiki(self, path: str, name: str, head: bytes) -> Iterator[Document | Rejection | ReadFault]:
        """A file of WikiExtractor's: JSON lines (its --json) or its default form, articles between
        `<doc id=".." url=".." title="..">` and `</doc>` lines, each a document with the id and url of
        its tag (meta `title`, `line`: where the tag is). Text outside any article is one rejection per
        run of lines; an article that the next tag or the file's end cuts short is still read."""
        encoding = self._encoding(path, head)
        if encoding.opening.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
            yield from self._read_jsonl(path, name, head, encoding=encoding)
            return
        fields = self.fields
        attrs: dict[str, str] | None = None  # the tag of the article being read
        start = 0  # the line of that tag, or of the stray text being gathered
        lines: list[str] = []
        size = 0
        skipping = False  # the rest of an article already rejected as too large

        def article() -> Iterator[Document | Rejection]:
            text = "".join(lines).strip("\n")
            if attrs is not None:
                record = {fields.text: text, fields.id: attrs.get("id"), fields.url: attrs.get("url")}
                yield self._document(record, path, name, start, html=False,
                                     meta={"title": attrs.get("title", ""), "line": start})
            elif text.strip():
                yield self._raw_rejection(path, name, start, text, "corrupt_wiki",
                                          "text outside WikiExtractor's <doc ...> and </doc> lines")
            lines.clear()

        try:
            for item in self._text_lines(path, head, encoding):
                if isinstance(item, ReadFault):
                    yield item
                    continue
                number, raw, complete, codec = item
                try:
                    line = raw.decode(codec)
                except UnicodeDecodeError as err:
                    yield self._undecodable(path, name, number, raw, codec, err.start)
                    continue
                tag = _WIKI_OPEN.match(line) if complete else None
                if tag is not None or (line.rstrip() == "</doc>" and (attrs is not None or skipping)):
                    yield from article()
                    attrs, start, size = (dict(_WIKI_ATTR.findall(tag.group(1))) if tag else None), number, 0
                    skipping = False
                    continue
                if skipping:
                    continue
                if not lines and attrs is None:
                    start = number
                size += len(raw)
                if not complete or size > self.max_record_bytes:
                    yield self._raw_rejection(path, name, start, "".join(lines), "record_too_large",
                                              f"article exceeds {self.max_record_bytes} bytes")
                    lines.clear()
                    attrs, skipping = None, True
                    continue
                lines.append(line)
        except ShardReadError:
            yield from article()  # the article read before the damage is not lost
            raise
        yield from article()

    def _read_csv(self, path: str, name: str, head: bytes) -> Iterator[Document | Rejection]:
        """A table of comma- (`.csv`) or tab-separated (`.tsv`) values with a header row that names the
        fields, one document per row (quoted fields may span lines; a row's number is the line it starts
        on). A row whose field count is not the header's, or that the parser refuses, is one `corrupt_csv`
        rejection; so is the line of a quote that is never closed, or that takes the following lines into
        a row that then has the wrong number of fields (CSV's rule would read the rest of the file as one
        field): reading goes on from the next line (`_CsvLines`). A file without the text column stops."""
        import csv

        csv.field_size_limit(max(csv.field_size_limit(), self.max_record_bytes))
        encoding = self._encoding(path, head)
        # An ASCII opening decides nothing (`_text_codec`), but the stream the csv module reads decodes with
        # one codec from its start: UTF-8 (what it read as before the late decision of `_text_lines`).
        codec = encoding.codec or "utf-8"
        delimiter = "\t" if _suffix(path)[0].startswith(".tsv") else ","
        kind = compression(head)
        with self._content(path, kind, encoding.utf16) as (_, stream):
            lines = _CsvLines(io.TextIOWrapper(stream, encoding=codec, errors="surrogateescape", newline=""))
            rows = csv.reader(lines, delimiter=delimiter)
            try:
                header = next(rows, [])
            except csv.Error as err:
                raise ShardReadError(path, f"unreadable header row: {err}") from None
            self._columns(path, header)
            lines.take_row()
            while True:
                problem = None
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except csv.Error as err:
                    row, problem = [], f"unreadable row: {err}"
                except STREAM_ERRORS as err:
                    raise ShardReadError(path, f"truncated or corrupt {kind} stream after line {lines.number}: "
                                               f"{type(err).__name__}: {err}", line=lines.number + 1) from err
                taken = lines.take_row()
                start = taken[0][0] if taken else lines.number + 1
                what = _stray_quote(taken, row, problem, len(header), delimiter) if len(taken) > 1 else None
                if what:
                    # A quote opened on the row's first line took the lines after it: only that line is lost.
                    lines.replay(taken[1:])
                    yield self._raw_rejection(path, name, start, taken[0][1], "corrupt_csv",
                                              f"a quote opened on this line is not closed where its field ends: "
                                              f"{what} (read on from line {taken[1][0]})")
                    rows = csv.reader(lines, delimiter=delimiter)  # a parser that starts on a fresh row
                    continue
                if problem:
                    yield self._raw_rejection(path, name, start, "".join(line for _, line in taken),
                                              "corrupt_csv", problem)
                    continue
                if not any(cell.strip() for cell in row):
                    continue  # a blank line between rows
                joined = delimiter.join(row)
                bad = _first_escaped_byte(joined, codec)
                if bad is not None:
                    yield self._undecodable(path, name, start, joined, codec, bad)
                elif len(row) != len(header):
                    yield self._raw_rejection(path, name, start, joined, "corrupt_csv",
                                              f"{len(row)} field(s) where the header has {len(header)}")
                else:
                    yield self._document(dict(zip(header, row)), path, name, start)

    def _read_parquet(self, path: str, name: str,
                      part: tuple[int, ...] | None = None) -> Iterator[Document | Rejection | ReadFault]:
        """Row group by row group (those of `part` only, when given): a group that cannot be read
        is counted and skipped, and a row whose values cannot be decoded is rejected on its own."""
        with fsspec.open(path, "rb", **(self.storage_options or {})) as fh:
            try:
                pf = pq.ParquetFile(fh)
            except Exception as err:  # pyarrow raises ArrowInvalid for corrupt footers
                raise ShardReadError(path, f"not a readable Parquet file: {err}") from err
            wanted = self._columns(path, pf.schema_arrow.names)
            groups, first = range(pf.metadata.num_row_groups), 0  # first: rows before this row group
            if part is not None:
                groups, first = range(part[0], min(part[1], pf.metadata.num_row_groups)), part[2]
            for group in groups:
                rows = pf.metadata.row_group(group).num_rows
                done = 0
                try:
                    for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=wanted):
                        yield from self._table_batch(batch, path, name, first + done)
                        done += batch.num_rows
                except Exception as err:  # noqa: BLE001 - a damaged row group: count it, go on
                    yield ReadFault(path, f"row group {group} (rows {first + done + 1}-{first + rows})",
                                    f"unreadable: {type(err).__name__}: {str(err)[:500]}", rows=rows - done)
                first += rows

    def _columns(self, path: str, names: list[str]) -> list[str]:
        """The columns of a table (Parquet, Arrow) that records are made of; a table without the text
        column stops its file."""
        if self.fields.text not in names:
            raise ShardReadError(path, f"no '{self.fields.text}' column (columns: {sorted(names)}); name the one "
                                       "that holds the text with `--set reader.text_field=COLUMN`")
        f = self.fields
        return [c for c in dict.fromkeys([f.text, f.id, f.domain, f.source, f.url]) if c in names]

    def _read_arrow(self, path: str, name: str) -> Iterator[Document | Rejection]:
        """An Arrow IPC file, batch by batch: the stream format that Hugging Face `datasets` writes
        (`save_to_disk`, its cache files) or the random-access file format (Feather v2)."""
        with fsspec.open(path, "rb", **(self.storage_options or {})) as fh:
            try:
                is_file = fh.read(6) == b"ARROW1"
                fh.seek(0)
                reader = pa.ipc.open_file(fh) if is_file else pa.ipc.open_stream(fh)
            except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid for anything else
                raise ShardReadError(path, f"not a readable Arrow IPC file: {err}") from err
            wanted = self._columns(path, reader.schema.names)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
            done = 0
            try:
                for batch in batches:
                    yield from self._table_batch(batch.select(wanted), path, name, done)
                    done += batch.num_rows
            except Exception as err:  # noqa: BLE001 - a damaged batch: the rows before it are kept
                raise ShardReadError(path, f"unreadable after row {done}: {type(err).__name__}: {str(err)[:500]}",
                                     line=done + 1) from err

    def _table_batch(self, batch: pa.RecordBatch, path: str, name: str,
                       before: int) -> Iterator[Document | Rejection]:
        try:
            records = batch.to_pylist()
        except Exception:  # noqa: BLE001 - some value does not decode: find it row by row
            records = None
        for i in range(batch.num_rows):
            if records is not None:
                yield self._row_document(records[i], path, name, before + i + 1)
                continue
            row = batch.slice(i, 1)
            try:
                record = row.to_pylist()[0]
            except Exception as err:  # noqa: BLE001
                reason = "invalid_utf8" if isinstance(err, UnicodeDecodeError) else "unreadable_record"
                yield self._raw_rejection(path, name, before + i + 1, _raw_text(row, self.fields.text), reason,
                                          f"row {before + i + 1} does not decode: {type(err).__name__}: {err}")
                continue
            yield self._row_document(record, path, name, before + i + 1)

    def _row_document(self, record: dict[str, Any], path: str, name: str, row: int) -> Document | Rejection:
        """A Parquet row as a document. Columns of bytes (BINARY without Parquet's string annotation, as
        some writers store text) are read as UTF-8: text that is not is a rejection of the row, another
        field's bad bytes are replaced."""
        for key, value in record.items():
            if not isinstance(value, bytes):
                continue
            try:
                record[key] = value.decode("utf-8")
            except UnicodeDecodeError as err:
                if key == self.fields.text:
                    return self._raw_rejection(path, name, row, value, "invalid_utf8",
                                               f"row {row}: '{key}' (a binary column) is not UTF-8 at byte "
                                               f"{err.start}")
                record[key] = value.decode("utf-8", "replace")
        return self._document(record, path, name, row)


def _raw_text(row: pa.RecordBatch, column: str) -> bytes:
    """The bytes of a row's text value, for inspecting a value that does not decode."""
    try:
        value = row.column(row.schema.get_field_index(column))
        binary = pa.large_binary() if pa.types.is_large_string(value.type) else pa.binary()
        data = value.cast(binary)[0].as_py() if pa.types.is_string(value.type) or \
            pa.types.is_large_string(value.type) else None
        return data or b""
    except Exception:  # noqa: BLE001
        return b""


def _stray_quote(lines: list[tuple[int, str]], row: list[str], problem: str | None, fields: int,
                 delimiter: str) -> str | None:
    """Why the quote opening a row of several `lines` is a stray one (None when the row is well formed:
    its quoted fields close where a field ends, and it has the header's `fields`). The reader is lenient
    (text after a closing quote joins the field); a strict parse of the row's own lines tells a quote
    that was closed by another field's opening quote."""
    import csv

    span = f"lines {lines[0][0]}-{lines[-1][0]}"
    if problem:
        return f"{span} make an unreadable row ({problem})"
    if len(row) != fields:
        return f"{span} make a row of {len(row)} field(s) where the header has {fields}"
    if sum(line.count('"') for _, line in lines) % 2:
        return "it runs to the end of the file"
    try:
        strict = list(csv.reader(io.StringIO("".join(line for _, line in lines), newline=""),
                                 delimiter=delimiter, strict=True))
    except csv.Error as err:
        return f"it closes in {span} with text after it ({err})"
    return None if len(strict) == 1 else f"{span} make {len(strict)} rows"


class _CsvLines:
    """A text stream's lines for `csv.reader`, numbered from 1, keeping those of the row being parsed
    (`take_row`) so that all but the first can be read again (`replay`): a row that a stray quote ran
    over the lines after it gives those lines back."""

    def __init__(self, stream: io.TextIOBase):
        self._stream = stream
        self._again: list[tuple[int, str]] = []  # lines to read again, the next one last
        self._row: list[tuple[int, str]] = []
        self.number = 0  # the last line read from the stream

    def __iter__(self) -> "_CsvLines":
        return self

    def __next__(self) -> str:
        if self._again:
            item = self._again.pop()
        else:
            line = self._stream.readline()
            if not line:
                raise StopIteration
            self.number += 1
            item = (self.number, line)
        self._row.append(item)
        return item[1]

    def take_row(self) -> list[tuple[int, str]]:
        """The (number, line) pairs read since the last call."""
        row, self._row = self._row, []
        return row

    def replay(self, lines: list[tuple[int, str]]) -> None:
        self._again.extend(reversed(lines))


class _Utf16AsUtf8(io.RawIOBase):
    """UTF-16 content as UTF-8, for the readers of lines: a 0x0A byte of UTF-16 may be half of any character
    (上, U+4E0A, is 0A 4E), so its line ends cannot be found in its bytes; as UTF-8 they are, and every reader
    reads it as it reads a UTF-8 file. A unit that is not UTF-16 (a lone surrogate, an odd last byte) comes
    out as bytes that are not UTF-8, so that its line is rejected rather than changed."""

    def __init__(self, source: BinaryIO, codec: str):
        self._source = source
        self._decoder = codecs.getincrementaldecoder(codec)("surrogatepass")
        self._out = b""  # decoded, not yet handed out from `_at` on
        self._at = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out) and not self._done:
            data = self._source.read(1 << 20)
            self._done = not data
            try:
                text = self._decoder.decode(data, final=self._done)
            except UnicodeDecodeError:  # the content ends inside a unit
                self._out, self._at = b"\xff", 0
                continue
            self._out, self._at = text.encode("utf-8", "surrogatepass"), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = memoryview(self._out)[self._at:self._at + n]
        self._at += n
        return n


# A line end: LF, CRLF, or a CR on its own.
_LINE_END = re.compile(rb"\r\n?|\n")


class _CrLines:
    """The lines of a stream (of `readline(limit)`) that end at a lone CR too, as Mac OS before X ended them,
    and at LF and CRLF as before; a lone CR comes out as LF, so that what reads the lines finds their end."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    def readline(self, limit: int) -> bytes:
        searched = 0
        while True:
            end = _LINE_END.search(self._buffer, searched)
            if end is not None and end.start() < limit:
                lone_cr = end.group() == b"\r"
                if not (lone_cr and end.end() == len(self._buffer) and not self._eof):  # else: a CRLF's first half?
                    line = bytes(self._buffer[:end.start()]) + b"\n" if lone_cr else bytes(self._buffer[:end.end()])
                    del self._buffer[:end.end()]
                    return line
            elif len(self._buffer) >= limit or self._eof:
                line = bytes(self._buffer[:limit])
                del self._buffer[:limit]
                return line
            searched = max(len(self._buffer) - 1, 0)
            more = self._stream.readline(1 << 20)
            self._eof = not more
            self._buffer += more


class _TruncatedStream(Exception):
    pass


def _member_header_at(data: bytes | bytearray, i: int) -> bool:
    """Whether a plausible gzip member header (RFC 1952: magic, deflate, no reserved flags,
    known extra flags, known OS) starts at `data[i]`; random bytes pass with odds of ~1 in 10^11."""
    return (data[i:i + 3] == b"\x1f\x8b\x08" and not data[i + 3] & 0xE0 and data[i + 8] in (0, 2, 4)
            and (data[i + 9] <= 13 or data[i + 9] == 255))


class _GzipLines:
    """Line reader over a gzip stream that reads as much as it can.

    Concatenated gzip members are read one after another, as gzip(1) does. A member that does not
    decompress (or fails its CRC check) is read up to the damage (to within `_STEP` compressed
    bytes); reading resumes at the next member header, and the skipped compressed bytes are
    recorded as a gap (`pop_gaps`) at the point of the stream where they occurred; the partial
    line before a gap comes out as a line of its own. `gzip.GzipFile` raises before handing out lines it has already decompressed when the
    end of the stream is missing; here complete lines come out first, then the partial tail, then
    the error.
    """

    _STEP = 256
    # Compressed bytes of the current member kept for the search after damage: the decompressor
    # can run past the member's true end (into the next header) before it notices.
    _HISTORY = 1 << 20

    def __init__(self, raw, chunk: int = 1 << 20):
        self._raw = raw
        self._chunk = chunk
        self._history = bytearray()  # the last compressed bytes fed to the current member
        self._inflate: Any = None  # the decompressor of the member being read
        self._pending = b""  # compressed bytes read but not yet decompressed or searched
        self._offset = 0  # file offset of self._pending[0] (of the data in hand)
        self._member_start = 0
        self._member_output = 0  # bytes the current member decompressed to
        self._scan: tuple[int, str] | None = None  # (gap start, why) while looking for a member
        self._buffer = bytearray()
        self._gaps: list[list[Any]] = []  # [buffer position, first byte, end byte, why]
        self._eof = False
        self._error: str | None = None

    def pop_gaps(self, passed: bool = False) -> list[tuple[int, int, str]]:
        """Gaps that the lines handed out so far have reached: (first byte, end byte, why).
        `passed`: only those before the last line handed out, not the one right after it."""
        due: list[list[Any]] = []
        keep: list[list[Any]] = []
        for gap in self._gaps:
            (keep if gap[0] > 0 or (gap[0] == 0 and passed) else due).append(gap)
        self._gaps = keep
        return [(start, end, why) for _, start, end, why in due]

    def _take(self, n: int) -> bytes:
        line = bytes(self._buffer[:n])
        del self._buffer[:n]
        for gap in self._gaps:
            gap[0] -= n
        return line

    def _gap(self, end: int) -> None:
        start, why = self._scan  # type: ignore[misc]
        self._scan = None
        if start >= end:  # the damage showed only past the next header: the whole member counts
            start = min(self._member_start, end)
        if self._buffer and not self._buffer.endswith(b"\n"):
            self._buffer += b"\n"  # a line cut by the damage must not run into what follows
        self._gaps.append([len(self._buffer), start, end, why])

    def _fill(self) -> None:
        if self._scan is not None:
            more = self._raw.read(self._chunk)
            data, self._pending = self._pending + more, b""
            if more:
                self._resync(data, 0)
                return
            self._offset += len(data)
            self._eof = True
            if self._member_output:  # lines of the member were read, its tail is lost
                self._error = f"{self._scan[1]}; no intact gzip member after it"
                self._scan = None
            else:  # nothing of it decompressed: count the bytes, the stream ends here
                self._gap(self._offset)
            return
        data, self._pending = self._pending or self._raw.read(self._chunk), b""
        if not data:
            self._eof = True
            if self._inflate is not None and not self._inflate.eof:
                self._error = "stream ended before the gzip end-of-stream marker"
            return
        if self._inflate is None:
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._member_start, self._member_output = self._offset, 0
            self._history.clear()
        before = self._inflate.copy()
        try:
            out = self._inflate.decompress(data)
        except zlib.error as err:
            self._inflate = None
            damage = self._salvage(before, data)  # what decompresses before the damage
            self._scan = (self._offset + damage, f"gzip member at byte {self._member_start} is corrupt ({err})")
            seen, self._history = bytes(self._history), bytearray()
            self._offset -= len(seen)
            self._resync(seen + data, self._member_start + 1 - self._offset)
            return
        self._history += data
        if len(self._history) > self._HISTORY:
            del self._history[: len(self._history) - self._HISTORY]
        self._buffer += out
        self._member_output += len(out)
        if self._inflate.eof:  # the member ended: what follows is the next member (or the end)
            rest = self._inflate.unused_data
            self._offset += len(data) - len(rest)
            self._inflate, self._pending = None, rest
        else:
            self._offset += len(data)

    def _salvage(self, inflate: Any, data: bytes) -> int:
        """Decompresses `data` again in small steps up to the damage; returns where that step began."""
        for at in range(0, len(data), self._STEP):
            try:
                out = inflate.decompress(data[at:at + self._STEP])
            except zlib.error:
                return at
            self._buffer += out
            self._member_output += len(out)
        return len(data)

    def _resync(self, data: bytes, skip: int) -> None:
        """Looks for the next member header in `data` (file offset self._offset onwards)."""
        i = data.find(b"\x1f\x8b\x08", max(skip, 0))
        while i >= 0 and len(data) - i >= 10:
            if _member_header_at(data, i):
                self._gap(self._offset + i)
                self._pending, self._offset = data[i:], self._offset + i
                return
            i = data.find(b"\x1f\x8b\x08", i + 1)
        # Not found yet: keep the bytes that may hold the start of a header, read on.
        keep = i if i >= 0 else max(len(data) - 9, skip, 0)
        self._pending, self._offset = data[keep:], self._offset + keep

    def readline(self, limit: int) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", 0, limit)
            if newline >= 0:
                return self._take(newline + 1)
            if len(self._buffer) >= limit:
                return self._take(limit)
            if self._eof:
                if self._buffer:
                    return self._take(len(self._buffer))
                if self._error:
                    error, self._error = self._error, None
                    raise _TruncatedStream(error)
                return b""
            self._fill()
