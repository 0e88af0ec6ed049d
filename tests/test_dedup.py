"""Dedup map -> reduce -> cluster on real Chinese text with planted duplicates.

Base documents are CLUE csl abstracts (read in place) of >= 100 characters, unique after
normalisation (the `abstracts` fixture, tests/conftest.py). Measured once over all 720 of them:
the largest character 3-gram Jaccard between two different abstracts is 0.11, so any cluster
that mixes two of them is a false positive.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from cleaning import dedup
from cleaning.dedup import cluster, exact_key, load_duplicates, map_shard, reduce_partition
from cleaning.dedup_config import DedupConfig
from cleaning.minhash import MinHasher, estimated_jaccard, normalize

CONFIG = DedupConfig(partitions=4)
LEVELS = (0.01, 0.02, 0.05)


def _edit(text: str, rate: float, rng: random.Random, alphabet: str) -> str:
    """Random substitutions, insertions and deletions of about rate * len characters."""
    chars = list(text)
    for _ in range(max(1, round(rate * len(chars)))):
        i, op = rng.randrange(len(chars)), rng.randrange(3)
        if op == 0:
            chars[i] = rng.choice(alphabet)
        elif op == 1:
            chars.insert(i, rng.choice(alphabet))
        else:
            del chars[i]
    return "".join(chars)


def _respell(text: str) -> str:
    """Same normalised text: other punctuation, spaces, full-width letters and digits."""
    out = text.replace("，", ", ").replace("。", " . ").replace("、", "／")
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in out)


def _run(work: str, shards: list[list[str]], config: DedupConfig = CONFIG,
         sources: list[list[str]] | None = None, qualities: list[list[float | None]] | None = None,
         ) -> dedup.DedupSummary:
    for s, texts in enumerate(shards):
        map_shard(work, s, texts, config, sources and sources[s], qualities and qualities[s])
    for p in range(config.partitions):
        reduce_partition(work, p, config)
    return cluster(work, len(shards), config)


def _survivors(work: str, shards: list[list[str]]) -> dict[tuple[int, int], tuple[int, int]]:
    out = {(s, r): (s, r) for s, texts in enumerate(shards) for r in range(len(texts))}
    for s in range(len(shards)):
        for row, (ss, sr, _) in load_duplicates(work, s).items():
            out[(s, row)] = (ss, sr)
    return out


@pytest.fixture(scope="module")
def planted(abstracts, tmp_path_factory):
    """300 originals; 30 respelled exact copies, 30 + 30 near copies at 1 % and 2 % edits and
    120 at 5 %; shuffled into 3 shards."""
    rng = random.Random(7)
    base = abstracts[:300]
    alphabet = "".join(ch for ch in "".join(abstracts[300:400]) if "\u4e00" <= ch <= "\u9fff")
    docs = [(t, g, None) for g, t in enumerate(base)]
    plan = ["exact"] * 30 + [0.01] * 30 + [0.02] * 30 + [0.05] * 120
    for g, kind in enumerate(plan):
        copy = _respell(base[g]) if kind == "exact" else _edit(base[g], kind, rng, alphabet)
        docs.append((copy, g, kind))
    rng.shuffle(docs)
    shards = [[d[0] for d in docs[i::3]] for i in range(3)]
    where = {}  # (shard, row) of every document
    for i, d in enumerate(docs):
        where[i] = (i % 3, i // 3)
    work = str(tmp_path_factory.mktemp("dedup"))
    summary = _run(work, shards)
    return {"docs": docs, "shards": shards, "where": where, "work": work, "summary": summary}


# -- exact keys ---------------------------------------------------------------------------------
def test_exact_key_ignores_whitespace_punctuation_case_and_width(abstracts):
    text = abstracts[0]
    assert exact_key(text) == exact_key(_respell(text))
    assert exact_key("Hello, World!") == exact_key("ｈｅｌｌｏ　ｗｏｒｌｄ")
    assert exact_key(text) != exact_key(text[:-3])
    assert exact_key(text) != exact_key(text.replace(text[10], "鑫", 1))
    assert 0 <= exact_key(text) < 2**64


def test_map_writes_the_exact_keys_of_exact_key(planted):
    for s, texts in enumerate(planted["shards"]):
        keys = np.load(f"{planted['work']}/exact/{s:05d}.npy")
        assert keys.tolist() == [exact_key(t) for t in texts]


# -- accuracy -----------------------------------------------------------------------------------
def test_planted_duplicates_are_found_and_nothing_unrelated_is_clustered(planted):
    docs, where = planted["docs"], planted["where"]
    survivor = _survivors(planted["work"], planted["shards"])
    origin = {where[i]: d[1] for i, d in enumerate(docs)}
    original_at = {d[1]: where[i] for i, d in enumerate(docs) if d[2] is None}

    found: dict[object, list[bool]] = {}
    for i, (_, g, kind) in enumerate(docs):
        if kind is not None:
            found.setdefault(kind, []).append(survivor[where[i]] == survivor[original_at[g]])
    assert all(found["exact"])
    assert np.mean(found[0.01]) >= 0.95 and np.mean(found[0.02]) >= 0.95
    assert np.mean(found[0.05]) >= 0.85

    # zero false positives: every cluster holds one original and its own copies only
    for doc, surv in survivor.items():
        assert origin[doc] == origin[surv], f"{doc} clustered with unrelated {surv}"
    assert planted["summary"].exact_duplicates >= 30
    assert planted["summary"].clusters == len({s for d, s in survivor.items() if s != d})


def test_kinds_and_survivor_is_the_longest_then_the_smallest_shard_row(planted):
    """No sources nor quality scores: the default survivor order comes down to the length after
    normalisation, then (shard, row)."""
    docs, where = planted["docs"], planted["where"]
    survivor = _survivors(planted["work"], planted["shards"])
    length = {(s, r): len(normalize(t)) for s, texts in enumerate(planted["shards"]) for r, t in enumerate(texts)}
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for doc, surv in survivor.items():
        members.setdefault(surv, []).append(doc)
    for surv, group in members.items():
        assert surv == min(group, key=lambda d: (-length[d], d))
    assert any(surv != min(group) for surv, group in members.items())  # length overruled path order
    kinds = {(s, r): k for s in range(3) for r, (_, _, k) in load_duplicates(planted["work"], s).items()}
    for i, (_, _, kind) in enumerate(docs):
        if kind == "exact" and where[i] in kinds:
            assert kinds[where[i]] == "exact"
    summary = planted["summary"]
    assert summary.exact_duplicates == sum(k == "exact" for k in kinds.values())
    assert summary.near_duplicates == sum(k == "near" for k in kinds.values())
    assert summary.documents == len(docs)


def test_chaining_does_not_glue_unrelated_documents(abstracts, tmp_path):
    # 100-character chunks of abstracts; A = chunks 0..15, B = 3..18, C = 6..21: true 3-gram
    # Jaccard A~B 0.67, B~C 0.67, A~C 0.43. With A first (the survivor), B is A's duplicate; C is
    # confirmed against B but not against A, so it must stay a survivor of its own.
    text = "".join(normalize(t) for t in abstracts[400:440])
    chunks = [text[i * 100:(i + 1) * 100] for i in range(22)]
    a, b, c = ("".join(chunks[i:i + 16]) for i in (0, 3, 6))
    sig = MinHasher(CONFIG).signatures([a, b, c])
    assert estimated_jaccard(sig[0], sig[1]) >= CONFIG.threshold
    assert estimated_jaccard(sig[1], sig[2]) >= CONFIG.threshold
    assert estimated_jaccard(sig[0], sig[2]) < CONFIG.threshold
    shards = [[a, abstracts[500]], [b, c]]
    summary = _run(str(tmp_path), shards)
    assert load_duplicates(str(tmp_path), 0) == {}
    assert load_duplicates(str(tmp_path), 1) == {0: (0, 0, "near")}
    assert summary.pairs_confirmed >= 2 and summary.chain_splits == 1


def test_survivor_order_ranks_by_priority_quality_and_length_then_path(abstracts, tmp_path):
    """Cluster X: one abstract three times (the same normalised text, so equal lengths) from the
    sources web, baike and books; cluster Y: another abstract from baike and its copy cut short
    from web, first in path order. Which member survives under each DedupConfig."""
    a, b = [t for t in abstracts if len(t) > 250][:2]
    shards = [[a, b[:-20]], [_respell(a), b], [a]]
    sources = [["web", "web"], ["baike", "baike"], ["books"]]
    qualities = [[0.9, None], [0.3, 0.1], [0.9]]  # None: not scored, counts as 0.5
    cases = [
        ({"survivor_order": []}, (0, 0), (0, 1)),                             # path order alone
        ({}, (0, 0), (0, 1)),                                                 # quality: 0.9 = 0.9 > 0.3; 0.5 > 0.1
        ({"survivor_order": ["length"]}, (0, 0), (1, 1)),                     # equal lengths: path; longer
        ({"source_priority": {"baike": 1}}, (1, 0), (1, 1)),                  # priority before quality
        ({"source_priority": {"books": 2, "baike": 1}}, (2, 0), (1, 1)),
        ({"survivor_order": ["quality", "priority"], "source_priority": {"books": 1}}, (2, 0), (0, 1)),
        ({"source_priority": {"web": 1, "baike": 1, "books": 1}}, (0, 0), (0, 1)),  # equal priorities
    ]
    for k, (settings, x, y) in enumerate(cases):
        config = CONFIG.model_copy(update=settings)
        work = str(tmp_path / str(k))
        summary = _run(work, shards, config, sources, qualities)
        survivor = _survivors(work, shards)
        assert {survivor[d] for d in [(0, 0), (1, 0), (2, 0)]} == {x}, settings
        assert {survivor[d] for d in [(0, 1), (1, 1)]} == {y}, settings
        assert summary.exact_duplicates == 2 and summary.near_duplicates == 1, settings


def test_survivor_settings_are_validated_and_left_out_of_the_pairs_fingerprint():
    with pytest.raises(ValueError):
        DedupConfig(survivor_order=["length", "length"])
    with pytest.raises(ValueError):
        DedupConfig(survivor_order=["size"])
    ranked = CONFIG.model_copy(update={"source_priority": {"baike": 1}, "survivor_order": ["length"]})
    assert ranked.pairs_fingerprint() == CONFIG.pairs_fingerprint()
    assert ranked.fingerprint() != CONFIG.fingerprint()
    assert CONFIG.model_copy(update={"threshold": 0.7}).pairs_fingerprint() != CONFIG.pairs_fingerprint()


# -- restartability -----------------------------------------------------------------------------
def _outputs(work: str) -> dict[str, tuple[float, bytes]]:
    out = {}
    for root, _, files in os.walk(work):
        for name in files:
            path = os.path.join(root, name)
            out[path] = (os.stat(path).st_mtime_ns, Path(path).read_bytes())
    return out


def test_rerun_after_outputs_exist_does_no_work(planted, monkeypatch):
    work, shards = planted["work"], planted["shards"]
    before = _outputs(work)

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(dedup.MinHasher, "signatures_from_code_points", forbidden)
    monkeypatch.setattr(dedup, "_save_array", forbidden)
    monkeypatch.setattr(dedup, "_load_array", forbidden)
    assert _run(work, shards) == planted["summary"]
    assert _outputs(work) == before


def test_interrupted_stages_leave_no_trace(abstracts, tmp_path):
    shards = [abstracts[:40] + [_respell(abstracts[3])], abstracts[40:80] + [abstracts[50][:-9]]]
    clean = tmp_path / "clean"
    expected = _run(str(clean), shards)
    assert expected.exact_duplicates == 1 and expected.near_duplicates == 1

    work = tmp_path / "crashed"
    map_shard(str(work), 0, shards[0], CONFIG)
    # a crash while writing shard 1: partial temporary files, no completion marker
    for folder in ("signatures", "buckets/p000", "buckets/p001", "pairs"):
        (work / folder).mkdir(parents=True, exist_ok=True)
        (work / folder / ".00001.npy.deadbeef.tmp").write_bytes(b"\x93NUMPY partial")
    (work / "buckets/p002/00001.npy").write_bytes(b"garbage from a crashed run")
    summary = _run(str(work), shards)
    assert summary == expected
    for s in range(2):
        assert load_duplicates(str(work), s) == load_duplicates(str(clean), s)


def test_another_config_in_the_same_directory_is_refused(abstracts, tmp_path):
    map_shard(str(tmp_path), 0, abstracts[:5], CONFIG)
    with pytest.raises(ValueError):
        map_shard(str(tmp_path), 0, abstracts[:5], CONFIG.model_copy(update={"threshold": 0.7}))


# -- edge cases ---------------------------------------------------------------------------------
def test_empty_shards_and_very_short_texts(tmp_path):
    shards = [[], ["", "。", "a", "a", "短文", "短文！", "一二", "完全不同的另一段话"], []]
    summary = _run(str(tmp_path), shards)
    for s in range(3):
        assert (tmp_path / "duplicates" / f"{s:05d}.npy").exists()
    assert load_duplicates(str(tmp_path), 0) == {} and load_duplicates(str(tmp_path), 2) == {}
    # "" and "。" both normalise to the empty text: one exact cluster, like "a"/"a" and "短文"/"短文！"
    assert load_duplicates(str(tmp_path), 1) == {1: (1, 0, "exact"), 3: (1, 2, "exact"),
                                                 5: (1, 4, "exact")}
    assert summary.documents == 8 and summary.clusters == 3 and summary.near_duplicates == 0


def test_exact_only_and_fsspec_uri(abstracts):
    config = CONFIG.model_copy(update={"fuzzy": False})
    shards = [abstracts[:20] + [_respell(abstracts[1]), abstracts[2][:50] + "鑫" + abstracts[2][51:]],
              abstracts[:1]]
    work = "memory://dedup-exact-only"
    summary = _run(work, shards, config)
    assert load_duplicates(work, 0) == {20: (0, 1, "exact")}
    assert load_duplicates(work, 1) == {0: (0, 0, "exact")}
    assert summary.near_duplicates == 0 and summary.pairs_checked == 0


# -- memory bound -------------------------------------------------------------------------------
def test_reduce_reads_one_partition_and_signatures_only(planted, tmp_path, monkeypatch):
    work = tmp_path / "copy"
    shutil.copytree(planted["work"], work)
    shutil.rmtree(work / "pairs")
    whole: list[str] = []  # files read whole
    by_rows: list[str] = []  # files read by byte ranges of rows
    real_load, real_rows = dedup._load_array, dedup._Rows.__init__

    def load_spy(fs, path, mmap=False):
        whole.append(path)
        return real_load(fs, path, mmap)

    def rows_spy(self, fs, path):
        by_rows.append(path)
        real_rows(self, fs, path)

    monkeypatch.setattr(dedup, "_load_array", load_spy)
    monkeypatch.setattr(dedup._Rows, "__init__", rows_spy)
    reduce_partition(str(work), 2, CONFIG)
    opened = whole + by_rows
    buckets = [p for p in opened if "/buckets/" in p]
    assert sorted(buckets) == [f"{work}/buckets/p002/{s:05d}.npy" for s in range(3)]
    others = [p for p in opened if "/buckets/" not in p]
    assert others and all("/signatures/" in p for p in others) and not set(others) & set(whole)  # rows only
    pairs = np.load(work / "pairs" / "p002.npy")
    assert np.array_equal(pairs, np.load(Path(planted["work"]) / "pairs" / "p002.npy"))
