"""One lookup table of character classes over all code points, shared by the rules.

Indexing a 1.1 MB table with a document's code points classifies every character in one numpy
pass, instead of one comparison pass per range.
"""
from __future__ import annotations

import functools

import numpy as np

OTHER, SPACE, HAN, KANA_HANGUL, DIGIT = 0, 1, 2, 3, 4

_HAN_RANGES = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F)]
_KANA_HANGUL_RANGES = [(0x3040, 0x30FF), (0xAC00, 0xD7AF)]


@functools.lru_cache(maxsize=1)
def table() -> np.ndarray:
    classes = np.zeros(0x110000, dtype=np.uint8)
    for low, high in _HAN_RANGES:
        classes[low:high + 1] = HAN
    for low, high in _KANA_HANGUL_RANGES:
        classes[low:high + 1] = KANA_HANGUL
    # Decimal digits of every script (what `\d` matches in a str pattern).
    classes[[c for c in range(0x110000) if chr(c).isdecimal()]] = DIGIT
    # Python's own notion of whitespace (str.isspace, what `\s` matches in a str pattern).
    classes[[c for c in range(0x110000) if chr(c).isspace()]] = SPACE
    return classes


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def classify(cps: np.ndarray) -> np.ndarray:
    return table()[cps]


def counts(text: str) -> np.ndarray:
    """Characters per class: [other, space, han, kana_hangul, digit]."""
    return np.bincount(classify(code_points(text)), minlength=5)
