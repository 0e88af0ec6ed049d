"""Rules that drop documents (PanGu-α §3, rules 1 and 3, and the filters after cleaning).

Each filter returns a detail string when it drops a document; the filter's name is the reason
recorded in the rejected set.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from cleaning import assets, charclass
from cleaning.document import Document
from cleaning.steps import Step


@dataclass(frozen=True, slots=True)
class CharProfile:
    chars: int  # non-whitespace characters
    cjk: int  # CJK unified ideographs (incl. extension A and compatibility ideographs)
    kana_hangul: int


# The length, ratio and language rules all ask about the same texts of a batch: their profiles are
# kept (bounded, emptied whole when full).
_PROFILES: dict[str, CharProfile] = {}
_PROFILES_LIMIT = 4096


def char_profile(text: str) -> CharProfile:
    return char_profiles([text])[0]


def char_profiles(texts: Sequence[str]) -> list[CharProfile]:
    """The profile of each text; those not kept yet from one numpy pass over all of them."""
    missing = [t for t in dict.fromkeys(texts) if t not in _PROFILES]
    found: dict[str, CharProfile] = {}
    if missing:
        classes = charclass.classify(charclass.code_points("".join(missing)))
        owner = np.repeat(np.arange(len(missing)), [len(t) for t in missing])
        counts = np.bincount(owner * 5 + classes, minlength=5 * len(missing)).reshape(-1, 5)
        for text, (other, space, han, kana_hangul, digit) in zip(missing, counts.tolist()):
            found[text] = CharProfile(chars=other + han + kana_hangul + digit, cjk=han, kana_hangul=kana_hangul)
        if len(_PROFILES) + len(found) > _PROFILES_LIMIT:
            _PROFILES.clear()
        _PROFILES.update(found)
    return [found.get(t) or _PROFILES[t] for t in texts]


class TooLong(Step):
    name = "too_long"

    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def check(self, doc: Document) -> str | None:
        if len(doc.text) > self.max_chars:
            return f"{len(doc.text)} characters > {self.max_chars}"
        return None


class MinLength(Step):
    name = "min_length"

    def __init__(self, min_chars: int):
        self.min_chars = min_chars

    def check(self, doc: Document) -> str | None:
        return self.check_batch([doc])[0]

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        return [f"{p.chars} non-space characters < {self.min_chars}" if p.chars < self.min_chars else None
                for p in char_profiles([doc.text for doc in docs])]


class ChineseRatio(Step):
    name = "chinese_ratio"

    def __init__(self, min_ratio: float):
        self.min_ratio = min_ratio

    def check(self, doc: Document) -> str | None:
        profile = char_profile(doc.text)
        ratio = profile.cjk / profile.chars if profile.chars else 0.0
        if ratio < self.min_ratio:
            return f"{ratio:.2f} < {self.min_ratio:.2f}"
        return None


_SENTENCE_END = set("。！？!?；;…．.")


class TitleOnly(Step):
    """A lone short line without sentence punctuation is a title, not a document."""

    name = "title_only"

    def __init__(self, max_title_chars: int = 64):
        self.max_title_chars = max_title_chars

    def check(self, doc: Document) -> str | None:
        lines = [line.strip() for line in doc.text.split("\n") if line.strip()]
        if len(lines) == 1 and len(lines[0]) <= self.max_title_chars and not _SENTENCE_END & set(lines[0]):
            return "a single short line with no sentence punctuation"
        return None


_PAIR_FILTER_BITS = 22  # 4 MB per table; ~12k words fill 0.3 % of it


def _keys(*columns: np.ndarray) -> np.ndarray:
    """Code points packed into one integer per tuple (they are < 2^21: three fit in 63 bits)."""
    key = columns[0].astype(np.uint64)
    for column in columns[1:]:
        key <<= np.uint64(21)
        key |= column
    return key


def _slots(keys: np.ndarray) -> np.ndarray:
    """A slot in a 2^_PAIR_FILTER_BITS-entry filter per key (multiplicative hashing)."""
    slots = keys * np.uint64(0x9E3779B97F4A7C15)
    slots >>= np.uint64(64 - _PAIR_FILTER_BITS)
    return slots


# (text, filter bits, code points, pair slots, triple slots) of the last text `_filter_slots` was asked about.
_LAST_SLOTS: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]] = []


def _filter_slots(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The code points of `text` and the filter slots of its character pairs and triples. They do not
    depend on the word list, and the ad and sensitive-word rules ask about the same batch one after
    the other: the last answer is kept (the slot arithmetic was half of each rule's time)."""
    last = _LAST_SLOTS[0] if _LAST_SLOTS else None
    if last is not None and last[1] == _PAIR_FILTER_BITS and (last[0] is text or last[0] == text):
        return last[2:]
    cps = charclass.code_points(text)
    wide = cps.astype(np.uint64)
    pairs = _keys(wide[:-1], wide[1:])
    slots = (cps, _slots(pairs), _slots(_keys(pairs[:-1], wide[2:])) if cps.size >= 3 else pairs[:0])
    _LAST_SLOTS[:] = [(text, _PAIR_FILTER_BITS, *slots)]
    return slots


