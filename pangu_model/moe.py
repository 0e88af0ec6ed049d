"""Feed-forward layers: the dense GeLU FFN and three sparse replacements with one interface.

Every FFN is called as `ffn(x [B, T, d], token_ids [B, T], domain_ids [B, T]) -> (out, aux_loss)`, so a
block never knows which router it holds:

- `DenseFFN`: PanGu-α's d → 4d → d GeLU MLP.
- `RandomRoutedExperts` (PanGu-Σ, SPEC §5.2): no learned gate; domain id picks the expert group,
  a fixed token-id table picks the expert inside it (seeded random, or frequency-balanced from corpus
  counts: `PanguConfig.routing_table`). Top-1, dropless, deterministic.
- `MixtureOfGroupedExperts` (Pangu Pro MoE, SPEC §5.3): softmax over all experts, top-K′ inside
  every group, so every group (device) receives exactly the same load.
- `LearnedTopKExperts` (Switch / GShard, SPEC §5.4): learned gate, capacity factor, dropped tokens
  pass through on the residual, load-balancing aux loss.

Experts live in an `ExpertBank` of stacked tensors, so inheritance and extraction are tensor slices.
The routed computation (`grouped_experts`) has two backends with the same result:

- ``"loop"`` (CPU, fp32/fp16 CUDA): sort tokens by expert, one matmul pair per non-empty expert. The
  split sizes come to the host: one device→host sync per layer.
- ``"grouped"`` (bf16 on CUDA with SM ≥ 80, the default there): `F.grouped_mm` runs every expert in
  one kernel per matmul, with group offsets that stay on the device; no sync, static shapes (so it
  also compiles). `expert_backend` picks; `ExpertBank.expert_backend` (or
  `PanguModel.set_expert_backend`) forces one, e.g. "grouped" on the CPU for tests.

Routing counts (`RoutingStats.expert_load`, MoGE and top-k aux-loss fractions) are counted with
`expert_counts` (a scatter-add; `torch.bincount` syncs on CUDA to size its output) and stay on the
device; `RoutingStats.dropped` turns the top-k drop count into an int only when someone reads it.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PanguConfig

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallel


@dataclass(frozen=True)
class RoutingStats:
    """What the last forward routed where (detached, on the forward's device; for inspection and benchmarks)."""

    expert_load: torch.Tensor  # [E] assignments that were computed, per expert
    tokens: int
    dropped_assignments: torch.Tensor | int = 0  # dropped by capacity (learned top-k only); a tensor: no sync

    @property
    def dropped(self) -> int:
        """Assignments dropped by capacity, as an int (a device→host sync when read, never in the forward)."""
        return int(self.dropped_assignments)


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [num_experts] (int64), like `torch.bincount(minlength=)` but without its
    device→host sync on CUDA (bincount reads the maximum to size its output)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    return counts.scatter_add_(0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1)))


EXPERT_BACKENDS = ("auto", "loop", "grouped")

# Rows of every expert group on the grouped path are padded to a multiple of this, and at least this:
# torchtitan's recipe for `grouped_mm` (16-byte aligned groups of bf16 rows; no empty groups, which some
# kernels mishandle in the weight-gradient pass). Padding rows are zeros and never read back.
GROUPED_MM_ALIGN = 8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def select_expert_backend(
    device_type: str, compute_dtype: torch.dtype, sm_major: int | None, requested: str = "auto"
) -> str:
    """``"grouped"`` (one `grouped_mm` per matmul, no host sync) or ``"loop"`` (per-expert matmuls).

    ``"auto"``: grouped where `grouped_mm` has its fast kernel — CUDA, bf16 compute (bf16 weights or a
    bf16 autocast), SM ≥ 80 (SPEC §10) — and the loop everywhere else, the CPU included."""
    if requested not in EXPERT_BACKENDS:
        raise ValueError(f"unknown expert backend {requested!r}; known: {', '.join(EXPERT_BACKENDS)}")
    if requested != "auto":
        return requested
    if device_type == "cuda" and compute_dtype == torch.bfloat16 and (sm_major or 0) >= 8:
        return "grouped"
    return "loop"


