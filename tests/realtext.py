"""Real Chinese text for tests, read from ../shared/data/clue (never copied into the project)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clue"


@lru_cache(maxsize=None)
def abstracts() -> tuple[str, ...]:
    """Scientific abstracts from FewCLUE CSL (about 200–400 characters each)."""
    out = []
    for name in ("test_public.json", "train_few_all.json", "dev_few_all.json"):
        with open(CLUE / "fewclue" / "csl" / name, encoding="utf-8") as fh:
            out += [json.loads(line)["abst"] for line in fh if line.strip()]
    return tuple(dict.fromkeys(out))  # CSL repeats abstracts across keyword variants


@lru_cache(maxsize=None)
def app_descriptions(min_chars: int = 150) -> tuple[str, ...]:
    """App store descriptions from FewCLUE IFLYTEK (web-like text with ads and version notes)."""
    with open(CLUE / "fewclue" / "iflytek" / "test_public.json", encoding="utf-8") as fh:
        texts = [json.loads(line)["sentence"] for line in fh if line.strip()]
    return tuple(t for t in dict.fromkeys(texts) if len(t) >= min_chars)


def long_documents(n: int, paragraphs: int = 3) -> list[str]:
    """n distinct documents of a few real paragraphs each."""
    source = abstracts()
    return ["\n".join(source[(i * paragraphs + k) % len(source)] for k in range(paragraphs)) for i in range(n)]


def substitute_chinese(text: str, fraction: float, rng) -> str:
    """A near copy: `fraction` of the characters, all Chinese ones, replaced by common Chinese
    characters. Its length after dedup normalisation is the original's, so the two rank equal for
    DedupConfig.survivor_order and input order picks the survivor."""
    chars = list(text)
    han = [i for i, ch in enumerate(chars) if "\u4e00" <= ch <= "\u9fff"]
    for i in rng.sample(han, int(len(chars) * fraction)):
        chars[i] = rng.choice("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动")
    return "".join(chars)