class KeywordMatcher:
    """Counts leftmost-longest, non-overlapping occurrences of listed words.

    A word list of thousands of short Chinese words makes a trie walk slow (the root has a child
    for almost every common character), so candidate positions are found first with numpy
    look-ups of every character pair and triple in filters of the words' first two (two-character
    words) or three characters (longer words); tables where a collision only costs a
    confirmation. Only there, a handful of set lookups confirm a word. Single-character words are
    matched through a table over code points.
    """

    def __init__(self, words: Sequence[str]):
        words = sorted({w for w in words if w})
        if not words:
            raise ValueError("no words to match")
        self.words = set(words)
        # Lengths of the words that begin with each character pair (or single-character word),
        # longest first: a candidate position tries only those (a list of political terms has
        # words of up to ~60 characters, but few share their first two).
        lengths: dict[str, set[int]] = {}
        for word in words:
            lengths.setdefault(word[:2], set()).add(len(word))
        self._lengths = {start: sorted(ns, reverse=True) for start, ns in lengths.items()}
        self._single = np.zeros(0x110000, dtype=bool)
        self._single[[ord(w) for w in words if len(w) == 1]] = True
        self._has_single = bool(self._single.any())
        self._pairs = self._filter([w for w in words if len(w) == 2], 2)
        self._triples = self._filter([w for w in words if len(w) >= 3], 3)

    @staticmethod
    def _filter(words: list[str], width: int) -> np.ndarray | None:
        if not words:
            return None
        table = np.zeros(1 << _PAIR_FILTER_BITS, dtype=bool)
        columns = [np.array([ord(w[i]) for w in words], dtype=np.uint64) for i in range(width)]
        table[_slots(_keys(*columns))] = True
        return table

    def candidates(self, text: str) -> np.ndarray:
        cps, pair_slots, triple_slots = _filter_slots(text)
        hits = np.zeros(cps.size, dtype=bool)
        # `take` with int64 indices (the slots are < 2^63): half the time of indexing with uint64
        if self._pairs is not None and cps.size >= 2:
            hits[:-1] = self._pairs.take(pair_slots.view(np.int64))
        if self._triples is not None and cps.size >= 3:
            hits[:-2] |= self._triples.take(triple_slots.view(np.int64))
        if self._has_single:
            hits |= self._single.take(cps)
        return np.flatnonzero(hits)

    def find(self, text: str, limit: int | None = None) -> list[str]:
        """The matched words in order; stops after `limit` matches."""
        return self._confirm(text, self.candidates(text).tolist(), limit)

    def find_batch(self, texts: Sequence[str], limit: int | None = None) -> list[list[str]]:
        """`find` for many texts with one numpy pass over all of them."""
        return [self._confirm(text, positions.tolist(), limit)
                for text, positions in zip(texts, self.candidates_batch(texts))]

    def candidates_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`candidates` of each text, from one numpy pass over the texts joined by NUL (which no
        listed word contains, so no candidate spans two texts)."""
        if not texts:
            return []
        joined = "\x00".join(texts)
        starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
        positions = self.candidates(joined)
        owner = np.searchsorted(starts, positions, side="right") - 1
        split = np.searchsorted(owner, np.arange(len(texts) + 1))
        return [positions[split[i]:split[i + 1]] - starts[i] for i in range(len(texts))]

    def _confirm(self, text: str, candidates: list[int], limit: int | None) -> list[str]:
        found: list[str] = []
        next_free = 0
        for position in candidates:
            if position < next_free:
                continue  # inside the previous match: matches do not overlap
            # A filter collision can point at any character, the joining NUL included.
            for length in self._lengths.get(text[position:position + 2], ()):
                word = text[position:position + length]
                if len(word) == length and word in self.words:
                    found.append(word)
                    next_free = position + length
                    break
            else:
                if self._has_single and text[position:position + 1] in self.words:
                    found.append(text[position])
                    next_free = position + 1
            if limit is not None and len(found) >= limit:
                break
        return found


    def distinct_words(self, text: str, boundaries: set[int] | None = None) -> set[str]:
        """Every listed word that occurs in `text` (overlaps allowed), each once; with
        `boundaries`, only occurrences that start and end on one of those offsets."""
        return {word for _, word in self.occurrences(text, boundaries)}

    def occurrences(self, text: str, boundaries: set[int] | None = None,
                    candidates: np.ndarray | None = None) -> list[tuple[int, str]]:
        """(offset, word) of every occurrence of a listed word (overlaps allowed), by offset;
        with `boundaries`, only occurrences that start and end on one of those offsets.
        `candidates`: this text's `candidates`, when already found (`candidates_batch`)."""
        found: list[tuple[int, str]] = []
        if candidates is None:
            candidates = self.candidates(text)
        for position in candidates.tolist():
            if boundaries is not None and position not in boundaries:
                continue
            for length in self._lengths.get(text[position:position + 2], ()):
                word = text[position:position + length]
                if (len(word) == length and word in self.words
                        and (boundaries is None or position + length in boundaries)):
                    found.append((position, word))
            if self._has_single and text[position:position + 1] in self.words:
                if boundaries is None or position + 1 in boundaries:
                    found.append((position, text[position]))
        return found