def expert_backend(x: torch.Tensor, requested: str = "auto") -> str:
    """`select_expert_backend` for the input `x` of a routed layer."""
    if requested != "auto":
        return select_expert_backend(x.device.type, x.dtype, None, requested)
    sm_major = cuda_capability_major(x.device.index or 0) if x.device.type == "cuda" else None
    return select_expert_backend(x.device.type, _compute_dtype(x), sm_major)


# Per CUDA device: a dictionary lookup is what a compiled block traces (a constant it guards on), where Dynamo
# cannot trace get_device_properties, and a graph break in every routed layer would split each block in two.
# (Not torch.compiler.assume_constant_result: using it at import imports Dynamo, 2-4 s of every start.)
_SM_MAJOR: dict[int, int] = {}


def cuda_capability_major(device_index: int) -> int:
    major = _SM_MAJOR.get(device_index)
    if major is None:
        major = _SM_MAJOR[device_index] = torch.cuda.get_device_properties(device_index).major
    return major


def device_imbalance(expert_load: torch.Tensor, num_devices: int, tokens: int) -> float:
    """(max − min load per device) / tokens, experts laid out contiguously over devices."""
    per_device = expert_load.reshape(num_devices, -1).sum(dim=1)
    return float(per_device.max() - per_device.min()) / max(tokens, 1)


class DenseFFN(nn.Module):
    """GeLU FFN; with `tp` (tensor_parallel.py) `fc_in` is column-parallel and `fc_out` row-parallel, so each
    rank computes d_ff / tp.size of the inner width."""

    def __init__(self, d_model: int, d_ff: int, tp: "TensorParallel | None" = None) -> None:
        super().__init__()
        if tp is None or tp.size == 1:
            self.fc_in = nn.Linear(d_model, d_ff)
            self.fc_out = nn.Linear(d_ff, d_model)
        else:
            from .tensor_parallel import ColumnParallelLinear, RowParallelLinear

            self.fc_in = ColumnParallelLinear(d_model, d_ff, tp)
            self.fc_out = RowParallelLinear(d_ff, d_model, tp)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, domain_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc_out(F.gelu(self.fc_in(x))), x.new_zeros(())


# ExpertBank tensor → the DenseFFN / nn.Linear tensor that one expert's row of it corresponds to.
EXPERT_WEIGHTS = {"w_in": "fc_in.weight", "b_in": "fc_in.bias", "w_out": "fc_out.weight", "b_out": "fc_out.bias"}


