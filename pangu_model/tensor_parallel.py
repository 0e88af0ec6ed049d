"""Megatron-style tensor parallelism for PanGu-α and PanGu-Σ's dense part (SPEC §5.1: op-level slicing inside a
server).

A tensor-parallel group of `size` ranks (consecutive global ranks inside one node: pangu_model/topology.py)
splits every dense layer; all ranks of the group see the same rows:

* attention: query/key/value are column-parallel (each rank holds `num_heads / size` whole heads),
  the output projection is row-parallel (its partial products are summed by one all-reduce, then the
  bias is added);
* FFN: `fc_in` column-parallel, GeLU on the local columns, `fc_out` row-parallel;
* the word embedding is vocabulary-parallel (rank r holds rows [r·V/size, (r+1)·V/size)); the tied head
  multiplies by the local rows, so the logits stay split over the vocabulary and
  `vocab_parallel_cross_entropy` computes the loss without gathering them;
* LayerNorms, position and query-layer tables and the row-parallel biases are replicated: their
  gradients are equal on every rank of the group, since everything after them enters the parallel
  region through `copy_to_tensor_parallel_region` (identity forward, all-reduce backward);
* PanGu-Σ's routed experts (moe.py) are replicated too, for the same reason: their input (LN of the hidden
  state after the attention's all-reduce) is the same on every rank, RRE routes it by a fixed table, so each
  rank computes the same experts on the same tokens and gets their whole gradient.

Parameters of the split layers are plain local tensors with the dense model's names, marked
`tensor_model_parallel = True` (and `partition_dim`): DeepSpeed ZeRO 1/2 partitions them over the
data-parallel group it gets from `ModelParallelUnit` (`deepspeed.initialize(mpu=...)`) and, when it clips
gradients, counts marked parameters on every rank and replicated ones on tp rank 0, then sums the norm
over the tensor group. `shard_state_dict` cuts a dense state dict into one rank's part and
`gather_state_dict` joins the parts back, so the dense model's initialisation and exports hold whatever
the split.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """This rank's place in its tensor-parallel group: the group (None: the default group), rank, size."""

    group: Any
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside a group of {self.size}")

    def __deepcopy__(self, memo: dict) -> "TensorParallel":
        return self  # process groups are not copied (a module's deepcopy keeps the group it works in)

    @classmethod
    def of(cls, group: Any = None) -> "TensorParallel":
        """The context of `group` (None: the whole world) for the calling rank."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def part(self, total: int, what: str = "size") -> int:
        """`total / size`, or ValueError naming `what` when the split is not even."""
        if total % self.size:
            raise ValueError(f"tensor parallel {self.size} does not divide {what} {total}")
        return total // self.size

    @contextlib.contextmanager
    def local_rng(self, device: torch.device) -> Iterator[None]:
        """A random stream of this rank's own inside (Megatron's model-parallel RNG): for dropout on the
        attention probabilities of the local heads, which must differ between ranks while the rest of the
        model draws the same masks on every rank of the group. The stream is seeded from one draw of the
        common stream, so it is reproducible, and a recomputation under activation checkpointing (which
        restores the common stream first) draws the same masks."""
        seed = int(torch.randint(0, 2**62, (1,), device="cpu")) + self.rank
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()].manual_seed(seed)
            yield


def as_tensor_parallel(tp: TensorParallel | None) -> TensorParallel | None:
    """None for no tensor parallelism or a group of one (the dense model, unchanged)."""
    return tp if tp is not None and tp.size > 1 else None


# ---------------------------------------------------------------------------------------------
# Entering and leaving the parallel region (autograd)
# ---------------------------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient: each rank's use of a replicated input adds up."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward (partial sums → the full result on every rank); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.width = rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width).contiguous(), None


def copy_to_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _CopyToRegion.apply(x, tp.group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, tp.group)


def gather_from_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _GatherFromRegion.apply(x, tp.group)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def _mark(param: nn.Parameter | None, dim: int) -> None:
    """The attributes DeepSpeed (`is_model_parallel_parameter`) and Megatron read on a split parameter."""
    if param is not None:
        param.tensor_model_parallel = True
        param.partition_dim = dim
        param.partition_stride = 1


def mark_split(model: nn.Module, dims: dict[str, int]) -> None:
    """Mark the parameters named in `dims` (`split_dims` of the model) as split again: `load_state_dict(...,
    assign=True)` puts new Parameters in place, without the marks DeepSpeed reads."""
    for name, dim in dims.items():
        _mark(model.get_parameter(name), dim)


def split_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter is split along over the tensor group, None when it is replicated."""
    return getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None


