"""jieba pre-segmentation in the PanGu-α scheme (SPEC §4), the reference and a fast exact replica.

The scheme turns a document into the string that sentencepiece encodes: jieba (accurate mode, HMM
on, as `jieba.cut(text)` does by default) cuts the text; inside each segment " " becomes "▂" and
"\\n" becomes "▃"; the segments are joined with single spaces.

`reference_segment` is that scheme written literally. `FastSegmenter` gives the same string for every
input, faster, by re-expressing jieba 0.42.1's accurate-mode code path (`Tokenizer.cut` →
`__cut_DAG` → `finalseg.cut`) with fewer Python operations:

- the prefix-dictionary DAG and the best route are computed in one backward pass over a block,
  with `log(freq) - log(total)` precomputed per word (the same IEEE operations in the same order
  as `Tokenizer.calc`, so every comparison — ties included — comes out the same);
- jieba cuts every run of "han" characters (`re_han_default`) independently of the rest of the
  text, so the result of a block is a pure function of the block and is memoised; so is the HMM
  (`finalseg.cut`) of unknown-character runs;
- text between blocks is whitespace (kept as one segment, "\\r\\n" included) or single characters,
  mapped with one `str.translate` and one `join` instead of a generator per character.

The replica reads jieba's live dictionary (`jieba.dt`) and rebuilds its tables when the dictionary
changes (`add_word`, `load_userdict`), so it keeps matching `jieba.cut` on the same process. While
`jieba.dt` is jieba's default dictionary and not loaded yet, the word table comes from arrays under
`$PANGU_HOME/cache` and jieba's dictionary is not loaded at all (0.15 s a process instead of 0.4 s).
"""
from __future__ import annotations

import functools
import zlib
from bisect import bisect_right
from itertools import islice
from typing import Iterable
from math import log

import jieba
import numpy as np
from jieba import finalseg

from tokenizer.specials import NEWLINE_PIECE, SPACE_PIECE

jieba.setLogLevel(60)  # jieba logs dictionary loading at INFO on every process

JIEBA_VERSION: str = jieba.__version__
# The replica follows this code path; another jieba release may differ, and then only the
# reference path is trusted (`FastSegmenter` refuses to start).
SUPPORTED_JIEBA = ("0.42.1",)

_TRANSLATE = str.maketrans({" ": SPACE_PIECE, "\n": NEWLINE_PIECE})
_RE_HAN = jieba.re_han_default
_RE_SKIP = jieba.re_skip_default
_MISSING = object()
_DEFAULT_STAMP = "jieba's default dictionary, from the cache"


def load_dictionary() -> None:
    """Initialises `jieba.dt` with its default dictionary from arrays kept under `$PANGU_HOME/cache`
    (keyed by jieba's version and the dictionary file's checksum): its 498k words and prefixes as
    one string and their frequencies, made into the same dict in 0.2 s, where jieba's own marshal
    cache takes 0.6 s. `FastSegmenter` does not need it for the default dictionary (its word table
    has a cache of its own); what reads `jieba.dt` does (the bigram rule's table, when it is built).
    Another dictionary (`jieba.set_dictionary`) and an already initialised one are left to jieba."""
    dt = jieba.dt
    if dt.initialized or dt.dictionary != jieba.DEFAULT_DICT:
        dt.check_initialized()
        return
    from cleaning.charclass import cached_tables

    tables = cached_tables(f"jieba-prefix-dictionary-{JIEBA_VERSION}-{dictionary_checksum()}", _dictionary_tables)
    words = tables["words"].tobytes().decode("utf-8").split("\n")
    with dt.lock:
        if not dt.initialized:
            dt.FREQ, dt.total = dict(zip(words, tables["freq"].tolist())), int(tables["total"])
            dt.initialized = True


def dictionary_checksum() -> str:
    """CRC-32 (hex) of the file of `jieba.dt`'s dictionary: with jieba's version, the key of the tables derived
    from it and kept under `$PANGU_HOME/cache` (this prefix dictionary, the bigram rule's bit set)."""
    return _file_checksum(jieba.dt.dictionary)


@functools.lru_cache(maxsize=4)
def _file_checksum(dictionary: str | None) -> str:
    # `dictionary` (jieba.dt.dictionary) keys the cache: read once per process and dictionary file, though
    # every worker asks for it for more than one table
    with jieba.dt.get_dict_file() as fh:
        return f"{zlib.crc32(fh.read()):08x}"


def _dictionary_tables() -> dict[str, np.ndarray]:
    dt = jieba.dt
    dt.check_initialized()  # jieba's own way, once per machine
    if any("\n" in word for word in dt.FREQ):
        raise ValueError("a jieba dictionary entry holds a line break")
    return {"words": np.frombuffer("\n".join(dt.FREQ).encode("utf-8"), dtype=np.uint8),
            "freq": np.fromiter(dt.FREQ.values(), dtype=np.int64, count=len(dt.FREQ)),
            "total": np.int64(dt.total)}


