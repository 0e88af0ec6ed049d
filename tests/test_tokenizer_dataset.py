"""Training rows: shape, positions, labels, domains, mixture, determinism and resume."""
from __future__ import annotations

import itertools
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_tokenizer_common import clue_documents, session_dir, trained_model_dir, write_corpus
from tokenizer.config import PackConfig
from tokenizer.dataset import PANGU_ALPHA_MIXTURE, DomainStream, PackedRowDataset, TokenShards, make_example, resolve_weights
from tokenizer.pack import pack_corpus

L = 64


@lru_cache(maxsize=None)
def tokens_dir() -> Path:
    corpus = write_corpus(session_dir() / "ds-corpus", list(clue_documents()[::8]), shards=2)
    out = session_dir() / "ds-tokens"
    pack_corpus(PackConfig(input=str(corpus), output=str(out), tokenizer=str(trained_model_dir())))
    return out


def test_example_layout() -> None:
    row = np.array([11, 12, 9, 13, 14, 15, 9, 16, 6, 6], dtype=np.int64)
    ex = make_example(row, domain=3, block_mask=True)
    assert ex["input_ids"].tolist() == [11, 12, 9, 13, 14, 15, 9, 16, 6]
    assert ex["labels"].tolist() == [12, 9, 13, 14, 15, 9, 16, -100, -100]
    assert ex["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert ex["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert ex["domain_ids"].tolist() == [3] * 9
    mask = ex["attention_mask"]
    assert mask[4, 3] and not mask[3, 2] and not mask[3, 4] and mask[2, 0]


def test_domain_stream_covers_every_token_once_per_epoch() -> None:
    shards = TokenShards(tokens_dir())
    domain = int(np.bincount(shards.doc_domains).argmax())
    stream = DomainStream(shards, domain, L, seed=5)
    rows = [stream.row(k) for k in range(stream.rows_per_epoch)]
    assert all(len(r) == L + 1 for r in rows)
    flat = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
    flat = flat[: stream.tokens]
    assert (rows[-1][stream.tokens - (len(rows) - 1) * L:] == 6).all()  # only padding after the stream
    docs = [shards.document(int(i)) for i in stream._order]
    assert flat.tolist() == np.concatenate(docs).tolist()
    assert sorted(stream._order.tolist()) == sorted(np.flatnonzero(shards.doc_domains == domain).tolist())
    assert (flat == 9).sum() == len(docs)
    # The next epoch visits the same documents in another order.
    first_order = stream._order.tolist()
    stream.row(stream.rows_per_epoch)
    assert stream._order.tolist() != first_order and sorted(stream._order.tolist()) == sorted(first_order)


def test_mixture_weights_and_aliases() -> None:
    weights = resolve_weights("pangu-alpha", {"web": 600, "news": 100, "poetry": 50, "encyclopedia": 0})
    assert set(weights) == {"web", "news"}  # poetry has no weight, encyclopedia no tokens
    assert weights["web"] == pytest.approx(0.6281 / (0.6281 + 0.0783))
    split = resolve_weights({"common_crawl": 1.0, "news": 1.0}, {"web": 300, "cc": 100, "news": 5})
    assert split == pytest.approx({"web": 0.375, "cc": 0.125, "news": 0.5})
    assert resolve_weights(None, {"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="none of"):
        resolve_weights("pangu-alpha", {"poetry": 10})
    assert sum(PANGU_ALPHA_MIXTURE.values()) == pytest.approx(1.0)


def test_rows_follow_the_mixture() -> None:
    ds = PackedRowDataset(tokens_dir(), seq_len=L, weights="pangu-alpha", seed=1, num_rows=2000)
    counts: dict[int, int] = {}
    names = ds.shards.domain_names
    for ex in ds:
        d = int(ex["domain_ids"][0])
        counts[d] = counts.get(d, 0) + 1
        assert ex["input_ids"].shape == (L,) and ex["labels"].dtype == torch.long
    for d, n in counts.items():
        assert abs(n / 2000 - ds.weights[names[d]]) < 0.04, (names[d], n)
    assert ds.state_dict()["step"] == 2000


def _rows(ds: PackedRowDataset, n: int) -> list[list[int]]:
    return [ex["input_ids"].tolist() + [int(ex["domain_ids"][0])] for ex in itertools.islice(iter(ds), n)]


def test_deterministic_and_resumable() -> None:
    make = lambda seed=3: PackedRowDataset(tokens_dir(), seq_len=L, weights="natural", seed=seed)
    full = _rows(make(), 60)
    assert full == _rows(make(), 60) and full != _rows(make(4), 60)
    first = make()
    head = _rows(first, 25)
    state = first.state_dict()
    assert set(state) == {"seed", "step", "consumed"} and state["step"] == 25
    resumed = make()
    resumed.load_state_dict(state)
    assert head + _rows(resumed, 35) == full
    with pytest.raises(ValueError, match="seed"):
        make(9).load_state_dict(state)


def test_ranks_split_the_same_sequence() -> None:
    full = _rows(PackedRowDataset(tokens_dir(), seq_len=L, seed=2), 20)
    r0 = _rows(PackedRowDataset(tokens_dir(), seq_len=L, seed=2, rank=0, world_size=2), 10)
    r1 = _rows(PackedRowDataset(tokens_dir(), seq_len=L, seed=2, rank=1, world_size=2), 10)
    assert r0 == full[0::2] and r1 == full[1::2]


def test_feeds_the_model_loss() -> None:
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(PackedRowDataset(tokens_dir(), seq_len=L, num_rows=4), batch_size=4)))
    assert batch["input_ids"].shape == (4, L) and batch["position_ids"].max() < L


# --- domain-affine sampling (issue #12 §2) -----------------------------------------------------------
EQUAL = {"ebooks": 1.0, "encyclopedia": 1.0, "news": 1.0, "public_datasets": 1.0, "web": 1.0}


def _affine(rank: int = 0, world: int = 1, groups=None, **kw) -> PackedRowDataset:
    kw = {"seq_len": L, "weights": "pangu-alpha", "seed": 7, "rows_per_step": 3, **kw}
    return PackedRowDataset(tokens_dir(), rank=rank, world_size=world, domain_groups=groups or [[0]], **kw)


def test_largest_remainder_and_the_schedule_hold_the_weights_exactly() -> None:
    from tokenizer.dataset import affine_schedule, largest_remainder

    weights = list(PANGU_ALPHA_MIXTURE.values())
    for total in (1, 7, 64, 1000, 1024):
        counts = largest_remainder(weights, total)
        assert counts.sum() == total and (np.abs(counts - np.array(weights) / sum(weights) * total) < 1).all()
    for groups, steps in ((1, 50), (4, 16), (64, 16), (3, 7)):
        grid = affine_schedule(weights, groups, steps, seed=3, window=5)
        assert grid.shape == (steps, groups)
        assert np.bincount(grid.ravel(), minlength=5).tolist() == largest_remainder(
            weights, groups * steps, np.random.default_rng([3, 0xAFF1, 5]).permutation(5)).tolist()
    # 40 equal domains, 8 groups: no domain twice in a step (each has at most one slot per step).
    grid = affine_schedule(np.ones(40), 8, 16, seed=1, window=0)
    assert all(len(set(row.tolist())) == 8 for row in grid)
    # Equal remainders are broken in a seeded order per window: no domain is favoured in the long run.
    total = sum(np.bincount(affine_schedule(np.ones(40), 8, 16, 1, w).ravel(), minlength=40) for w in range(200))
    assert total.max() - total.min() < 0.1 * total.mean()


def test_domain_affine_realised_mixture_is_exact_over_a_window() -> None:
    from tokenizer.dataset import largest_remainder

    window = 40
    ds = _affine(window_steps=window, rows_per_step=3)
    rows = [int(ex["domain_ids"][0]) for ex in itertools.islice(iter(ds), 2 * window * 3)]
    steps = [rows[i:i + 3] for i in range(0, len(rows), 3)]
    assert all(len(set(s)) == 1 for s in steps)  # one domain per step (a single group: world size 1)
    for w in range(2):
        realised = np.bincount([s[0] for s in steps[w * window:(w + 1) * window]], minlength=5)
        ties = np.random.default_rng([7, 0xAFF1, w]).permutation(len(ds.domains))
        expected = largest_remainder(list(ds.weights.values()), window, ties)
        assert [realised[d] for d in ds.domains] == expected.tolist()
        shares = realised[ds.domains] / window
        assert np.abs(shares - np.array(list(ds.weights.values()))).max() < 1 / window
    assert ds.window_steps == window and _affine().window_steps == 1024  # default: >= 1024 slots


def test_domain_affine_groups_share_a_domain_and_differ_from_each_other() -> None:
    groups, world, per_rank, steps = [[0, 1], [2, 3]], 4, 3, 30
    ranks = [_rows(_affine(r, world, groups, weights=EQUAL, rows_per_step=per_rank), steps * per_rank)
             for r in range(world)]
    domain_of = lambda r, s: {row[-1] for row in ranks[r][s * per_rank:(s + 1) * per_rank]}
    for s in range(steps):
        first, second = domain_of(0, s), domain_of(2, s)
        assert len(first) == 1 and domain_of(1, s) == first  # every rank of a group: one domain
        assert len(second) == 1 and domain_of(3, s) == second
        assert first != second  # 5 domains of equal weight, 2 groups: never the same in one step
    # The ranks together take each domain's rows 0, 1, 2, ... exactly once.
    ds = _affine(weights=EQUAL)
    taken: dict[int, list[list[int]]] = {}
    for rows in ranks:
        for row in rows:
            taken.setdefault(row[-1], []).append(row[:-1])
    for d, rows in taken.items():
        stream = ds.streams[d]
        assert sorted(rows) == sorted(stream.row(k)[:-1].tolist() for k in range(len(rows)))


def test_domain_affine_resumes_exactly_mid_step_and_mid_window() -> None:
    groups = [[0, 1], [2, 3]]
    full = _rows(_affine(1, 4, groups, window_steps=6), 40)
    first = _affine(1, 4, groups, window_steps=6)
    head = _rows(first, 17)  # 5 steps and 2 of 3 rows: inside a step, inside the window
    state = first.state_dict()
    assert state["sampler"] == {"kind": "domain-affine", "groups": groups, "rows_per_step": 3, "window_steps": 6}
    resumed = _affine(1, 4, groups, window_steps=6)
    resumed.load_state_dict(state)
    assert head + _rows(resumed, 23) == full
    # A state of the other sampler, or of another grouping, is refused.
    independent = PackedRowDataset(tokens_dir(), seq_len=L, weights="pangu-alpha", seed=7)
    with pytest.raises(ValueError, match="domain_affine"):
        independent.load_state_dict(state)
    with pytest.raises(ValueError, match="domain_affine"):
        _affine().load_state_dict(independent.state_dict())
    with pytest.raises(ValueError, match="domain_affine"):
        _affine(1, 4, [[0, 2], [1, 3]], window_steps=6).load_state_dict(state)
    with pytest.raises(ValueError, match="split ranks"):
        _affine(0, 4, [[0, 1], [1, 2]])


def test_token_counts_of_the_packed_shards() -> None:
    from tokenizer.dataset import token_counts

    shards = TokenShards(tokens_dir())
    everything = np.concatenate([shards.document(i) for i in range(len(shards))]).astype(np.int64)
    counts = token_counts(tokens_dir(), vocab_size=5000)
    assert counts.shape == (5000,) and counts.tolist() == np.bincount(everything, minlength=5000).tolist()
    per_domain = token_counts(tokens_dir(), per_domain=True, chunk_tokens=500)
    assert (per_domain.sum(axis=0) == counts[: per_domain.shape[1]]).all()
    for d in np.unique(shards.doc_domains):
        docs = [shards.document(int(i)) for i in np.flatnonzero(shards.doc_domains == d)]
        assert per_domain[d].sum() == sum(len(x) for x in docs)
    with pytest.raises(ValueError, match="outside a vocabulary"):
        token_counts(tokens_dir(), vocab_size=10)
