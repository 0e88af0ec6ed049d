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

Domain-affine sampling (`domain_groups`, PanGu-Σ; issue #12 §2): the ranks are split into equal groups
(the trainer passes the ranks of each node, a multiple of the expert-parallel group) and in every
optimizer step all rows of one group come from one domain, so the group's step routes to that
domain's experts only (sigma-1t: 16 of 640 per layer, against ~105 with independent rows on the
FewCLUE sample: benchmarks/routing_balance.py) and ECSS fetches only those. The domain of each
(step, group) slot comes from `affine_schedule`: over a window of `window_steps` steps (W = window ×
groups slots) domain d gets exactly n_d slots, n_d the largest-remainder rounding of W·weight_d, so
the realised mixture over every whole window is the weights up to that rounding (|n_d/W − w_d| < 1/W;
a domain with W·w_d < 1 may get no slot in a window). Inside a window the slots are laid out so that a
domain with at most one slot per step (weight ≤ 1/groups) never appears in two groups of one step,
and the steps and the groups of each step are shuffled with the seed. The global row order is step
by step, group by group, rank by rank of the group, `rows_per_step` rows per rank (the rank's
micro-batches × gradient accumulation of that step), and the same counters resume it exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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
# Domain-affine sampling: the default window holds at least this many (step, group) slots, so the
# window's mixture is the weights to within 1/1024 (sigma-1t on 512 ranks, 64 nodes: 16 steps).
AFFINE_WINDOW_SLOTS = 1024


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


def token_counts(path: str | Path, vocab_size: int | None = None, per_domain: bool = False,
                 chunk_tokens: int = 1 << 24) -> np.ndarray:
    """Occurrences of every token id in a packed token directory (all shards, held-out documents too).

    [vocab] int64, or [domain ids, vocab] with `per_domain`. `vocab_size` defaults to the largest id +
    1; the shards are read as memory maps, `chunk_tokens` at a time (a bincount per chunk)."""
    shards = TokenShards(path)
    domain_of_docs: list[np.ndarray] = []
    start = 0
    for reader in shards.readers:
        domain_of_docs.append(shards.doc_domains[start: start + len(reader)])
        start += len(reader)
    num_domains = int(shards.doc_domains.max()) + 1 if len(shards) else 1
    top = 0
    for reader in shards.readers:
        if reader.num_tokens:
            top = max(top, int(reader.tokens.max()) + 1)
    size = max(top, vocab_size or 0)
    if vocab_size is not None and top > vocab_size:
        raise ValueError(f"{path} holds token id {top - 1}, outside a vocabulary of {vocab_size}")
    counts = np.zeros((num_domains if per_domain else 1, size), dtype=np.int64)
    for reader, domains in zip(shards.readers, domain_of_docs):
        if not reader.num_tokens:
            continue
        if not per_domain:
            for first in range(0, reader.num_tokens, chunk_tokens):
                counts[0] += np.bincount(reader.tokens[first: first + chunk_tokens], minlength=size)
            continue
        # Documents are back to back in the .bin: cut at document boundaries, chunk_tokens or so at a time.
        ends = np.cumsum(reader.sizes.astype(np.int64))
        doc = 0
        while doc < len(reader):
            first = int(ends[doc - 1]) if doc else 0
            last_doc = max(doc + 1, int(np.searchsorted(ends, first + chunk_tokens, side="right")))
            last_doc = min(last_doc, len(reader))
            ids = reader.tokens[first: int(ends[last_doc - 1])].astype(np.int64)
            owner = np.repeat(domains[doc:last_doc].astype(np.int64), reader.sizes[doc:last_doc])
            counts += np.bincount(owner * size + ids, minlength=counts.size).reshape(counts.shape)
            doc = last_doc
    return counts if per_domain else counts[0]


