"""MinHash signatures on real Chinese text (CLUE csl abstracts, read in place, never copied)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from cleaning import minhash
from cleaning.dedup_config import DedupConfig
from cleaning.minhash import EMPTY, MinHasher, code_points, estimated_jaccard, normalize
from tests.realtext import CLUE

IFLYTEK = CLUE / "fewclue" / "iflytek"


def _jsonl(path: Path, field: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)[field] for line in fh if line.strip()]


def _shingles(text: str, n: int = 3) -> set[str]:
    t = normalize(text)
    return {t} if len(t) < n else {t[i:i + n] for i in range(len(t) - n + 1)}


def _edit(text: str, rate: float, rng: random.Random, alphabet: str) -> str:
    chars = list(text)
    for _ in range(max(1, round(rate * len(chars)))):
        i = rng.randrange(len(chars))
        chars[i] = rng.choice(alphabet)
    return "".join(chars)


TRICKY = ["ΣΑΣ ΟΔΟΣ", "İstanbul", "ﬁne ㈱", "ㄱㅏ 가", "e\u0301 é", "Ａｂｃ，。！", "\ud800x", "",
          "  \t", "a\u200bb", "𝐀𝚺 x", "Ⅻ ①", "繁體字，简体字。"]


def test_batch_normalisation_equals_string_normalisation(abstracts):
    # the batch path (table look-ups) must give exactly the code points of normalize(), which
    # the exact key hashes; the tricky strings exercise the fallback (marks, jamo, sigma, ligatures)
    texts = abstracts[:200] + _jsonl(IFLYTEK / "dev_few_all.json", "sentence")[:200] + TRICKY
    cps, lengths = code_points(texts)
    ends = np.cumsum(lengths)
    for text, end, length in zip(texts, ends, lengths):
        expected = np.frombuffer(normalize(text).encode("utf-32-le"), dtype="<u4")
        assert np.array_equal(cps[end - length:end], expected), repr(text)


def test_normalize_drops_punctuation_whitespace_and_case():
    assert normalize("Ａ　B，c。\n D!") == "abcd"
    assert normalize("中文， 文本。") == "中文文本"
    assert normalize("中文文本") != normalize("中文文字")


def test_signatures_are_deterministic_across_batches_and_instances(abstracts):
    config = DedupConfig()
    docs = abstracts[:40]
    alone = MinHasher(config).signatures(docs)
    assert alone.shape == (40, config.num_perm) and alone.dtype == np.uint32
    shuffled = list(reversed(docs[10:30])) + ["无关的短文本"] + abstracts[100:110]
    again = MinHasher(DedupConfig()).signatures(shuffled)
    assert np.array_equal(again[:20], alone[10:30][::-1])
    one = MinHasher(config).signatures([docs[5]])
    assert np.array_equal(one[0], alone[5])
    other_seed = MinHasher(DedupConfig(seed=config.seed + 1)).signatures([docs[5]])
    assert not np.array_equal(other_seed[0], alone[5])


def test_slicing_of_large_batches_changes_nothing(abstracts, monkeypatch):
    docs = abstracts[:30] + ["".join(abstracts[30:60])]  # one long document among short ones
    whole = MinHasher(DedupConfig()).signatures(docs)
    monkeypatch.setattr(minhash, "_SHINGLES_PER_SLICE", 500)  # many slices, a doc larger than one
    assert np.array_equal(MinHasher(DedupConfig()).signatures(docs), whole)


def test_short_and_empty_texts():
    config = DedupConfig()
    hasher = MinHasher(config)
    assert hasher.signatures([]).shape == (0, config.num_perm)
    sig = hasher.signatures(["", "。 ，", "a", "ab", "ab", "abc", "ba", "中"])
    assert (sig[0] == EMPTY).all() and (sig[1] == EMPTY).all()   # nothing left to shingle
    assert not (sig[2:] == EMPTY).all(axis=1).any()              # shorter than n: one shingle
    assert np.array_equal(sig[3], sig[4])
    assert estimated_jaccard(sig[3], sig[5]) < 0.2                 # "ab" != "abc"
    assert estimated_jaccard(sig[3], sig[6]) < 0.2                 # order matters


def test_estimated_jaccard_tracks_true_jaccard(abstracts):
    rng = random.Random(3)
    alphabet = "".join(ch for ch in "".join(abstracts[:50]) if "\u4e00" <= ch <= "\u9fff")
    hasher = MinHasher(DedupConfig())
    originals = abstracts[:150]
    for rate in (0.05, 0.2):
        edited = [_edit(t, rate, rng, alphabet) for t in originals]
        est = estimated_jaccard(hasher.signatures(originals), hasher.signatures(edited))
        true = np.array([len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
                         for a, b in zip(originals, edited)])
        # standard error sqrt(J(1-J)/125) <= 0.045: the mean is unbiased, no pair is 4 errors off
        assert abs((est - true).mean()) < 0.015
        assert np.abs(est - true).max() < 0.18
    unrelated = estimated_jaccard(hasher.signatures(abstracts[:150]), hasher.signatures(abstracts[150:300]))
    assert unrelated.max() < 0.15


def test_short_documents_fill_their_empty_bins_and_keep_the_estimate_unbiased(abstracts):
    # 40-90 characters: fewer shingles than the 125 bins of the one permutation, so a third to two
    # thirds of each document's bins get no shingle and are filled from a neighbour (densification)
    rng = random.Random(5)
    alphabet = "".join(ch for ch in "".join(abstracts[:50]) if "\u4e00" <= ch <= "\u9fff")
    hasher = MinHasher(DedupConfig())
    short = [t[:rng.randrange(40, 90)] for t in abstracts[:400]]
    assert max(len(_shingles(t)) for t in short) < DedupConfig().num_perm
    edited = [_edit(t, 0.1, rng, alphabet) for t in short]
    a, b = hasher.signatures(short), hasher.signatures(edited)
    assert not (a == EMPTY).any() and not (b == EMPTY).any()
    # a document's own values: densified bins are not copies of one value
    assert min(len(set(row.tolist())) for row in a) > DedupConfig().num_perm // 2
    est = estimated_jaccard(a, b)
    true = np.array([len(_shingles(x) & _shingles(y)) / len(_shingles(x) | _shingles(y)) for x, y in zip(short, edited)])
    assert abs((est - true).mean()) < 0.015 and np.abs(est - true).max() < 0.2
    unrelated = estimated_jaccard(a[:200], a[200:])
    assert unrelated.max() < 0.15


def test_signature_speed_is_vectorised(abstracts):
    # a per-n-gram Python loop runs at tens of documents per second; the bar is far below the
    # thousands the vectorised path reaches, so a shared, busy machine still passes
    text = "".join(abstracts)
    docs = [text[i * 1000:(i + 1) * 1000] for i in range(200)]
    hasher = MinHasher(DedupConfig())
    hasher.signatures(docs[:5])
    started = time.perf_counter()
    hasher.signatures(docs)
    assert 200 / (time.perf_counter() - started) > 500


def test_characters_that_expand_are_normalised_by_table_and_equal_the_string_path(abstracts, monkeypatch):
    # "…" -> "..." and "⒈" -> "1." are several characters after NFKC; they are expanded from a table
    # (no document takes the string path here), and the result is still normalize()'s.
    from cleaning import minhash

    rng = random.Random(4)
    expanding = [chr(c) for c in minhash._expansions()[0].tolist()]
    assert {"…", "⒈", "℃", "ﬁ", "㈱"} <= set(expanding)
    texts = ["".join(rng.choices(expanding + list("中文ab，。 "), k=rng.randrange(0, 30))) for _ in range(500)]
    texts += [t[:40] + "……" + t[40:80] for t in abstracts[:100]] + ["…", "", "⒈⒉"]
    monkeypatch.setattr(minhash, "normalize", lambda text: pytest.fail(f"string path taken for {text!r}"))
    cps, lengths = code_points(texts)
    monkeypatch.undo()
    assert lengths.tolist() == [len(normalize(t)) for t in texts]
    assert np.array_equal(cps, np.frombuffer("".join(normalize(t) for t in texts).encode("utf-32-le"), dtype="<u4"))