class ExpertBank(nn.Module):
    """`num_experts` GeLU FFNs, each laid out exactly like `DenseFFN` (nn.Linear orientation).

    `first_expert` > 0 marks a shard of a larger bank (experts first_expert, first_expert + 1, ...):
    each expert's initial weights depend only on its global index (`PanguModel.reset_parameters`)."""

    # "auto", "loop" or "grouped" (see `expert_backend`); an instance attribute overrides it.
    expert_backend = "auto"

    def __init__(self, num_experts: int, d_model: int, d_ff: int, first_expert: int = 0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.w_in = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model))

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(x, self.w_in[index], self.b_in[index]))
        return F.linear(hidden, self.w_out[index], self.b_out[index])

    def forward(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        token_index: torch.Tensor,
        gate_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over assignments a of gate_weight[a] · expert[expert_index[a]](x[token_index[a]]).

        x is [N, d]; the assignment vectors are [A]. Tokens with no assignment get zeros.
        """
        return grouped_experts(x, expert_index, token_index, gate_weight, self.num_experts,
                               self.w_in, self.b_in, self.w_out, self.b_out, backend=self.expert_backend)


def grouped_experts(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    token_index: torch.Tensor,
    gate_weight: torch.Tensor | None,
    num_experts: int,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """GeLU experts stacked along dim 0, applied to their tokens and scattered back with index_add
    (shared by ExpertBank and ECSS's fetched slots). `backend`: see `expert_backend`.

    On the grouped backend an `expert_index` equal to `num_experts` marks a dropped assignment: it is
    computed by no expert and contributes zero (learned top-k uses this instead of a boolean filter,
    whose output size would need a sync)."""
    if expert_backend(x, backend) == "grouped":
        return _grouped_experts_mm(x, expert_index, token_index, gate_weight, num_experts, w_in, b_in, w_out, b_out)
    order = torch.argsort(expert_index, stable=True)
    sorted_tokens = token_index[order]
    # One host sync per layer: the split sizes. The loop runs over experts, never over tokens.
    counts = torch.bincount(expert_index, minlength=num_experts).tolist()
    outputs = []
    for expert, tokens in zip(range(num_experts), torch.split(sorted_tokens, counts)):
        if tokens.numel():
            hidden = F.gelu(F.linear(x[tokens], w_in[expert], b_in[expert]))
            outputs.append(F.linear(hidden, w_out[expert], b_out[expert]))
    if not outputs:
        return torch.zeros_like(x)
    routed = torch.cat(outputs)
    if gate_weight is not None:
        routed = routed * gate_weight[order, None].to(routed.dtype)
    return torch.zeros_like(x).index_add(0, sorted_tokens, routed.to(x.dtype))


def _grouped_experts_mm(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    token_index: torch.Tensor,
    gate_weight: torch.Tensor | None,
    num_experts: int,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    align: int = GROUPED_MM_ALIGN,
) -> torch.Tensor:
    """`grouped_experts` with two `F.grouped_mm` calls and no device→host sync.

    Assignments are sorted by expert into a row buffer of static size A + align·(E + 1) in which every
    expert's group starts on a multiple of `align` (group e ends at offs[e]); dropped assignments go to
    an extra group E past offs[-1], which grouped_mm does not compute. grouped_mm leaves the rows past
    offs[-1] uninitialised, so they are masked with `torch.where` (a select: garbage cannot leak into
    values or gradients, not even as 0·NaN) before anything reads them.
    """
    if num_experts == 0:  # an expert-parallel shard that nothing was routed to (ECSS fetched no expert)
        return torch.zeros_like(x)
    dtype = _compute_dtype(x)
    device = x.device
    assignments = expert_index.numel()
    groups = num_experts + 1
    counts = expert_counts(expert_index, groups)
    padded = ((counts + align - 1) // align * align).clamp_min(align)
    padded_end = padded.cumsum(0)
    order = torch.argsort(expert_index, stable=True)
    sorted_expert = expert_index[order]
    sorted_tokens = token_index[order]
    rank_in_group = torch.arange(assignments, device=device) - (counts.cumsum(0) - counts)[sorted_expert]
    row = (padded_end - padded)[sorted_expert] + rank_in_group  # [A] each assignment's row
    rows = assignments + align * groups
    offs = padded_end[:num_experts]
    row_index = torch.arange(rows, device=device)
    valid = (row_index < offs[-1])[:, None]
    row_expert = torch.searchsorted(offs, row_index, right=True).clamp(max=num_experts - 1)
    kept = (sorted_expert < num_experts)[:, None]
    expert_of = sorted_expert.clamp(max=num_experts - 1)
    offs = offs.to(torch.int32)

    source = torch.where(kept, x[sorted_tokens].to(dtype), 0)
    x_rows = torch.zeros(rows, x.shape[-1], dtype=dtype, device=device).index_copy(0, row, source)
    hidden = F.grouped_mm(x_rows, w_in.to(dtype).transpose(-2, -1), offs=offs)
    hidden = torch.where(valid, hidden, 0) + b_in.to(dtype)[row_expert]
    hidden = torch.where(valid, F.gelu(hidden), 0)
    out_rows = F.grouped_mm(hidden, w_out.to(dtype).transpose(-2, -1), offs=offs)
    # Masked before the gate multiplies it: the gate's gradient is the routed row times the output's, and
    # a dropped assignment's row is uninitialised (0 · NaN would be NaN).
    routed = torch.where(kept, out_rows[row] + b_out.to(dtype)[expert_of], 0)
    if gate_weight is not None:
        routed = routed * gate_weight[order, None].to(routed.dtype)
    return torch.zeros_like(x).index_add(0, sorted_tokens, routed.to(x.dtype))


def random_routing_table(vocab_size: int, experts_per_group: int, seed: int) -> torch.Tensor:
    """Token id → expert slot in [0, experts_per_group): a seeded random permutation dealt round-robin.

    Dealing a permutation (rather than drawing ids independently) gives every expert the same number of
    vocabulary entries, which is the hash-layer recipe for balance without a balance loss.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    permutation = torch.randperm(vocab_size, generator=generator, device="cpu")
    table = torch.empty(vocab_size, dtype=torch.long, device="cpu")
    table[permutation] = torch.arange(vocab_size, device="cpu") % experts_per_group
    return table


def balanced_routing_table(
    token_counts: np.ndarray | torch.Tensor, experts_per_group: int, seed: int, smoothing: float = 1.0
) -> torch.Tensor:
    """Token id → expert slot in [0, experts_per_group) that balances the corpus's tokens over the experts.

    Hash Layers' "balanced" assignment (Roller et al. 2021), longest-processing-time style: ids in order of
    descending count (equal counts in a seeded order), each to the slot with the least load so far (then
    the fewest ids, then the lowest slot). `smoothing` is added to every id's count first, so ids the
    corpus never shows (or rarely shows) are spread evenly instead of all landing on one slot.
    A pure function of its arguments: every rank builds the same table from the same counts.
    """
    counts = np.asarray(token_counts.cpu() if isinstance(token_counts, torch.Tensor) else token_counts,
                        dtype=np.float64).reshape(-1) + smoothing
    if experts_per_group < 1:
        raise ValueError("experts_per_group must be at least 1")
    if (counts < 0).any():
        raise ValueError("token counts must not be negative")
    ties = np.random.default_rng([seed, 0xBA1A]).permutation(len(counts))
    order = np.lexsort((ties, -counts))
    table = np.empty(len(counts), dtype=np.int64)
    heap = [(0.0, 0, slot) for slot in range(experts_per_group)]
    for token in order.tolist():
        load, ids, slot = heap[0]
        table[token] = slot
        heapq.heapreplace(heap, (load + float(counts[token]), ids + 1, slot))
    return torch.from_numpy(table).to("cpu")


_COUNTS_CACHE: dict[tuple[str, int, float], np.ndarray] = {}


def load_token_counts(source: str | os.PathLike[str], vocab_size: int) -> np.ndarray:
    """Counts per token id [vocab_size] (numpy int64) from a packed token directory or a `.npy` file
    (cached per process: every RRE layer of a model reads the same counts)."""
    path = Path(source)
    key = (str(path.resolve()), vocab_size, os.path.getmtime(path))
    if key not in _COUNTS_CACHE:
        if path.is_dir():
            from tokenizer.dataset import token_counts

            counts = token_counts(path, vocab_size=vocab_size)
        else:
            counts = np.load(path).astype(np.int64).reshape(-1)
            if len(counts) > vocab_size:
                raise ValueError(f"{path}: counts for {len(counts)} ids, the vocabulary has {vocab_size}")
            counts = np.pad(counts, (0, vocab_size - len(counts)))
        _COUNTS_CACHE[key] = counts
    return _COUNTS_CACHE[key]


def routing_table(config: PanguConfig, layer_index: int) -> torch.Tensor:
    """The token id → expert slot table of RRE layer `layer_index` (`PanguConfig.routing_table`).

    Built on the meta device (a checkpoint being loaded: its saved table replaces this one) the balanced
    table is not computed, so loading an export never needs the counts it was built from."""
    seed = config.routing_seed + layer_index
    if config.routing_table == "random":
        return random_routing_table(config.vocab_size, config.experts_per_domain, seed)
    if config.routing_table != "balanced":
        raise ValueError(f"unknown routing table {config.routing_table!r}")
    if torch.empty(0).device.type == "meta":
        return torch.zeros(config.vocab_size, dtype=torch.long, device="meta")
    counts = load_token_counts(config.routing_counts, config.vocab_size)
    return balanced_routing_table(counts, config.experts_per_domain, seed)


def rre_expert_ids(groups: torch.Tensor, slots: torch.Tensor, num_domains: int, experts_per_domain: int,
                   layout: str = "contiguous") -> torch.Tensor:
    """Global expert id of (domain group, slot in the group): PanGu-Σ's level-1 × level-2 routing.

    "contiguous": group·K + slot, a domain's experts side by side. "interleaved": slot·D + group, a
    domain's experts spread evenly over the contiguous id ranges that expert-parallel ranks hold, so a
    domain-affine step (tokenizer.dataset) spreads its tokens over the whole expert-parallel group."""
    if layout == "interleaved":
        return slots * num_domains + groups
    return groups * experts_per_domain + slots


def rre_route(config: PanguConfig, table: torch.Tensor, token_ids: torch.Tensor, domain_ids: torch.Tensor
              ) -> torch.Tensor:
    """`RandomRoutedExperts.route` from a layer's routing table alone (a pipeline stage counting the load of
    layers other stages hold)."""
    return rre_expert_ids(domain_ids - config.domain_id_offset, table[token_ids], config.num_domains,
                          config.experts_per_domain, config.expert_layout)


class RandomRoutedExperts(nn.Module):
    """PanGu-Σ's two-level routing: domain → expert group, token id → expert (fixed table).

    With `expert_shard` (rank, size) the layer holds only that contiguous shard of its experts, for a
    training run that spreads them over ranks (ECSS or DeepSpeed MoE replace the bank before use)."""

    def __init__(self, config: PanguConfig, layer_index: int, expert_shard: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_domains = config.num_domains
        self.experts_per_domain = config.experts_per_domain
        self.domain_id_offset = config.domain_id_offset
        self.expert_layout = config.expert_layout
        total = self.num_domains * self.experts_per_domain
        rank, size = expert_shard or (0, 1)
        if size < 1 or not 0 <= rank < size or total % size:
            raise ValueError(f"expert shard {rank} of {size} does not split {total} experts")
        self.total_experts = total
        self.experts = ExpertBank(total // size, config.d_model, config.expert_width, first_expert=rank * total // size)
        # A buffer, not a parameter: frozen, saved with the model, identical on every rank.
        table = routing_table(config, layer_index)
        self.register_buffer("token_to_expert", table, persistent=True)
        self.last_stats: RoutingStats | None = None

    def route(self, token_ids: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        """Global expert id [B, T] for every token."""
        return rre_expert_ids(domain_ids - self.domain_id_offset, self.token_to_expert[token_ids], self.num_domains,
                              self.experts_per_domain, self.expert_layout)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor, domain_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.experts.num_experts != self.total_experts:
            raise RuntimeError(f"this layer holds {self.experts.num_experts} of {self.total_experts} experts "
                               "(an expert shard): run it through ECSS or DeepSpeed MoE")
        flat = x.reshape(-1, x.shape[-1])
        expert_index = self.route(token_ids, domain_ids).reshape(-1)
        token_index = torch.arange(flat.shape[0], device=x.device)
        out = self.experts(flat, expert_index, token_index)
        self.last_stats = RoutingStats(expert_counts(expert_index, self.total_experts).detach(), flat.shape[0])
        return out.view_as(x), x.new_zeros(())


class MixtureOfGroupedExperts(nn.Module):
    """MoGE: N experts in M groups; global softmax, top-K′ per group, learned per-expert scale."""

    def __init__(self, config: PanguConfig, layer_index: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.num_groups = config.moge_groups
        self.top_k_per_group = config.moge_top_k_per_group
        self.aux_loss_coef = config.aux_loss_coef
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.experts = ExpertBank(config.num_experts, config.d_model, config.expert_width)
        self.shared_experts = (
            ExpertBank(config.moge_shared_experts, config.d_model, config.expert_width)
            if config.moge_shared_experts
            else None
        )
        self.last_stats: RoutingStats | None = None

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, domain_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        experts_per_group = self.num_experts // self.num_groups
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        top_prob, top_in_group = probs.view(tokens, self.num_groups, experts_per_group).topk(
            self.top_k_per_group, dim=-1
        )
        group_base = torch.arange(self.num_groups, device=x.device)[None, :, None] * experts_per_group
        expert_index = (top_in_group + group_base).reshape(-1)
        # No renormalisation over the selected experts: the learned scale takes its place.
        gate_weight = top_prob.reshape(-1) * self.expert_scale[expert_index]
        assignments_per_token = self.num_groups * self.top_k_per_group
        token_index = torch.arange(tokens, device=x.device).repeat_interleave(assignments_per_token)
        out = self.experts(flat, expert_index, token_index, gate_weight)
        if self.shared_experts is not None:
            for shared in range(self.shared_experts.num_experts):
                out = out + self.shared_experts.expert(shared, flat)

        load = expert_counts(expert_index, self.num_experts)
        # f_i is scaled so that a perfectly balanced router gives Σ f_i p_i = 1.
        fraction = load.float() * self.num_experts / (assignments_per_token * tokens)
        aux_loss = self.aux_loss_coef * (fraction.detach() * probs.mean(dim=0)).sum()
        self.last_stats = RoutingStats(load.detach(), tokens)
        return out.view_as(x), aux_loss

    def device_imbalance(self) -> float:
        """(max − min tokens per group/device) / tokens of the last forward: 0 by construction."""
        if self.last_stats is None:
            raise RuntimeError("no forward has run yet")
        return device_imbalance(self.last_stats.expert_load, self.num_groups, self.last_stats.tokens)


class LearnedTopKExperts(nn.Module):
    """Switch (k=1) / GShard (k=2) gating with a capacity limit; overflow tokens are dropped."""

    def __init__(self, config: PanguConfig, layer_index: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.k = config.topk_k
        self.capacity_factor = config.capacity_factor
        self.min_capacity = config.min_capacity
        self.aux_loss_coef = config.aux_loss_coef
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = ExpertBank(config.num_experts, config.d_model, config.expert_width)
        self.last_stats: RoutingStats | None = None

    def capacity(self, tokens: int) -> int:
        return max(self.min_capacity, math.ceil(self.capacity_factor * tokens * self.k / self.num_experts))

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, domain_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        top_prob, top_index = probs.topk(self.k, dim=-1)
        if self.k > 1:  # GShard renormalises over the chosen experts; Switch keeps the raw probability.
            top_prob = top_prob / top_prob.sum(dim=-1, keepdim=True)

        # Choice-major order: every token's first choice claims capacity before any second choice.
        expert_index = top_index.t().reshape(-1)
        gate_weight = top_prob.t().reshape(-1)
        token_index = torch.arange(tokens, device=x.device).repeat(self.k)
        # A scatter, not F.one_hot: identical values, and no value-range check that could sync.
        one_hot = torch.zeros(expert_index.numel(), self.num_experts, dtype=torch.long, device=x.device)
        one_hot.scatter_(1, expert_index[:, None], 1)
        slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        keep = slot < self.capacity(tokens)
        if expert_backend(flat, self.experts.expert_backend) == "grouped":
            # Sync-free: a dropped assignment keeps its place but points at expert E (computes nothing).
            expert_index = torch.where(keep, expert_index, self.num_experts)
            out = self.experts(flat, expert_index, token_index, gate_weight)
            load = expert_counts(expert_index, self.num_experts + 1)[: self.num_experts]
        else:
            out = self.experts(flat, expert_index[keep], token_index[keep], gate_weight[keep])
            load = expert_counts(expert_index[keep], self.num_experts)

        # Switch aux loss: α · E · Σ_i f_i P_i with f_i from the top-1 choice, P_i the mean probability.
        top1_fraction = expert_counts(top_index[:, 0], self.num_experts).float() / tokens
        aux_loss = self.aux_loss_coef * self.num_experts * (top1_fraction * probs.mean(dim=0)).sum()
        self.last_stats = RoutingStats(load.detach(), tokens, dropped_assignments=(~keep).sum().detach())
        return out.view_as(x), aux_loss


SPARSE_FFNS: dict[str, type[nn.Module]] = {
    "rre": RandomRoutedExperts,
    "moge": MixtureOfGroupedExperts,
    "topk": LearnedTopKExperts,
}


def build_ffn(config: PanguConfig, layer_index: int, expert_shard: tuple[int, int] | None = None,
              tp: "TensorParallel | None" = None) -> nn.Module:
    if config.is_sparse_layer(layer_index):
        # A sparse layer is never split by `tp`: its input is replicated over the tensor group (after the
        # attention's row-parallel all-reduce), so every rank of the group holds the same experts and computes
        # them on the same tokens; their gradients are then equal on every rank, as a LayerNorm's are.
        if expert_shard is not None:
            if config.router != "rre":
                raise ValueError("expert shards are implemented for RRE routing only")
            return RandomRoutedExperts(config, layer_index, expert_shard)
        return SPARSE_FFNS[config.router](config, layer_index)
    return DenseFFN(config.d_model, config.d_ff, tp)