def largest_remainder(weights: Sequence[float], total: int, tie_order: Sequence[int] | None = None) -> np.ndarray:
    """Integers n_d with sum `total` closest to total·weight_d (Hamilton's method): floors first, then
    one more to the largest remainders; equal remainders go by `tie_order` (a rank per domain, default
    the domain's position). |n_d − total·w_d| < 1."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = w / w.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    left = total - int(counts.sum())
    if left:
        ties = np.arange(len(w)) if tie_order is None else np.asarray(tie_order)
        order = np.lexsort((ties, -(quotas - counts)))
        counts[order[:left]] += 1
    return counts


def affine_schedule(weights: Sequence[float], groups: int, window_steps: int, seed: int,
                    window: int) -> np.ndarray:
    """[window_steps, groups]: the domain index (into `weights`) of every (step, group) slot of one window.

    Domain d gets exactly n_d = largest_remainder(weights, window_steps·groups)[d] slots. The slots are
    filled domain by domain (in a seeded order) down the steps of group 0, then group 1, ...: a
    domain's slots are consecutive, so one with n_d ≤ window_steps lands in n_d different steps. The
    steps, and the groups inside every step, are then shuffled with (seed, window). Equal remainders
    are broken in a seeded order per window, so equal weights also get equal shares in the long run."""
    rng = np.random.default_rng([seed, 0xAFF1, window])
    counts = largest_remainder(weights, window_steps * groups, tie_order=rng.permutation(len(weights)))
    order = rng.permutation(len(counts))
    sequence = np.repeat(order, counts[order])
    grid = sequence.reshape(groups, window_steps).T.copy()  # slot i → group i // steps, step i % steps
    for row in grid:
        rng.shuffle(row)
    return grid[rng.permutation(window_steps)]


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
        domain_groups: Sequence[Sequence[int]] | None = None,
        rows_per_step: int = 1,
        window_steps: int | None = None,
    ) -> None:
        """`validation_fraction`: the share of each domain's documents held out for validation
        (`held_out`); training rows never include them.

        `domain_groups` (domain-affine sampling, module docstring): the ranks of every group, equal
        sizes, together 0..world_size-1 — all ranks pass the same list; `rows_per_step`: the rows a
        rank takes per optimizer step (micro_batch_size × gradient_accumulation_steps); `window_steps`:
        the steps over which the mixture holds exactly (default: the fewest steps with at least
        `AFFINE_WINDOW_SLOTS` slots). None (the default): every row draws its domain independently."""
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
        self.domain_groups: list[list[int]] | None = None
        if domain_groups is not None:
            groups = [[int(r) for r in g] for g in domain_groups]
            if sorted(r for g in groups for r in g) != list(range(world_size)):
                raise ValueError(f"domain_groups {groups} do not split ranks 0..{world_size - 1}")
            if len({len(g) for g in groups}) != 1:
                raise ValueError(f"domain_groups {groups} differ in size")
            if rows_per_step < 1:
                raise ValueError("rows_per_step must be at least 1")
            self.domain_groups = groups
            self.rows_per_step = rows_per_step
            self.window_steps = window_steps or max(1, math.ceil(AFFINE_WINDOW_SLOTS / len(groups)))
            if self.window_steps < 1:
                raise ValueError("window_steps must be at least 1")
            self._window: tuple[int, np.ndarray] | None = None
        else:
            self.rows_per_step = rows_per_step
            self.window_steps = window_steps

    @property
    def domain_affine(self) -> bool:
        return self.domain_groups is not None

    def _domain_at(self, step: int) -> int:
        block = step // _CHOICE_BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, 0x5EED, block])
            self._block = (block, rng.choice(len(self.domains), size=_CHOICE_BLOCK, p=self._probabilities))
        return self.domains[int(self._block[1][step % _CHOICE_BLOCK])]

    def affine_domain(self, step: int, group: int) -> int:
        """Domain id of optimizer step `step`'s rows in group `group` (domain-affine sampling)."""
        window, position = divmod(step, self.window_steps)
        if self._window is None or self._window[0] != window:
            grid = affine_schedule(self._probabilities, len(self.domain_groups), self.window_steps, self.seed, window)
            self._window = (window, grid)
        return self.domains[int(self._window[1][position, group])]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.domain_groups is not None:
            yield from self._iter_affine()
            return
        while self.num_rows is None or self.step < self.num_rows:
            step = self.step
            domain = self._domain_at(step)
            k = self.consumed[domain]
            # Counters move before the row is handed out, so state_dict() names the next row.
            self.consumed[domain] = k + 1
            self.step = step + 1
            if step % self.world_size == self.rank:
                yield make_example(self.streams[domain].row(k), domain, self.block_mask)

    def _iter_affine(self) -> Iterator[dict[str, torch.Tensor]]:
        """`self.step` counts global rows: step by step, group by group, rank by rank, rows_per_step each."""
        per_rank = self.rows_per_step
        group_rows = len(self.domain_groups[0]) * per_rank
        step_rows = self.world_size * per_rank
        while self.num_rows is None or self.step < self.num_rows:
            row = self.step
            step, position = divmod(row, step_rows)
            group, within = divmod(position, group_rows)
            member, _ = divmod(within, per_rank)
            domain = self.affine_domain(step, group)
            if self.domain_groups[group][member] == self.rank:
                k = self.consumed[domain]
                self.consumed[domain] = k + 1
                self.step = row + 1
                yield make_example(self.streams[domain].row(k), domain, self.block_mask)
            else:  # another rank's rows: move the counters past them in one go
                skip = per_rank - within % per_rank
                if self.num_rows is not None:
                    skip = min(skip, self.num_rows - row)
                self.consumed[domain] += skip
                self.step = row + skip

    def _sampler(self) -> dict[str, Any] | None:
        if self.domain_groups is None:
            return None
        return {"kind": "domain-affine", "groups": [list(g) for g in self.domain_groups],
                "rows_per_step": int(self.rows_per_step), "window_steps": int(self.window_steps)}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "seed": self.seed,
            "step": self.step,
            "consumed": {int(d): int(n) for d, n in self.consumed.items()},
        }
        if self.domain_groups is not None:
            state["sampler"] = self._sampler()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this dataset uses {self.seed}")
        consumed = {int(d): int(n) for d, n in state["consumed"].items()}
        if set(consumed) != set(self.domains):
            raise ValueError(f"state covers domains {sorted(consumed)}, this dataset samples {self.domains}")
        theirs, ours = state.get("sampler"), self._sampler()
        if theirs != ours:
            describe = lambda s: "independent rows (domain_affine off)" if s is None else (
                f"domain-affine steps (groups {s['groups']}, {s['rows_per_step']} rows per rank and step, "
                f"window {s['window_steps']} steps)")
            raise ValueError(f"state is for {describe(theirs)}, this dataset samples {describe(ours)}: "
                             "resume with the sampler the run started with (TrainConfig.domain_affine)")
        self.step = int(state["step"])
        self.consumed = consumed
