"""Rules that drop documents (PanGu-α §3, rules 1 and 3, and the filters after cleaning).

Each filter returns a detail string when it drops a document; the filter's name is the reason
recorded in the rejected set.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cleaning import assets
from cleaning.document import Document
from cleaning.steps import Step


@dataclass(frozen=True, slots=True)
class CharProfile:
    chars: int  # non-whitespace characters
    cjk: int  # CJK unified ideographs (incl. extension A and compatibility ideographs)
    kana_hangul: int


_WHITESPACE = np.array([0x20, 0x09, 0x0A, 0x0D, 0x3000, 0xA0], dtype=np.uint32)


def char_profile(text: str) -> CharProfile:
    """Counted on code points as a numpy array: one pass in C instead of a Python loop per char."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars = int(cps.size - np.isin(cps, _WHITESPACE).sum())
    cjk = int((((cps >= 0x4E00) & (cps <= 0x9FFF)) | ((cps >= 0x3400) & (cps <= 0x4DBF))
               | ((cps >= 0xF900) & (cps <= 0xFAFF)) | ((cps >= 0x20000) & (cps <= 0x3134F))).sum())
    kana_hangul = int((((cps >= 0x3040) & (cps <= 0x30FF)) | ((cps >= 0xAC00) & (cps <= 0xD7AF))).sum())
    return CharProfile(chars, cjk, kana_hangul)


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
        n = char_profile(doc.text).chars
        if n < self.min_chars:
            return f"{n} non-space characters < {self.min_chars}"
        return None


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


@functools.lru_cache(maxsize=16)
def load_word_automaton(paths: tuple[str, ...]):
    """An Aho-Corasick automaton over the words of the given list files (one word per line)."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for path in paths:
        with open(assets.require(path), encoding="utf-8") as fh:
            for line in fh:
                word = line.strip()
                if word and not word.startswith("#"):
                    automaton.add_word(word, word)
    if len(automaton) == 0:
        raise ValueError(f"word lists {list(paths)} contain no words")
    automaton.make_automaton()
    return automaton


class KeywordHits(Step):
    """Drops a document with more than `max_hits` occurrences of listed words (non-overlapping)."""

    def __init__(self, name: str, word_lists: Sequence[str], max_hits: int):
        self.name = name
        self.max_hits = max_hits
        self._automaton = load_word_automaton(tuple(word_lists))

    def check(self, doc: Document) -> str | None:
        hits: list[str] = []
        for _, word in self._automaton.iter_long(doc.text):
            hits.append(word)
            if len(hits) > self.max_hits and len(hits) >= 8:
                break
        if len(hits) > self.max_hits:
            shown = "、".join(dict.fromkeys(hits))[:80]
            return f"{len(hits)} hits > {self.max_hits}: {shown}"
        return None


@functools.lru_cache(maxsize=4)
def load_fasttext(path: str):
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load-time warning
    return fasttext.load_model(assets.require(path))


# lid.176 labels for Chinese languages; classical Chinese often comes out as ja or lzh.
_CHINESE_LABELS = {"zh", "wuu", "yue", "gan", "hak", "lzh", "nan", "cdo", "hsn", "cjy"}


class LanguageID(Step):
    """fastText lid.176 with the character-ratio rule alongside (SPEC §3).

    lid.176 labels about 15 % of classical Chinese as Japanese; a document written in Han
    characters with almost no kana or hangul is kept whatever the label.
    """

    name = "language_id"

    def __init__(self, model: str, min_score: float, min_chinese_ratio: float):
        self.model = load_fasttext(model)
        self.min_score = min_score
        self.min_chinese_ratio = min_chinese_ratio

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        if not docs:
            return []
        texts = [doc.text[:2000].replace("\n", " ") for doc in docs]
        labels, scores = self.model.predict(texts, k=1)
        verdicts: list[str | None] = []
        for doc, label, score in zip(docs, labels, scores):
            lang = label[0].removeprefix("__label__") if label else "unknown"
            p = float(score[0]) if len(score) else 0.0
            if lang in _CHINESE_LABELS and p >= self.min_score:
                verdicts.append(None)
                continue
            profile = char_profile(doc.text)
            han_ratio = profile.cjk / profile.chars if profile.chars else 0.0
            if han_ratio >= self.min_chinese_ratio and profile.kana_hangul <= 0.01 * profile.chars:
                doc.meta["langid"] = f"{lang}:{p:.2f} (kept: Han text)"
                verdicts.append(None)
                continue
            verdicts.append(f"{lang} {p:.2f}")
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