def word_boundaries(text: str, offsets: Iterable[int] | None = None) -> set[int]:
    """Offsets between jieba words (accurate mode, the tokenizer's segmenter, SPEC §4), 0 and
    len(text) included; with `offsets`, only those of them that are boundaries (segmenting only
    the blocks of text they fall in: jieba cuts each run of han characters on its own). jieba
    keeps a run of Latin letters and digits together, so `SM` never matches inside `SMS` and `客服`
    not inside `微博客服务` (微 / 博客 / 服务)."""
    from tokenizer.segment import default_segmenter, fast_segment

    if offsets is not None:
        return default_segmenter().word_ends(text, offsets)
    found = {0}
    position = 0
    # Segments are joined by single spaces; spaces and newlines inside a segment became ▂ / ▃.
    for segment in fast_segment(text).split(" "):
        position += len(segment)
        found.add(position)
    return found


@functools.lru_cache(maxsize=16)
def load_word_matcher(paths: tuple[str, ...]) -> KeywordMatcher:
    """A matcher over the words of the given list files (one word per line, # comments)."""
    words: list[str] = []
    for path in paths:
        with open(assets.require(path), encoding="utf-8") as fh:
            words += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    if not words:
        raise ValueError(f"word lists {list(paths)} contain no words")
    return KeywordMatcher(words)


