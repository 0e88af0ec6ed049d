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
