"""Custom pieces for the datatrove side (copied into the work directory as dt_steps.py, imported by
the pipeline and by datatrove's worker processes; runs in datatrove's venv only)."""
from __future__ import annotations

from datatrove.pipeline.filters.language_filter import LanguageFilter
from datatrove.utils.lid import FT176LID
from datatrove.utils.word_tokenizers import WordTokenizer


class CharTokenizer(WordTokenizer):
    """Characters as words: MinhashConfig.n_grams then means character n-grams."""

    def __init__(self) -> None:
        super().__init__("chars")

    def word_tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class LocalFT176(FT176LID):
    """datatrove's FT176LID (same predict) loading a local lid.176 file instead of downloading."""

    def __init__(self, path: str, languages=None, k: int = -1) -> None:
        super().__init__(languages, k)
        self.path = path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.path)
        return self._model


class LocalLanguageFilter(LanguageFilter):
    name = "🌍 Language ID (local lid.176)"

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = LocalFT176(path, self.languages)


def _is_han(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3134F


class HanRule:
    """Our min_length (non-space characters) and chinese_ratio rules, as a LambdaFilter function."""

    def __init__(self, min_chars: int, min_ratio: float) -> None:
        self.min_chars, self.min_ratio = min_chars, min_ratio

    def __call__(self, doc) -> bool:
        chars = [c for c in doc.text if not c.isspace()]
        if len(chars) < self.min_chars:
            return False
        return sum(map(_is_han, chars)) >= self.min_ratio * len(chars)


def han_rule(min_chars: int, min_ratio: float) -> HanRule:
    return HanRule(min_chars, min_ratio)