class ColumnParallelLinear(nn.Linear):
    """`nn.Linear(in, out)` whose output features are split: rank r holds rows [r·out/size, (r+1)·out/size)
    of the weight and bias, and returns those output features (no gather). `copy_input=False` when the
    caller has already entered the region (attention enters once for q, k and v)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 copy_input: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, tp.part(out_features, "output features"), bias, device, dtype)
        self.tp = tp
        self.copy_input = copy_input
        _mark(self.weight, 0)
        _mark(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tensor_parallel_region(x, self.tp)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """`nn.Linear(in, out)` whose input features are split: rank r holds columns [r·in/size, (r+1)·in/size)
    of the weight, takes the matching slice of the input (a column-parallel layer's output) and all-reduces
    the partial products; the bias is replicated and added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(tp.part(in_features, "input features"), out_features, bias, device, dtype)
        self.tp = tp
        _mark(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """`nn.Embedding(V, d)` split over the vocabulary: rank r holds rows [vocab_start, vocab_start + V/size);
    ids outside them look up zeros, and one all-reduce sums the ranks' lookups."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel,
                 device: Any = None, dtype: Any = None) -> None:
        local = tp.part(num_embeddings, "the vocabulary")
        super().__init__(local, embedding_dim, device=device, dtype=dtype)
        self.tp = tp
        self.vocab_start = tp.rank * local
        _mark(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.num_embeddings)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_parallel_region(out, self.tp)


# ---------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary-split logits
# ---------------------------------------------------------------------------------------------
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row −log softmax(logits)[target] where each rank holds the columns [start, start + V/size)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: Any) -> torch.Tensor:
        width = logits.shape[-1]
        start = dist.get_rank(group) * width
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top[:, None]
        outside = (target < start) | (target >= start + width)
        local = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        both = torch.stack([picked, total])  # one all-reduce for the two sums
        dist.all_reduce(both, group=group)
        picked, total = both[0], both[1]
        softmax = exp.div_(total[:, None])
        ctx.save_for_backward(softmax, local, outside)
        return total.log() - picked

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, outside = ctx.saved_tensors
        out = softmax.clone()
        rows = torch.arange(out.shape[0], device=out.device)
        out[rows, local] -= (~outside).to(out.dtype)
        return out.mul_(grad[:, None]), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp: TensorParallel,
                                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(full_logits, target, ignore_index=...)` from this rank's vocabulary columns
    `logits` [N, V/size] (fp32 in, as the dense path casts them); `reduction` "mean" (over the rows not
    ignored) or "none" (per row, 0 where ignored). Collective over the tensor group."""
    ignored = target == ignore_index
    losses = _VocabParallelCrossEntropy.apply(logits, target.masked_fill(ignored, -1), tp.group)
    losses = losses.masked_fill(ignored, 0.0)
    if reduction == "none":
        return losses
    if reduction != "mean":
        raise ValueError(f"reduction {reduction!r}: 'mean' or 'none'")
    return losses.sum() / (~ignored).sum()


# ---------------------------------------------------------------------------------------------
# State dicts: dense ↔ one rank's part
# ---------------------------------------------------------------------------------------------
def split_dims(model: nn.Module) -> dict[str, int]:
    """State-dict name → split dimension of every split parameter of `model` (a tensor-parallel model)."""
    return {name: dim for name, param in model.named_parameters() if (dim := split_dim(param)) is not None}


def shard_state_dict(state: dict[str, torch.Tensor], dims: dict[str, int], tp: TensorParallel
                     ) -> dict[str, torch.Tensor]:
    """This rank's part of a dense state dict: split tensors cut along their dimension, the rest as is."""
    out = {}
    for name, tensor in state.items():
        dim = dims.get(name)
        if dim is None:
            out[name] = tensor
        else:
            width = tp.part(tensor.shape[dim], name)
            out[name] = tensor.narrow(dim, tp.rank * width, width).clone()
    return out


def gather_state_dict(state: dict[str, torch.Tensor], dims: dict[str, int], tp: TensorParallel
                      ) -> dict[str, torch.Tensor]:
    """The dense state dict from every rank's part (`shard_state_dict` undone). Collective over the tensor
    group: every rank gets the whole of each split tensor (for tests and small models)."""
    out = dict(state)
    for name in sorted(dims):
        part = state[name].contiguous()
        parts = [torch.empty_like(part) for _ in range(tp.size)]
        dist.all_gather(parts, part, group=tp.group)
        out[name] = torch.cat(parts, dim=dims[name])
    return out


def row_blocks(state: dict[str, torch.Tensor], dims: dict[str, int], tp: TensorParallel
               ) -> list[tuple[str, torch.Tensor, int]]:
    """This rank's block of rows of every split tensor, as (name, rows, first row) pieces of the dense
    tensor: a row split is the rank's own part; a column split is turned into rows by one all-to-all over
    the tensor group (each rank sends row block j of its columns to rank j), so no rank holds a whole
    tensor. Collective over the tensor group; ranks write their pieces into one file (the export)."""
    pieces = []
    for name in sorted(dims):
        part = state[name]
        if dims[name] == 0:
            pieces.append((name, part, tp.rank * part.shape[0]))
            continue
        rows = tp.part(part.shape[0], f"rows of {name}")
        send = part.reshape(tp.size, rows, part.shape[1]).contiguous()  # row block j goes to rank j
        receive = torch.empty_like(send)  # from rank i: my row block of rank i's columns
        dist.all_to_all_single(receive, send, group=tp.group)
        pieces.append((name, receive.permute(1, 0, 2).reshape(rows, -1), tp.rank * rows))
    return pieces


# ---------------------------------------------------------------------------------------------
# DeepSpeed's view of the layout
# ---------------------------------------------------------------------------------------------
class ModelParallelUnit:
    """The `mpu` that `deepspeed.initialize` takes: the tensor group ("model parallel" in DeepSpeed's
    words; no pipeline) and the data-parallel group that ZeRO partitions over, reduces gradients in and
    names its checkpoint files after (`mp_rank_XX_model_states.pt`, `zero_pp_rank_D_mp_rank_XX_…`)."""

    def __init__(self, tp: TensorParallel, data_group: Any, data_ranks: list[int]) -> None:
        self.tp = tp
        self.data_group = data_group
        self.data_ranks = list(data_ranks)

    def get_model_parallel_rank(self) -> int:
        return self.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp.size

    def get_model_parallel_group(self) -> Any:
        return self.tp.group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data_group)

    def get_data_parallel_group(self) -> Any:
        return self.data_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.data_ranks)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


__all__ = [
    "ColumnParallelLinear",
    "ModelParallelUnit",
    "RowParallelLinear",
    "TensorParallel",
    "VocabParallelEmbedding",
    "as_tensor_parallel",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "gather_state_dict",
    "reduce_from_tensor_parallel_region",
    "row_blocks",
    "mark_split",
    "shard_state_dict",
    "split_dim",
    "split_dims",
    "vocab_parallel_cross_entropy",
]