class KeywordHits(Step):
    """Drops a document with more than `max_hits` listed words.

    By default (`distinct`, `word_boundaries`) a hit is a distinct listed word found on jieba word
    boundaries: one word repeated seven times is one hit (repetition is the `repetition` rule's
    business), and a listed word inside a longer word is no hit (`美图` in `最美图书`). The
    segmenter runs only on documents whose substring matches could exceed `max_hits`, a small
    share of clean text. With both off, hits are leftmost-longest non-overlapping occurrences
    (the previous behaviour).

    With `window_chars` (distinct counting only), the distinct words are counted in the densest
    span of that many characters (occurrences whose offsets differ by less than it) rather than
    in the whole document: a keyword-stuffed page or block bunches its words together, while a
    long article accumulates a few, far apart (issue #13 §1; the value is chosen in config.py).
    The detail names the words of that span.
    """

    def __init__(self, name: str, word_lists: Sequence[str], max_hits: int,
                 distinct: bool = True, word_boundaries: bool = True, window_chars: int | None = None):
        self.name = name
        self.max_hits = max_hits
        self.distinct = distinct
        self.word_boundaries = word_boundaries
        self.window_chars = window_chars
        self._matcher = load_word_matcher(tuple(word_lists))

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        texts = [doc.text for doc in docs]
        if not (self.distinct or self.word_boundaries):
            return [self._verdict(hits) for hits in self._matcher.find_batch(texts, limit=max(self.max_hits + 1, 8))]
        return [self._check(text, positions) for text, positions in zip(texts, self._matcher.candidates_batch(texts))]

    def check(self, doc: Document) -> str | None:
        return self.check_batch([doc])[0]

    def _check(self, text: str, candidates: np.ndarray) -> str | None:
        # Occurrences anywhere (substrings) are a superset of those on word boundaries, so when
        # they cannot exceed the limit neither can the others, and the segmenter is not needed:
        # it runs on a small share of clean text, and then only on the blocks around the words.
        found = self._matcher.occurrences(text, candidates=candidates)
        if self.distinct and self._distinct_hits(found) <= self.max_hits:
            return None
        if self.word_boundaries:
            boundaries = word_boundaries(text, {o for p, w in found for o in (p, p + len(w))})
            found = [(p, w) for p, w in found if p in boundaries and p + len(w) in boundaries]
        if not self.distinct:
            kept = {w for _, w in found}
            return self._verdict([w for w in self._matcher.find(text) if w in kept])
        if self.window_chars is not None:
            found = self._densest_span(found, self.window_chars)
        return self._verdict(list(dict.fromkeys(word for _, word in found)))

    def _distinct_hits(self, found: list[tuple[int, str]]) -> int:
        if self.window_chars is not None:
            found = self._densest_span(found, self.window_chars)
        return len({word for _, word in found})

    @staticmethod
    def _densest_span(found: list[tuple[int, str]], window: int) -> list[tuple[int, str]]:
        """The occurrences (by offset) of the first span of `window` characters that holds the
        most distinct words (sliding over the occurrences: linear)."""
        best = (0, 0, 0)  # distinct words, first index, end index
        counts: dict[str, int] = {}
        first = 0
        for last, (position, word) in enumerate(found):
            counts[word] = counts.get(word, 0) + 1
            while position - found[first][0] >= window:
                left = found[first][1]
                counts[left] -= 1
                if not counts[left]:
                    del counts[left]
                first += 1
            if len(counts) > best[0]:
                best = (len(counts), first, last + 1)
        return found[best[1]:best[2]]

    def _verdict(self, hits: list[str]) -> str | None:
        if len(hits) > self.max_hits:
            shown = "、".join(dict.fromkeys(hits))[:80]
            kind = "distinct words" if self.distinct else "hits"
            if self.distinct and self.window_chars is not None:
                kind += f" within {self.window_chars} characters"
            return f"{len(hits)} {kind} > {self.max_hits}: {shown}"
        return None


_BIGRAM_BITS = 27  # a 16 MiB bit set: ~300k dictionary pairs leave 0.2 % of other pairs looking plausible


def _bigram_slots(keys: np.ndarray) -> np.ndarray:
    """Bit index of each pair key in the dictionary bit set (multiplicative hashing)."""
    return (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - _BIGRAM_BITS)


@functools.lru_cache(maxsize=1)
def dictionary_bigrams() -> np.ndarray:
    """A bit set of every character pair inside a word of jieba's dictionary (~300k pairs of its 349k
    words, built from its People's Daily-derived frequencies). One hashed bit per pair: a lookup is one
    memory access, 10× faster than a binary search over the sorted pairs, and a pair outside the
    dictionary hits a set bit 0.2 % of the time, which moves no score across its threshold.

    Building it loads jieba's dictionary and walks every word (about a second and a half); every worker
    of a corpus build needs it, so it is kept under `$PANGU_HOME/cache`, keyed by jieba's version and
    the dictionary file's checksum."""
    from tokenizer.segment import JIEBA_VERSION, dictionary_checksum  # (importing it quiets jieba's logging)

    name = f"dictionary-bigrams-jieba{JIEBA_VERSION}-{dictionary_checksum()}-{_BIGRAM_BITS}"
    return charclass.cached_tables(name, lambda: {"bits": _build_dictionary_bigrams()})["bits"]


def _build_dictionary_bigrams() -> np.ndarray:
    import jieba

    from tokenizer.segment import load_dictionary

    load_dictionary()
    pairs = {word[i:i + 2] for word, freq in jieba.dt.FREQ.items() if freq and len(word) >= 2
             for i in range(len(word) - 1)}
    first = np.array([ord(p[0]) for p in pairs], dtype=np.uint64)
    second = np.array([ord(p[1]) for p in pairs], dtype=np.uint64)
    bits = np.zeros(1 << (_BIGRAM_BITS - 3), dtype=np.uint8)
    slots = _bigram_slots(_keys(first, second))
    np.bitwise_or.at(bits, (slots >> np.uint64(3)).astype(np.int64), (1 << (slots & np.uint64(7))).astype(np.uint8))
    return bits


