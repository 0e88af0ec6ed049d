"""Training rows from packed token shards, sampled by domain mixture weights (SPEC §4, §3 Table 4).

Each domain is a stream: its documents (each already ending in `<eot>`) in a seeded order per epoch,
concatenated and cut Megatron-style into rows of seq_len + 1 ids that overlap by one token (row r
holds tokens [r·L, r·L + L + 1)), so every token is a target exactly once; the last row of an epoch
is filled with `<pad>`. Every step picks a domain with the mixture weights and takes that domain's
next row; a domain that runs out starts its next epoch in a new order.

Everything is a function of the seed and a few counters — the step and the rows taken per domain —
which `state_dict()` returns and `load_state_dict()` restores: a resumed run continues with exactly
the rows an uninterrupted one would have produced. Ranks (`rank`, `world_size`) walk the same
sequence and keep every world_size-th row. Use `num_workers=0` in the DataLoader: rows are
memory-mapped slices, and a worker's copy of the counters would not reach the main process.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset

from tokenizer.indexed import IndexedReader
from tokenizer.pack import DOMAINS_FILE
from tokenizer.specials import EOT, PAD

IGNORE_INDEX = -100

# PanGu-α Table 4: sampling weights of the 1 TB training set.
PANGU_ALPHA_MIXTURE: dict[str, float] = {
    "public_datasets": 0.1023,
    "ebooks": 0.1223,
    "common_crawl": 0.6281,
    "news": 0.0783,
    "encyclopedia": 0.069,
}
MIXTURE_PRESETS: dict[str, dict[str, float]] = {"pangu-alpha": PANGU_ALPHA_MIXTURE}
# Corpus domain names that mean a Table 4 category (the corpus stage's sample uses "web", "literature").
DOMAIN_ALIASES: dict[str, str] = {
    "web": "common_crawl", "commoncrawl": "common_crawl", "cc": "common_crawl",
    "books": "ebooks", "ebook": "ebooks", "e-books": "ebooks", "literature": "ebooks",
    "public": "public_datasets", "datasets": "public_datasets",
    "wiki": "encyclopedia", "wikipedia": "encyclopedia", "baike": "encyclopedia",
}
_CHOICE_BLOCK = 4096


class TokenShards:
    """Every packed shard of a directory as one list of documents with domain ids."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        summary_file = self.path / DOMAINS_FILE
        if not summary_file.is_file():
            raise FileNotFoundError(f"{summary_file} is missing: is {self.path} a packed token directory?")
        self.summary = json.loads(summary_file.read_text(encoding="utf-8"))
        self.domain_names = {int(i): name for i, name in self.summary["id_to_name"].items()}
        self.readers = [IndexedReader(self.path / stem) for stem in self.summary["shards"]]
        domains = [np.load(self.path / f"{stem}.domains.npy") for stem in self.summary["shards"]]
        for reader, d, stem in zip(self.readers, domains, self.summary["shards"]):
            if len(d) != len(reader):
                raise ValueError(f"{stem}: {len(d)} domain ids for {len(reader)} documents")
        self.doc_domains = np.concatenate(domains) if domains else np.zeros(0, dtype=np.uint16)
        self.doc_lengths = np.concatenate([r.sizes.astype(np.int64) for r in self.readers]) if self.readers else np.zeros(0, np.int64)
        self._shard_of = np.repeat(np.arange(len(self.readers)), [len(r) for r in self.readers])
        self._first = np.concatenate([[0], np.cumsum([len(r) for r in self.readers])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def document(self, i: int) -> np.ndarray:
        shard = int(self._shard_of[i])
        return self.readers[shard][i - int(self._first[shard])]


class DomainStream:
    """One domain's documents, reordered per epoch, cut into rows of `seq_len + 1` ids."""

    def __init__(self, shards: TokenShards, domain: int, seq_len: int, seed: int,
                 documents: np.ndarray | None = None) -> None:
        self.shards = shards
        self.domain = domain
        self.seq_len = seq_len
        self.seed = seed
        self.documents = np.flatnonzero(shards.doc_domains == domain) if documents is None else documents
        self.tokens = int(shards.doc_lengths[self.documents].sum())
        self.rows_per_epoch = max(1, math.ceil((self.tokens - 1) / seq_len))
        self._epoch: int | None = None

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, self.domain, epoch])
        self._order = rng.permutation(self.documents)
        self._ends = np.cumsum(self.shards.doc_lengths[self._order])
        self._epoch = epoch

    def row(self, k: int) -> np.ndarray:
        """The k-th row of this stream (k counts across epochs)."""
        epoch, r = divmod(k, self.rows_per_epoch)
        self._load_epoch(epoch)
        start, stop = r * self.seq_len, min(r * self.seq_len + self.seq_len + 1, self.tokens)
        out = np.full(self.seq_len + 1, PAD, dtype=np.int64)
        first = int(np.searchsorted(self._ends, start, side="right"))
        filled, position, i = 0, start, first
        while position < stop:
            doc = self._order[i]
            doc_start = int(self._ends[i]) - int(self.shards.doc_lengths[doc])
            piece = self.shards.document(int(doc))[position - doc_start: stop - doc_start]
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            position += len(piece)
            i += 1
        return out


