"""One lookup table of character classes over all code points, shared by the rules.

Indexing a 1.1 MB table with a document's code points classifies every character in one numpy
pass, instead of one comparison pass per range.
"""
from __future__ import annotations

import functools
import io
import sys
import unicodedata
from typing import Callable

import numpy as np

from cleaning.assets import pangu_home
from cleaning.writers import write_bytes_atomic

OTHER, SPACE, HAN, KANA_HANGUL, DIGIT = 0, 1, 2, 3, 4

# What a Han character is, for every rule of the project: the CJK Unified Ideographs, Extension A,
# the Compatibility Ideographs and Extensions B–H (planes 2 and 3).
CJK_UNIFIED = (0x4E00, 0x9FFF)
CJK_EXTENSION_A = (0x3400, 0x4DBF)
CJK_COMPATIBILITY = (0xF900, 0xFAFF)
CJK_SUPPLEMENTARY = (0x20000, 0x3134F)
HAN_RANGES = [CJK_EXTENSION_A, CJK_UNIFIED, CJK_COMPATIBILITY, CJK_SUPPLEMENTARY]
_KANA_HANGUL_RANGES = [(0x3040, 0x30FF), (0xAC00, 0xD7AF)]


def cached_tables(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Tables over all code points, built once per machine and loaded from disk after that.

    Building one walks 1.1 M code points in Python (about half a second); every worker process of
    a corpus build needs them, so they are kept under `$PANGU_HOME/cache`, keyed by the Unicode
    database and Python version that define them.
    """
    version = f"unicode{unicodedata.unidata_version}-py{sys.version_info[0]}.{sys.version_info[1]}"
    path = pangu_home() / "cache" / f"{name}-{version}.npz"
    try:
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError, KeyError):
        pass
    tables = build()
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **tables)
        write_bytes_atomic(path, buffer.getvalue())
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return tables


@functools.lru_cache(maxsize=1)
def table() -> np.ndarray:
    return cached_tables("charclass", lambda: {"classes": _build_table()})["classes"]


def _build_table() -> np.ndarray:
    classes = np.zeros(0x110000, dtype=np.uint8)
    for low, high in HAN_RANGES:
        classes[low:high + 1] = HAN
    for low, high in _KANA_HANGUL_RANGES:
        classes[low:high + 1] = KANA_HANGUL
    # Decimal digits of every script (what `\d` matches in a str pattern).
    classes[[c for c in range(0x110000) if chr(c).isdecimal()]] = DIGIT
    # Python's own notion of whitespace (str.isspace, what `\s` matches in a str pattern).
    classes[[c for c in range(0x110000) if chr(c).isspace()]] = SPACE
    return classes


def han_pattern(ranges: list[tuple[int, int]] | None = None) -> str:
    """A regex character class of Han characters (`HAN_RANGES`, or the subset `ranges`)."""
    return "[" + "".join(f"{chr(low)}-{chr(high)}" for low, high in (ranges or HAN_RANGES)) + "]"


def is_han(char: str) -> bool:
    return bool(table()[ord(char)] == HAN)


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def code_points_lenient(text: str) -> np.ndarray:
    """`code_points`, a lone surrogate kept as its own code point instead of raising: a batch step must
    not fail on it (normalisation drops it, a lookup table gives it its own entry)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def classify(cps: np.ndarray) -> np.ndarray:
    return table()[cps]