def han_bigram_plausibility(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per text: the share of its adjacent Han-character pairs that occur inside some dictionary
    word (1.0 without pairs), and the number of pairs. One numpy pass over the texts joined by
    NUL (not Han: no pair spans two texts)."""
    shares, pairs = np.ones(len(texts)), np.zeros(len(texts), dtype=np.int64)
    if not texts:
        return shares, pairs
    cps = charclass.code_points("\x00".join(texts))
    han = charclass.classify(cps) == charclass.HAN
    first = np.flatnonzero(han[:-1] & han[1:])  # position of each pair's first character
    if not first.size:
        return shares, pairs
    wide = cps.astype(np.uint64)
    slots = _bigram_slots(_keys(wide[first], wide[first + 1]))
    bits = dictionary_bigrams()
    hit = (bits[(slots >> np.uint64(3)).astype(np.int64)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    owner = np.searchsorted(starts, first, side="right") - 1
    pairs = np.bincount(owner, minlength=len(texts))
    found = np.bincount(owner, weights=hit, minlength=len(texts))
    return np.where(pairs > 0, found / np.maximum(pairs, 1), 1.0), pairs


class ImplausibleBigrams(Step):
    """Drops text whose adjacent Chinese characters rarely form words: shuffled characters,
    random-character filler, broken encodings.

    The score is the share of adjacent Han pairs that occur inside a word of jieba's dictionary.
    Measured on held-in clean text (FewCLUE news titles, app descriptions, abstracts, stories,
    C3 exam passages, CMRC encyclopedia paragraphs: 25k documents) it is >= 0.386 everywhere
    (median 0.62); a good paragraph with its characters shuffled scores 0.12-0.35 (median 0.24).
    Documents with fewer than `min_pairs` Han pairs are not judged (too few to tell).
    """

    name = "implausible_bigrams"

    def __init__(self, min_share: float, min_pairs: int = 40):
        self.min_share = min_share
        self.min_pairs = min_pairs

    def check(self, doc: Document) -> str | None:
        return self.check_batch([doc])[0]

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        shares, pairs = han_bigram_plausibility([doc.text for doc in docs])
        return [f"{share:.3f} of {n} character pairs in dictionary words < {self.min_share}"
                if n >= self.min_pairs and share < self.min_share else None
                for share, n in zip(shares.tolist(), pairs.tolist())]


_NGRAM_BASE = np.uint64(1_000_003)


class Repetition(Step):
    """Drops a document made of one stretch of text repeated: fewer than `min_distinct` of its
    character `n`-grams are distinct (a text repeated k times scores about 1/k: a description
    pasted twice, 0.5, is kept). Clean held-in text: 0.2 % of app descriptions < 0.3, no other."""

    name = "repetition"

    def __init__(self, min_distinct: float, n: int = 10):
        self.min_distinct = min_distinct
        self.n = n

    def check(self, doc: Document) -> str | None:
        return self.check_batch([doc])[0]

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        n = self.n
        texts = [doc.text for doc in docs]
        verdicts: list[str | None] = [None] * len(texts)
        wide = charclass.code_points("".join(texts)).astype(np.uint64)
        grams = wide.size - n + 1
        if grams <= 0:
            return verdicts
        # Polynomial hash of every n-gram of the joined texts (wraps mod 2^64), Horner's rule in
        # place: one pass for the batch, the grams that span two texts are never looked at.
        h = wide[:grams] * _NGRAM_BASE
        for i in range(1, n - 1):
            h += wide[i:grams + i]
            h *= _NGRAM_BASE
        h += wide[n - 1:]
        end = 0
        for i, text in enumerate(texts):
            start, end = end, end + len(text)
            if len(text) < 2 * n:
                continue
            own = h[start:end - n + 1]
            # Distinct values by sorting (3x faster than np.unique's hash set on these sizes). A
            # text keeps its place once some of its grams hold enough distinct values: a prefix
            # a little longer than the share asks for decides nearly every text, at a third of
            # the sort; only a text that fails it is sorted whole.
            need = min(own.size, math.ceil(self.min_distinct * own.size) * 9 // 8 + 8)
            share = _distinct(own[:need]) / own.size
            if share >= self.min_distinct:
                continue
            if need < own.size:
                share = _distinct(own) / own.size
            if share < self.min_distinct:
                verdicts[i] = f"{share:.3f} of character {n}-grams distinct < {self.min_distinct}"
        return verdicts


def _distinct(values: np.ndarray) -> int:
    ordered = np.sort(values)
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


# Contact details and calls to action of advertising spam (issue #13 §1), matched against
# lower-cased text. Every alternative begins with a literal character, so the regex engine skips
# ahead to the next 1, 4, 0, q, 扣, 企, 微, v, w or h instead of trying each alternative at every
# character (4× faster on the benchmark corpus); the lookbehinds that keep a phone number from
# starting inside a longer number come after that first digit. E-mail addresses, whose first
# character can be any of many, have their own alternative, tried only on text holding an `@`.
_QQ = r"(?:号|群)?\s*[:：]?\s*\d{5,11}"
_WECHAT = r"(?:号)?\s*[:：]?\s*[a-z][a-z0-9_-]{4,19}"
_CONTACT_ALTERNATIVES = (
    r"1(?<!\d1)[3-9]\d{9}(?!\d)|4(?<!\d4)00[-\s]?\d{3}[-\s]?\d{4}(?!\d)|0(?<!\d0)\d{2,3}-\d{7,8}(?!\d)"  # mobile, 400, landline
    f"|qq{_QQ}|扣扣{_QQ}|企鹅{_QQ}"
    f"|微信{_WECHAT}|vx{_WECHAT}|v信{_WECHAT}|weixin{_WECHAT}|wx{_WECHAT}|微信同号"
    r"|https?://[^\s，。]+|www\.[a-z0-9-]+\.[a-z.]+")
_CONTACTS_NO_EMAIL = re.compile(_CONTACT_ALTERNATIVES)
# ASCII local part, from the start of its run: `[\w.+-]+@` tried at every character of a long
# run of Han characters (all \w) is quadratic.
_CONTACTS = re.compile(_CONTACT_ALTERNATIVES + r"|(?<![a-z0-9._%+-])[a-z0-9._%+-]+@[a-z0-9-]+\.[a-z]{2,}")
_CALLS_TO_ACTION = re.compile(
    r"加微信|加我微信|扫码|私聊|咨询热线|联系电话|热线|来电咨询|详情请|点击链接|立即抢购|先到先得|名额有限|"
    r"代理|加盟|招募|日结|月入|包邮|货到付款|优惠券|红包|兼职", re.IGNORECASE)


class ContactSpam(Step):
    """Drops advertising that asks to be contacted: more than `max_signals` distinct contact
    details (phone numbers, QQ / WeChat ids, URLs, e-mail addresses) and calls to action (加微信,
    咨询热线, 代理, 包邮, ...) together. Held-in app descriptions, which name a hotline or an official
    site, reach 5 in 0.5 % of cases; a description with a phone, a WeChat id and a URL is kept."""

    name = "contact_spam"

    def __init__(self, max_signals: int):
        self.max_signals = max_signals

    def check(self, doc: Document) -> str | None:
        text = doc.text
        contacts = {m.group(0) for m in (_CONTACTS if "@" in text else _CONTACTS_NO_EMAIL).finditer(text.lower())}
        calls = {m.group(0).lower() for m in _CALLS_TO_ACTION.finditer(doc.text)}
        if len(contacts) + len(calls) > self.max_signals:
            shown = "、".join(sorted(contacts)[:3] + sorted(calls)[:5])[:80]
            return f"{len(contacts)} contacts + {len(calls)} calls to action > {self.max_signals}: {shown}"
        return None


@functools.lru_cache(maxsize=4)
def load_fasttext(path: str):
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load-time warning
    return fasttext.load_model(assets.require(path))


# lid.176 labels for Chinese languages.
_CHINESE_LABELS = {"zh", "wuu", "yue", "gan", "hak", "lzh", "nan", "cdo", "hsn", "cjy"}


class LanguageID(Step):
    """fastText lid.176 with the character-ratio rule alongside (SPEC §3).

    The ratio rule vouches for Han text: a document whose Han share reaches `min_chinese_ratio`
    (never less than half) and that has (almost) no kana or hangul is Chinese, whatever lid.176
    says. lid.176 labels
    about 15 % of classical Chinese as Japanese, and on the sample corpus it called 1.3 % of
    texts that are >= 90 % Han characters en, it, mk, ... (idioms, dictionary entries). The
    model is asked only about the other documents (Japanese and Korean with Han characters, or
    sources configured with a low ratio), where its answer decides: a Chinese label with
    probability >= `min_score` keeps the document. It reads the first `max_chars` characters: on
    the benchmark corpus the label at 300 characters agreed with the one at 2,000 for 99 %.
    """

    name = "language_id"

    def __init__(self, model: str, min_score: float, min_chinese_ratio: float, max_chars: int = 300):
        assets.require(model)  # missing: refused where the steps are built, not at the first document asked
        self.model_ref = model
        self.min_score = min_score
        self.min_chinese_ratio = min_chinese_ratio
        self.max_chars = max_chars

    def _vouched(self, doc: Document) -> bool:
        profile = char_profile(doc.text)
        han_ratio = profile.cjk / profile.chars if profile.chars else 0.0
        return han_ratio >= max(self.min_chinese_ratio, 0.5) and profile.kana_hangul <= 0.01 * profile.chars

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        verdicts: list[str | None] = [None] * len(docs)
        asked = [i for i, doc in enumerate(docs) if not self._vouched(doc)]
        if not asked:
            return verdicts
        texts = [docs[i].text[: self.max_chars].replace("\n", " ") for i in asked]
        labels, scores = load_fasttext(self.model_ref).predict(texts, k=1)
        for i, label, score in zip(asked, labels, scores):
            lang = label[0].removeprefix("__label__") if label else "unknown"
            p = float(score[0]) if len(score) else 0.0
            if not (lang in _CHINESE_LABELS and p >= self.min_score):
                verdicts[i] = f"{lang} {p:.2f}"
        return verdicts


class ClassifierThreshold(Step):
    """A fastText classifier score against a threshold; the score is kept on the document."""

    def __init__(self, name: str, model: str, threshold: float, drop_above: bool, meta_key: str):
        from cleaning.classifier import TextClassifier

        self.name = name
        self.classifier = TextClassifier.load(assets.require(model))
        self.threshold = threshold
        self.drop_above = drop_above
        self.meta_key = meta_key

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        if not docs:
            return []
        scores = self.classifier.score([doc.text for doc in docs])
        verdicts: list[str | None] = []
        for doc, score in zip(docs, scores):
            score = float(score)
            if self.meta_key == "quality":
                doc.quality = score
            else:
                doc.meta[self.meta_key] = round(score, 4)
            if self.drop_above and score > self.threshold:
                verdicts.append(f"{score:.3f} > {self.threshold}")
            elif not self.drop_above and score < self.threshold:
                verdicts.append(f"{score:.3f} < {self.threshold}")
            else:
                verdicts.append(None)
        return verdicts


class Perplexity(Step):
    """Per-character perplexity under a character n-gram model of clean text (CCNet; see
    cleaning/perplexity.py): kept in meta `perplexity`, with CCNet's `perplexity_bucket` (head,
    middle, tail: terciles on the dev split, from the manifest); a document above the threshold
    (by default the one in the model's manifest) is dropped."""

    name = "perplexity"

    def __init__(self, model: str, threshold: float | None = None):
        from cleaning.perplexity import load_model

        try:
            self.model = load_model(assets.require(model))
        except assets.MissingAssetError as err:
            raise FileNotFoundError(f"{err}; the reference perplexity model is built by "
                                    "`python -m cleaning.perplexity`") from err
        manifest_threshold = (self.model.info.get("threshold") or {}).get("perplexity")
        self.threshold = float(threshold if threshold is not None else manifest_threshold or "nan")
        if not self.threshold > 1:
            raise ValueError(f"{model}: no perplexity threshold given and none in its manifest")
        self.buckets = self.model.info.get("buckets")

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        from cleaning.perplexity import bucket_of

        if not docs:
            return []
        verdicts: list[str | None] = []
        for doc, score in zip(docs, self.model.perplexity([doc.text for doc in docs]).tolist()):
            doc.meta["perplexity"] = round(score, 1)
            if self.buckets:
                doc.meta["perplexity_bucket"] = bucket_of(score, self.buckets)
            verdicts.append(f"{score:.1f} > {self.threshold:g}" if score > self.threshold else None)
        return verdicts