def make_example(row: np.ndarray, domain: int, block_mask: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs from one row of seq_len + 1 ids.

    `position_ids` restart after every `<eot>` (the `<eot>` closes its document); `document_ids`
    number the documents of the row, which is what a block-diagonal causal mask needs
    (`block_mask=True` adds it as `attention_mask` [L, L], True where attention is allowed).
    Labels are the next ids, with `<pad>` replaced by -100.
    """
    ids = torch.from_numpy(np.asarray(row, dtype=np.int64))
    input_ids, labels = ids[:-1].clone(), ids[1:].clone()
    labels[labels == PAD] = IGNORE_INDEX
    length = input_ids.numel()
    starts = torch.zeros(length, dtype=torch.bool)
    starts[0] = True
    starts[1:] = input_ids[:-1] == EOT
    index = torch.arange(length)
    position_ids = index - torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
    document_ids = starts.long().cumsum(0) - 1
    example = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "domain_ids": torch.full((length,), domain, dtype=torch.long),
    }
    if block_mask:
        causal = index[None, :] <= index[:, None]
        example["attention_mask"] = causal & (document_ids[:, None] == document_ids[None, :])
    return example


def resolve_weights(
    weights: Mapping[str, float] | str | None, domain_tokens: Mapping[str, int]
) -> dict[str, float]:
    """Sampling probability per domain present in the data.

    `None` or "natural": proportional to tokens. A preset name or a name → weight map: a data domain
    takes the weight of its name or of its alias (`DOMAIN_ALIASES`); several data domains under one
    name share its weight in proportion to their tokens; domains without a weight are not sampled.
    """
    present = {name: n for name, n in domain_tokens.items() if n > 0}
    if not present:
        raise ValueError("no domain has any tokens")
    if weights is None or weights == "natural":
        total = sum(present.values())
        return {name: n / total for name, n in present.items()}
    if isinstance(weights, str):
        if weights not in MIXTURE_PRESETS:
            raise ValueError(f"unknown mixture preset {weights!r} (have {sorted(MIXTURE_PRESETS)}, 'natural')")
        weights = MIXTURE_PRESETS[weights]
    groups: dict[str, list[str]] = {}
    for name in present:
        key = name if name in weights else DOMAIN_ALIASES.get(name.lower(), name)
        if key in weights:
            groups.setdefault(key, []).append(name)
    raw: dict[str, float] = {}
    for key, names in groups.items():
        tokens = sum(present[n] for n in names)
        for n in names:
            raw[n] = weights[key] * present[n] / tokens
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"none of the data's domains {sorted(present)} has a weight in {dict(weights)}")
    return {name: w / total for name, w in sorted(raw.items()) if w > 0}


HOLDOUT_SEED = 0xE7A1  # fixed: the held-out documents depend on the data only, never on a run's seeds


def held_out(shards: TokenShards, fraction: float) -> np.ndarray:
    """Per document: True if it belongs to the validation slice.

    A seeded draw of `fraction` of each domain's documents (at least one where a domain has two or
    more, never all of them), so every domain has a validation loss and training never reads it."""
    mask = np.zeros(len(shards), dtype=bool)
    if fraction <= 0:
        return mask
    for domain in np.unique(shards.doc_domains):
        documents = np.flatnonzero(shards.doc_domains == domain)
        if len(documents) < 2:
            continue
        count = min(len(documents) - 1, max(1, round(fraction * len(documents))))
        rng = np.random.default_rng([HOLDOUT_SEED, int(domain)])
        mask[rng.choice(documents, size=count, replace=False)] = True
    return mask


def validation_examples(path: str | Path, seq_len: int, fraction: float, rows_per_domain: int,
                        block_mask: bool = False) -> list[dict[str, torch.Tensor]]:
    """The validation rows: up to `rows_per_domain` rows of seq_len + 1 ids cut from each domain's
    held-out documents (`held_out`), in a fixed order: the same rows at every evaluation."""
    shards = TokenShards(path)
    mask = held_out(shards, fraction)
    examples = []
    for domain in sorted(int(d) for d in np.unique(shards.doc_domains[mask])):
        documents = np.flatnonzero(mask & (shards.doc_domains == domain))
        stream = DomainStream(shards, domain, seq_len, HOLDOUT_SEED, documents)
        examples += [make_example(stream.row(k), domain, block_mask)
                     for k in range(min(rows_per_domain, stream.rows_per_epoch))]
    return examples


class PackedRowDataset(IterableDataset):
    """Rows of seq_len + 1 ids drawn from packed shards by domain mixture (see module docstring)."""

    def __init__(
        self,
        path: str | Path,
        seq_len: int = 1024,
        weights: Mapping[str, float] | str | None = "natural",
        seed: int = 0,
        num_rows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        block_mask: bool = False,
        validation_fraction: float = 0.0,
    ) -> None:
        """`validation_fraction`: the share of each domain's documents held out for validation
        (`held_out`); training rows never include them."""
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError("need 0 <= rank < world_size")
        self.shards = TokenShards(path)
        self.seq_len = seq_len
        self.seed = seed
        self.num_rows = num_rows
        self.rank, self.world_size = rank, world_size
        self.block_mask = block_mask
        trained = ~held_out(self.shards, validation_fraction)
        ids = {name: int(i) for i, name in self.shards.domain_names.items()}
        tokens = {name: int(self.shards.doc_lengths[trained & (self.shards.doc_domains == i)].sum())
                  for name, i in ids.items()}
        self.weights = resolve_weights(weights, tokens)
        self.domains = [ids[name] for name in self.weights]
        self._probabilities = np.array(list(self.weights.values()), dtype=np.float64)
        self._probabilities /= self._probabilities.sum()
        self.streams = {d: DomainStream(self.shards, d, seq_len, seed,
                                        np.flatnonzero(trained & (self.shards.doc_domains == d)))
                        for d in self.domains}
        self.step = 0
        self.consumed = {d: 0 for d in self.domains}
        self._block: tuple[int, np.ndarray] | None = None

    def _domain_at(self, step: int) -> int:
        block = step // _CHOICE_BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, 0x5EED, block])
            self._block = (block, rng.choice(len(self.domains), size=_CHOICE_BLOCK, p=self._probabilities))
        return self.domains[int(self._block[1][step % _CHOICE_BLOCK])]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.num_rows is None or self.step < self.num_rows:
            step = self.step
            domain = self._domain_at(step)
            k = self.consumed[domain]
            # Counters move before the row is handed out, so state_dict() names the next row.
            self.consumed[domain] = k + 1
            self.step = step + 1
            if step % self.world_size == self.rank:
                yield make_example(self.streams[domain].row(k), domain, self.block_mask)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "step": self.step,
            "consumed": {int(d): int(n) for d, n in self.consumed.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this dataset uses {self.seed}")
        consumed = {int(d): int(n) for d, n in state["consumed"].items()}
        if set(consumed) != set(self.domains):
            raise ValueError(f"state covers domains {sorted(consumed)}, this dataset samples {self.domains}")
        self.step = int(state["step"])
        self.consumed = consumed