def _default_word_logp() -> tuple[dict[str, float | None], int]:
    """The word table `FastSegmenter` walks for jieba's default dictionary, and the dictionary's total,
    from arrays kept under `$PANGU_HOME/cache`: log(freq) - log(total) per word (computed by
    `math.log` when the arrays are made, so the same floats as `FastSegmenter` computes from
    `jieba.dt`), None for a prefix that is not a word. One dict built in about 0.1 s, where filling
    `jieba.dt` and deriving the table from it takes 0.4 s, in every process that segments."""
    from cleaning.charclass import cached_tables

    tables = cached_tables(f"jieba-word-logp-{JIEBA_VERSION}-{dictionary_checksum()}", _word_logp_tables)
    entries = tables["entries"].tobytes().decode("utf-8").split("\n")
    values: list[float | None] = tables["logp"].tolist()
    values += [None] * (len(entries) - len(values))
    return dict(zip(entries, values)), int(tables["total"])


def _word_logp_tables() -> dict[str, np.ndarray]:
    load_dictionary()
    dt = jieba.dt
    logtotal = log(dt.total)
    words = [w for w, f in dt.FREQ.items() if f]
    prefixes = [w for w, f in dt.FREQ.items() if not f]
    return {"entries": np.frombuffer("\n".join(words + prefixes).encode("utf-8"), dtype=np.uint8),
            "logp": np.array([log(dt.FREQ[w]) - logtotal for w in words], dtype=np.float64),
            "words": np.int64(len(words)), "total": np.int64(dt.total)}


def reference_segment(text: str) -> str:
    """The PanGu-α scheme, literally: `jieba.cut` → map each segment → join with spaces."""
    return " ".join(segment.translate(_TRANSLATE) for segment in jieba.cut(text))


class FastSegmenter:
    """Exact replica of `reference_segment`, 1.7–3× faster on one core (more on repetitive text).

    One instance per process; the caches are bounded by `max_cache_entries` (blocks and HMM runs),
    and dropped by halves, oldest first, when full.
    """

    def __init__(self, max_cache_entries: int = 200_000) -> None:
        if JIEBA_VERSION not in SUPPORTED_JIEBA:
            raise RuntimeError(f"FastSegmenter replicates jieba {SUPPORTED_JIEBA}, found {JIEBA_VERSION}")
        self.max_cache_entries = max_cache_entries
        self._blocks: dict[str, str] = {}
        self._hmm: dict[str, list[str]] = {}
        self._dictionary_stamp: tuple[int, int, int] | None = None
        self._logp: dict[str, float | None] = {}
        self._no_word = 0.0

    # -- dictionary tables -----------------------------------------------------------------
    def _refresh(self) -> None:
        dt = jieba.dt
        if not dt.initialized and dt.dictionary == jieba.DEFAULT_DICT:
            # jieba's default dictionary, not loaded in this process (nothing added or deleted:
            # `add_word` and `del_word` load it): the table comes from the cache, and `jieba.dt`
            # stays unloaded until something else asks jieba for it.
            if self._dictionary_stamp != _DEFAULT_STAMP:
                table, total = _default_word_logp()
                self._set_table(table, total, _DEFAULT_STAMP)
            return
        dt.check_initialized()
        # `del_word` leaves total and size alone but adds a forced split, hence the third item.
        stamp = (dt.total, len(dt.FREQ), len(finalseg.Force_Split_Words))
        if stamp == self._dictionary_stamp:
            return
        logtotal = log(dt.total)
        # None marks a prefix that is not a word (frequency 0): the DAG walks through it but
        # never ends a word there, exactly as `get_DAG` tests `if self.FREQ[frag]`.
        self._set_table({w: (log(f) - logtotal) if f else None for w, f in dt.FREQ.items()}, dt.total, stamp)

    def _set_table(self, logp: dict[str, float | None], total: int, stamp: object) -> None:
        self._logp = logp
        # A position with no dictionary word is a one-character word of frequency `0 or 1` → log(1).
        self._no_word = log(1) - log(total)
        self._blocks.clear()
        self._hmm.clear()
        self._dictionary_stamp = stamp

    def _trim(self, cache: dict) -> None:
        if len(cache) >= self.max_cache_entries:
            for key in list(islice(cache, len(cache) // 2)):
                del cache[key]

    # -- one han block: Tokenizer.__cut_DAG ---------------------------------------------------
    def _hmm_cut(self, run: str) -> list[str]:
        words = self._hmm.get(run)
        if words is None:
            self._trim(self._hmm)
            words = self._hmm[run] = list(finalseg.cut(run))
        return words

    def _cut_block(self, block: str) -> str:
        n = len(block)
        get = self._logp.get
        no_word = self._no_word
        route_p = [0.0] * (n + 1)
        route_x = [0] * (n + 1)
        for k in range(n - 1, -1, -1):
            best_p = None
            best_x = k
            i = k
            frag = block[k]
            while i < n:
                v = get(frag, _MISSING)
                if v is _MISSING:
                    break
                if v is not None:
                    p = v + route_p[i + 1]
                    # `max` over (p, x) tuples: a tie goes to the larger x, i.e. the later one here.
                    if best_p is None or p >= best_p:
                        best_p = p
                        best_x = i
                i += 1
                frag = block[k:i + 1]
            if best_p is None:
                best_p = no_word + route_p[k + 1]
            route_p[k] = best_p
            route_x[k] = best_x

        words: list[str] = []
        logp = self._logp
        x = 0
        buf = ""
        while x < n:
            y = route_x[x] + 1
            if y - x == 1:
                buf += block[x]
            else:
                if buf:
                    self._flush_singles(buf, words, logp)
                    buf = ""
                words.append(block[x:y])
            x = y
        if buf:
            self._flush_singles(buf, words, logp)
        # Han blocks hold no whitespace, so their words need no mapping.
        return " ".join(words)

    def _flush_singles(self, buf: str, words: list[str], logp: dict) -> None:
        """A run of single-character route steps, as jieba's __cut_DAG handles it: one character
        stays, an unknown run goes to the HMM, a known word splits into its characters (a run
        that is a word has a log-probability; `not FREQ.get(buf)` in jieba is None here)."""
        if len(buf) == 1:
            words.append(buf)
        elif logp.get(buf) is None:
            words.extend(self._hmm_cut(buf))
        else:
            words.extend(buf)

    # -- a document: Tokenizer.cut ------------------------------------------------------------
    def segment(self, text: str) -> str:
        """The string sentencepiece encodes for `text`; equal to `reference_segment(text)`."""
        self._refresh()
        blocks = self._blocks
        parts: list[str] = []
        # `re.split` with one capture group alternates: even items lie between matches, odd items
        # are the han blocks (what `re_han.match(blk)` selects in `Tokenizer.cut`).
        for index, blk in enumerate(_RE_HAN.split(text)):
            if not blk:
                continue
            if index & 1:
                joined = blocks.get(blk)
                if joined is None:
                    joined = self._cut_cached(blk)
                parts.append(joined)
            elif "\r\n" not in blk:
                # Each whitespace character and each other character is its own segment.
                parts.append(" ".join(blk.translate(_TRANSLATE)))
            else:
                for piece in _RE_SKIP.split(blk):
                    if not piece:
                        continue
                    if _RE_SKIP.match(piece):
                        parts.append(piece.translate(_TRANSLATE))
                    else:
                        parts.append(" ".join(piece))
        return " ".join(parts)

    def _cut_cached(self, block: str) -> str:
        joined = self._blocks.get(block)
        if joined is None:
            self._trim(self._blocks)
            joined = self._blocks[block] = self._cut_block(block)
        return joined

    def word_ends(self, text: str, offsets: Iterable[int]) -> set[int]:
        """The offsets of `offsets` at which one jieba word of `segment(text)` ends and the next
        begins (0 and len(text) included). Only the han blocks that an offset falls strictly
        inside are cut: every other offset is a block edge or lies between single-character
        segments, except the middle of "\r\n"."""
        self._refresh()
        inside: dict[tuple[int, int], list[int]] = {}
        out: set[int] = set()
        spans = [m.span() for m in _RE_HAN.finditer(text)]
        starts = [start for start, _ in spans]
        for offset in set(offsets):
            i = bisect_right(starts, offset) - 1
            if i >= 0 and spans[i][0] < offset < spans[i][1]:
                inside.setdefault(spans[i], []).append(offset)
            elif 0 <= offset <= len(text) and text[offset - 1:offset + 1] != "\r\n":
                out.add(offset)  # jieba keeps "\r\n" as one segment
        for (start, end), wanted in inside.items():
            position, ends = start, set()
            for word in self._cut_cached(text[start:end]).split(" "):
                position += len(word)
                ends.add(position)
            out.update(o for o in wanted if o in ends)
        return out

    def segment_many(self, texts: list[str]) -> list[str]:
        return [self.segment(t) for t in texts]


_DEFAULT: FastSegmenter | None = None


def default_segmenter() -> FastSegmenter:
    """The process-wide instance (its caches are shared by every caller)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = FastSegmenter()
    return _DEFAULT


def fast_segment(text: str) -> str:
    """`FastSegmenter.segment` on the process-wide instance."""
    return default_segmenter().segment(text)
