"""ECSS (Expert Computation and Storage Separation, PanGu-Σ, SPEC §5.2) on top of DeepSpeed's pieces.

DeepSpeed's `offload_optimizer` is engine-wide; there is no switch that offloads only the experts. So the
placement is ours:

* every Random-Routed-Experts layer's `ExpertBank` is replaced by a `HostExpertBank`: the fp32 master
  weights of all its experts live in host memory (pinned when CUDA exists, so the per-step copies are
  asynchronous DMA), next to their Adam states;
* RRE routing depends only on the domain id and the token id, so the experts a step needs are known
  from the batch *before* the forward pass (`ExpertOffload.plan`); only those are copied to the
  device (`fetch`), in the compute dtype, as one compact tensor per weight;
* only their gradients go back to the host, layer by layer during the step's last backward ("Gradients
  back" below), and ZeRO-Offload's CPU Adam kernel (`host_adam.HostAdam`) updates only those experts (`step`); an
  expert that no batch routes to is untouched, its Adam state included (per-expert step counts keep the
  bias correction right: "lazy" Adam);
* the dense part never sees any of this: it is an ordinary module under the DeepSpeed engine (ZeRO).

The expert tensors are not `nn.Parameter`s of the model, so DeepSpeed neither flattens, partitions,
casts nor reduces them, and they are not in the module's `state_dict()` either: `ExpertOffload` saves
the masters with their Adam states (`state_dict`, one file per expert shard) and hands the export the
full `ExpertBank` tensors (`expert_state`).

Expert parallelism (ep > 1): an expert-parallel group of `ep` ranks shares one copy of the experts,
each rank holding a contiguous shard of `num_experts / ep` (the layout of DeepSpeed's MoE layer, domain
by domain) in its host memory. Tokens travel to the rank that owns their expert and back with an
all-to-all of uneven splits (`_AllToAll`: RRE is dropless, so there is no capacity to pad to). The
ranks that hold the same shard in different expert-parallel groups (the expert-data-parallel group)
average their expert gradients; the gradient norm for clipping is summed over the shards.

Host state sharded like ZeRO (`shard_states`, TrainConfig `ecss_shard_states`): the R ranks that hold the
same expert shard (the replica group) split each layer's shard into R contiguous blocks (`shard_size / R`
experts, one more for some when R does not divide it); a rank keeps the fp32 masters and Adam states of
its own block only (its host bytes: about total / (ep × R)).
Each rank then fetches only the experts that its own expert-parallel group's rows route to in its shard
(its micro-batches' and, after the token exchange, its group peers'), never the union over the world:
1. the ranks of a replica group all-gather their active masks (one bit per expert of the shard);
2. each owner copies the union of what its replicas asked of its block host→device once, and one
   all-to-all over the replica group gives every rank exactly its rows (compute dtype, compute device),
   asynchronously: the layers below the first expert layer compute meanwhile, and that layer's forward
   waits for the rows;
3. in the step's last backward, layer by layer, an all-to-all takes each rank's gradients (in the compute
   dtype, as autograd made them) to their owners, which sum them per expert in fp32 and copy the sums to
   the host; each owner clips with the global norm (squares summed over owners and shards, every element
   once) and steps on the CPU the experts any of its replicas used.
Checkpoints and the export hold each owner's block once. `traffic` counts the bytes each rank moves
host→device, receives into its device copies and sends back to the host.

Gradients back (`last_micro_batch`, `step`): the trainer announces the step's last backward. A hook on
each layer's input then tells when that backward has gone through the layer; by then a post-accumulate-grad
hook on every fetched weight has told that the weights hold the step's gradient (the sum over its
micro-batches: earlier backward passes only accumulate). The layer's return starts at once, while the
backward of the layers below it still runs:
1. its collective, asynchronous, over the replica group: none without replicas; with replicas and
   unsharded host state an all-reduce of the gradients in fp32 (every replica steps the whole shard with
   the sum, which stays as exact as it was, at 4 B a parameter on the network); with sharded host state the
   all-to-all of step 3 above, in the compute dtype (p B), the owner summing in fp32 on its device;
2. behind it on the copy stream (the host does not wait), the layer's sum of squares (a device scalar, for
   the norm) and the copy device→host into a pinned landing buffer, preallocated and reused: the gradients
   themselves in the compute dtype where no replica adds to them (p B a parameter, widened to fp32 on the
   host: exact), the fp32 sums otherwise (an owner's 4 B per expert row it steps are no more than the p B
   rows it received as soon as its experts are asked twice on average, and it needs no host pass to add).
On CPU the copies are synchronous, and one behind a gloo collective waits for `step` (waiting in the hook
could block on a rank that issues it only there). `step` sends what has not gone, waits for all of it,
takes the global norm from the layers' squares (all-reduced over owners and shards), and the host update
unscales, averages and clips the gradients in one multiply, one pass over host memory: fp32 sums where they
landed, compute-dtype gradients widened into an fp32 copy by the same multiply; the host optimizer reads the
result. (Before, all of it ran after backward, from one fp32 concatenation: the norm and the clip now differ
from those in rounding only.)
Every rank issues the layers' collectives in one fixed order, the top layer first, each as the backward
leaves its layer: the same place in the backward on every rank, whether the rank computed many rows of the
layer or none. So the returns meet the backward's other collectives (the expert-parallel all-to-alls,
DeepSpeed's bucketed reductions of the dense gradients) in one order on all ranks, which NCCL needs: its
collective is a kernel that waits on the GPU for its peers, and two ranks that issue two groups' collectives
in opposite orders can wait on each other for good (a device-wide synchronization, such as the caching
allocator's cudaFree, is enough).
(A rank that computed no rows of a layer used to send it before its backward began, ahead of DeepSpeed's
reductions that its replicas issued first; tests/collective_guard.py checks the order on CPU.) The returns
use a group on which nothing else runs meanwhile: the replica group is ECSS's own with expert parallelism;
without it, it is the world, over which DeepSpeed reduces the dense gradients, and a twin of it is made (with
tensor parallelism the trainer passes new groups inside one tensor rank: pangu_model/train.py `_ecss_groups`).

Delayed host update (`delayed_update`, TrainConfig `ecss_delayed_update`; ZeRO-Offload's "delayed
parameter update"): the host optimizer of step s runs on a worker thread while step s + 1 computes, so
CPU Adam leaves the critical path. Step s + 1 fetches the shadows as they were before update s (the
worker writes only masters and Adam states); at the end of step s + 1 the worker is joined and update
s's rows are copied into the shadows, before update s + 1 starts. The worker also makes the gradients'
multiply (step s's `step` only takes their norm), reading step s's landing buffer while step s + 1 lands
its gradients in a second one: the two alternate, so the training thread makes no pass over host memory.
DeepSpeed's binding of its CPU Adam kernel keeps the GIL for each tensor it updates, so the kernel is called
through a binding that releases it (`host_adam.HostAdam`): the training thread runs beside it.
So the weights a step computes with carry every update up to two steps back: step t uses the masters
after update t − 2 (tested). A checkpoint waits for the update in flight and saves, beside the masters,
the lagging shadows of its rows, so a resume continues exactly; the export waits too and holds every
update.
A warm-up (`delay_after`, TrainConfig `ecss_delayed_update_after`) runs the host updates of the first
steps in line, as ZeRO-Offload does: early gradients change fast, and a stale update costs most there.
The update of step `delay_after` + 1 is the first that runs beside the next step: steps up to
`delay_after` + 1 compute with every update before them, later steps t with the masters after update t − 2.

Deviations (documented, not hidden): expert gradients are clipped by their own global norm (DeepSpeed
clips the dense part by its norm before we could add ours). Without sharded host state every replica
of a shard keeps and steps the whole shard, so the replicas must agree on what they update: their
routed sets are united over the data-parallel ranks, and each fetches that union.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .moe import EXPERT_WEIGHTS, ExpertBank, RandomRoutedExperts, grouped_experts
from .optim import OptimConfig
from .pinned import exact_pinned_blocks

WEIGHT_NAMES = tuple(EXPERT_WEIGHTS)
RECORD_STEPS = False  # tests: ExpertOffload.steps_log keeps each step's routed and fetched experts
_DECAYED = ("w_in", "w_out")  # biases take no weight decay (optim.decays)


class _AllToAll(torch.autograd.Function):
    """All-to-all of rows with uneven splits; its gradient is the all-to-all back with the splits swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


def copy_rows(source: torch.Tensor, rows: list[int], target: torch.Tensor, non_blocking: bool = False) -> None:
    """target[i] = source[rows[i]], one copy per run of consecutive rows: each is a contiguous slice of
    the (pinned) source, so it crosses the link as one DMA and needs no pageable gather first."""
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        target[i:j].copy_(source[rows[i]:rows[j - 1] + 1], non_blocking=non_blocking)
        i = j


def _on(stream: Any):
    """`torch.cuda.stream(stream)`, or nothing on CPU (the copies are then synchronous)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _group_size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def block_bounds(shard_size: int, replicas: int) -> list[int]:
    """Block k of a shard is its experts [bounds[k], bounds[k + 1]): blocks differ by at most one expert
    when the replicas do not divide the shard (sigma-1t: 80 experts over 64 nodes)."""
    return [k * shard_size // replicas for k in range(replicas + 1)]


def owned_block(replica_rank: int, ep_rank: int, replicas: int) -> int:
    """The block that replica `replica_rank` of expert shard `ep_rank` owns. Rotated by the shard, so that
    the ranks of one node (one replica index, every shard) own consecutive blocks: with uneven blocks
    every node then owns the same number of experts (sigma-1t: 10 per layer on each node) rather than
    some nodes 2 on every rank and the others 1, and the busiest node's host memory and DRAM traffic
    shrink with it."""
    return (replica_rank + ep_rank) % replicas


def keep_block(bank: ExpertBank, block: int, replicas: int) -> None:
    """Cut a freshly built expert shard down to its block `block` of `replicas`, in place, so that
    start-up holds one layer's shard at a time rather than every layer's (`build_model`)."""
    bounds = block_bounds(bank.num_experts, replicas)
    start, stop = bounds[block], bounds[block + 1]
    for name in WEIGHT_NAMES:
        rows = getattr(bank, name).detach()[start:stop].clone()
        setattr(bank, name, nn.Parameter(rows, requires_grad=getattr(bank, name).requires_grad))
    bank.first_expert += start
    bank.num_experts = stop - start


def default_host_threads() -> int:
    """This rank's share of the cores it may run on: the node's cores over its local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


class HostExpertBank(nn.Module):
    """Drop-in for `ExpertBank`: host-resident masters of this rank's shard of the experts, and a compact
    device copy of the fetched ones. With an expert-parallel group, tokens go to their expert's owner."""

    def __init__(self, bank: ExpertBank, pin: bool, ep_group: Any = None, total_experts: int | None = None,
                 replica_group: Any = None) -> None:
        """`bank`: the layer's whole bank, or already this rank's shard of `total_experts`. With a
        `replica_group` of R > 1 ranks (sharded host state), this rank keeps only its block of
        `shard_size / R` experts of the shard (`owned_first`, `owned_size`)."""
        super().__init__()
        self.num_experts = total_experts or bank.num_experts
        self.pinned = pin
        self.ep_group = ep_group
        self.ep_size = _group_size(ep_group)
        if self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not split over {self.ep_size} expert-parallel ranks")
        self.ep_rank = dist.get_rank(ep_group) if self.ep_size > 1 else 0
        self.shard_size = self.num_experts // self.ep_size
        self.first = self.ep_rank * self.shard_size  # experts [first, first + shard_size) live here
        self.replica_group = replica_group
        self.replicas = _group_size(replica_group)
        if self.shard_size < self.replicas:
            raise ValueError(f"ECSS sharded host state: a shard of {self.shard_size} experts per layer cannot give "
                             f"each of its {self.replicas} replicas an expert to own (use fewer replicas or "
                             f"ecss_shard_states: false)")
        self.replica_rank = dist.get_rank(replica_group) if self.replicas > 1 else 0
        self.bounds = block_bounds(self.shard_size, self.replicas)
        self.block = owned_block(self.replica_rank, self.ep_rank, self.replicas)
        self.owned_size = self.bounds[self.block + 1] - self.bounds[self.block]
        # masters and Adam states of experts [owned_first, owned_first + owned_size) live here
        self.owned_first = self.first + self.bounds[self.block]
        self.host: dict[str, torch.Tensor] = {}
        if bank.num_experts == self.num_experts:
            rows = slice(self.owned_first, self.owned_first + self.owned_size)
        elif (bank.first_expert, bank.num_experts) == (self.first, self.shard_size):
            rows = slice(self.owned_first - self.first, self.owned_first - self.first + self.owned_size)
        elif (bank.first_expert, bank.num_experts) == (self.owned_first, self.owned_size):
            rows = slice(0, self.owned_size)  # built as this rank's block already (`keep_block`)
        else:
            raise ValueError(f"bank holds experts {bank.first_expert}..{bank.first_expert + bank.num_experts - 1}, "
                             f"expert-parallel rank {self.ep_rank} needs {self.first}..{self.first + self.shard_size - 1}")
        for name in WEIGHT_NAMES:
            source = getattr(bank, name).detach()[rows]
            master = torch.empty(source.shape, dtype=torch.float32, pin_memory=pin)
            master.copy_(source)
            self.host[name] = master
        # One optimizer "parameter" per expert and weight: a view into the master, so the Adam update
        # writes the master in place and state['step'] counts that expert's own updates.
        self.expert_params: dict[str, list[torch.Tensor]] = {
            name: [nn.Parameter(self.host[name][e], requires_grad=False) for e in range(self.owned_size)]
            for name in WEIGHT_NAMES
        }
        self.active = torch.zeros(0, dtype=torch.long)  # fetched experts, global ids
        self.device_weights: dict[str, torch.Tensor] = {}
        self._slot_of: torch.Tensor | None = None
        self.shadow: dict[str, torch.Tensor] = self.host  # until make_shadows(compute dtype)
        self.ready: Any = None  # CUDA event: this bank's fetched weights have arrived
        self.arrive: Any = None  # sharded host state: completes the owners' exchange (ExpertOffload)
        self.on_backward: Callable[[], None] | None = None  # backward has passed this layer (ExpertOffload)
        self.rows_computed = 0  # expert rows the last forward computed on this rank (a shape: no sync)

    # ---- placement ---------------------------------------------------------------------------
    def select(self, experts: torch.Tensor, device: torch.device) -> None:
        """Sharded host state: the experts of this shard among `experts` become the active slots; their
        weights are set by `ExpertOffload` (gathered from their owners)."""
        experts = experts.to("cpu", torch.long)
        self.active = experts[(experts >= self.first) & (experts < self.first + self.shard_size)]
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot_of[self.active] = torch.arange(len(self.active))
        self._slot_of = slot_of.to(device)

    def block_of(self, replica: int) -> int:
        """The block that `replica` of this shard owns."""
        return owned_block(replica, self.ep_rank, self.replicas)

    def make_shadows(self, dtype: torch.dtype, copy: bool = False) -> None:
        """Host copies of the owned masters in the compute dtype (pinned on CUDA), the source of every
        host→device copy: `p` bytes per parameter cross the link instead of fp32's 4, and a pinned source
        lets the copy run as DMA beside compute. The masters themselves when the compute dtype is fp32,
        unless `copy` (a delayed host update writes the masters while the shadows are read)."""
        if dtype == torch.float32 and not copy:
            self.shadow = self.host
            return
        self.shadow = {}
        for name, master in self.host.items():
            shadow = torch.empty(master.shape, dtype=dtype, pin_memory=self.pinned)
            shadow.copy_(master)
            self.shadow[name] = shadow

    def refresh_shadows(self, rows: list[int]) -> None:
        """After the host optimizer stepped these owned rows: their shadows follow the masters."""
        if self.shadow is self.host or not rows:
            return
        index = torch.tensor(rows)
        for name, master in self.host.items():
            self.shadow[name].index_copy_(0, index, master.index_select(0, index).to(self.shadow[name].dtype))

    def device_slots(self, count: int, device: torch.device) -> dict[str, torch.Tensor]:
        """`count` rows of the preallocated device pool per weight (grown when a step needs more): the
        fetched experts are copied into them, so no step allocates its expert weights anew."""
        pool = getattr(self, "_pool", {})
        if not pool or next(iter(pool.values())).shape[0] < count:
            capacity = max(count, 1)
            pool = {name: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=device)
                    for name, t in self.shadow.items()}
            self._pool = pool
        return {name: t[:count] for name, t in pool.items()}

    def fetch(self, experts: torch.Tensor, device: torch.device, copy_stream: Any = None) -> None:
        """Copy the experts of this shard among `experts` (sorted global ids) from the pinned shadows into
        the device pool, run by run of consecutive rows, on `copy_stream` when given (CUDA: the layer's
        forward waits for its own copies only, so later layers' copies overlap earlier layers' compute)."""
        experts = experts.to("cpu", torch.long)
        experts = experts[(experts >= self.first) & (experts < self.first + self.shard_size)]
        self.active = experts
        local = (experts - self.owned_first).tolist()
        slots = self.device_slots(len(local), device)
        with _on(copy_stream):
            for name, source in self.shadow.items():
                copy_rows(source, local, slots[name], non_blocking=self.pinned)
            self.ready = copy_stream.record_event() if copy_stream is not None else None
        self.device_weights = {name: t.detach().requires_grad_(True) for name, t in slots.items()}
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot_of[experts] = torch.arange(len(experts))
        self._slot_of = slot_of.to(device)

    def release(self) -> None:
        self.device_weights = {}
        self._slot_of = None
        self.ready = None
        self.arrive = None
        self.active = torch.zeros(0, dtype=torch.long)

    def gradients(self) -> dict[str, torch.Tensor]:
        """The fetched experts' gradients; zeros where no token reached this shard (replicas of a shard
        must reduce tensors of the same shape)."""
        return {name: w.grad if w.grad is not None else torch.zeros_like(w)
                for name, w in self.device_weights.items()}

    # ---- compute (the ExpertBank algorithm over slots) -------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        token_index: torch.Tensor,
        gate_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._slot_of is None:
            raise RuntimeError("ECSS: forward before fetch(); call ExpertOffload.fetch(plan) for this batch")
        if self.arrive is not None:  # sharded host state: the rows from the owners, once
            self.arrive()
        if self.ready is not None:  # this layer's copies, not the later layers' still in flight
            torch.cuda.current_stream(x.device).wait_event(self.ready)
        if self.on_backward is not None and x.requires_grad and torch.is_grad_enabled():
            # x's gradient is complete once backward has gone through the whole layer, the expert-parallel
            # all-to-all included: the same place in the graph on every rank, however many rows it computed.
            x.register_hook(self._passed)
        if self.ep_size > 1:
            return self._forward_expert_parallel(x, expert_index, token_index, gate_weight)
        return self._compute(x, expert_index, token_index, gate_weight)

    def _compute(
        self, x: torch.Tensor, expert_index: torch.Tensor, token_index: torch.Tensor,
        gate_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        slots = self._slot_of[expert_index]
        self.rows_computed = token_index.numel()
        if slots.is_cuda:  # checked on the device: a host check would wait for the GPU in every layer
            torch._assert_async((slots >= 0).all(), "ECSS: an expert was routed to but not fetched")
        elif bool((slots < 0).any()):
            missing = sorted(set(expert_index[slots < 0].tolist()))
            raise RuntimeError(f"ECSS: experts {missing[:8]} were routed to but not fetched")
        w = self.device_weights
        # Slots are in ascending expert order, so the sort and the index_add order match ExpertBank's
        # and the numbers are the same as without ECSS.
        return grouped_experts(x, slots, token_index, gate_weight, len(self.active),
                               w["w_in"], w["b_in"], w["w_out"], w["b_out"])

    def _passed(self, _: torch.Tensor) -> None:
        if self.on_backward is not None:
            self.on_backward()

    def _forward_expert_parallel(
        self, x: torch.Tensor, expert_index: torch.Tensor, token_index: torch.Tensor,
        gate_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """Send each assignment's row to its expert's owner, compute there, bring the result back."""
        owner = torch.div(expert_index, self.shard_size, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.ep_size)
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts, group=self.ep_group)
        send, receive = send_counts.tolist(), receive_counts.tolist()
        received_experts = expert_index.new_empty(sum(receive))
        dist.all_to_all_single(received_experts, expert_index[order].contiguous(), receive, send,
                               group=self.ep_group)
        received = _AllToAll.apply(x[token_index[order]], send, receive, self.ep_group)
        rows = torch.arange(received.shape[0], device=x.device)
        computed = self._compute(received, received_experts, rows, None)
        if received.requires_grad and not computed.requires_grad:
            # Nothing reached this shard: keep both all-to-alls in the graph anyway, because their
            # backward passes are collectives that the other ranks of the group will enter.
            computed = computed + received * 0
        routed = _AllToAll.apply(computed, receive, send, self.ep_group)
        if gate_weight is not None:
            routed = routed * gate_weight[order, None].to(routed.dtype)
        return torch.zeros_like(x).index_add(0, token_index[order], routed)

    # ---- the masters are not module state ------------------------------------------------------
    # A rank holds one shard, so the module state of any single rank is not the model's: ExpertOffload
    # checkpoints the masters per shard and gathers them for the export instead.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        return None


class _Landed(NamedTuple):
    """One step's gradients on the host, for its update: the landing buffer's first `total` elements, the
    factor that unscales, averages and clips them, and (layer, offset, owned rows) of each layer's part."""

    buffer: torch.Tensor
    total: int
    factor: float
    layers: list[tuple[str, int, list[int]]]


class _Return:
    """One layer's expert gradients on their way back to the host in the current step."""

    def __init__(self, offset: int, size: int, experts: list[int]) -> None:
        self.offset, self.size = offset, size  # its slice of the landing buffer (elements)
        self.experts = experts  # the owned rows (expert_params indices) it brings, in landing order
        self.passed = False  # the last backward has gone through the layer (its input's gradient is complete)
        self.landed = 0  # weights whose gradient of the last backward has accumulated
        self.ready = False  # may be sent: passed, and every weight that computed rows holds its gradient
        self.before_step = False  # sent from the last backward's hooks (not left for step())
        self.work: Any = None  # its collective in flight
        self.finish: Callable[[], None] | None = None  # gloo: its copy, after the collective, in step()
        self.square: torch.Tensor | None = None  # sum of squares of what it returns, on the device
        self.done: Any = None  # CUDA event: its device→host copy has landed
        self.keep: list[torch.Tensor] = []  # CPU: device tensors its collective and copy read, until step()


class ExpertOffload:
    """Host placement and host update of every RRE layer's experts of one model (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        group: Any = None,
        pin: bool | None = None,
        ep_group: Any = None,
        replica_group: Any = None,
        shard_states: bool = False,
        host_threads: int | None = None,
        delayed_update: bool = False,
        delay_after: int = 0,
    ) -> None:
        """`group`: all data-parallel ranks (routed sets are united over it; gradients are averaged
        over its size). `ep_group`: the ranks that share one copy of the experts, a shard each.
        `replica_group`: the ranks holding the same shard; by default `group` when there is no
        expert parallelism. `shard_states`: each replica keeps only its block of the shard's masters
        and Adam states (module docstring); a no-op with one replica. `host_threads`: CPU threads of
        the host optimizer (default: this rank's share of the node's cores, `default_host_threads`).
        `delayed_update`: the host update runs beside the next step, from the step after the first
        `delay_after` steps (module docstring)."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.group = group
        self.ep_group = ep_group if _group_size(ep_group) > 1 else None
        self.replica_group = replica_group if (replica_group is not None or self.ep_group is not None) else group
        self.sharded = bool(shard_states) and _group_size(self.replica_group) > 1
        self.replicas = _group_size(self.replica_group) if self.sharded else 1
        self.optim = optim
        self.pin = torch.cuda.is_available() if pin is None else pin
        if self.pin:
            exact_pinned_blocks()  # no power-of-two rounding of the host state (pinned.py)
        self.layers: dict[str, RandomRoutedExperts] = {}
        self.banks: dict[str, HostExpertBank] = {}
        for name, module in model.named_modules():
            if isinstance(module, RandomRoutedExperts):
                if not isinstance(module.experts, ExpertBank):
                    raise TypeError(f"{name}: experts are {type(module.experts).__name__}, not an ExpertBank")
                bank = HostExpertBank(module.experts, self.pin, self.ep_group, module.total_experts,
                                      self.replica_group if self.sharded else None)
                module.experts = bank  # the device ExpertBank is dropped here: its memory is freed
                self.layers[name] = module
                self.banks[name] = bank
        if not self.layers:
            raise ValueError("ECSS needs Random Routed Experts layers (router 'rre'); this model has none")
        # One step behind, the host update writes the masters while the next step fetches: the shadows
        # must then be copies even under fp32.
        self.delayed_update = delayed_update
        if delay_after < 0:
            raise ValueError(f"delay_after must be >= 0, not {delay_after}")
        self.delay_after = delay_after
        self._delay_this_update = delayed_update
        self._worker: threading.Thread | None = None
        self._updated = threading.Event()  # the update in flight has reached the masters
        self._failure: BaseException | None = None
        self._fetched: queue.SimpleQueue = queue.SimpleQueue()  # the next step's fetch has read the shadows
        self._pending_rows: dict[str, list[int]] = {}  # owned rows whose shadows wait for their update
        for bank in self.banks.values():
            bank.make_shadows(dtype, copy=delayed_update)
        # Host→device copies run on their own stream (CUDA), so they overlap compute.
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # The host Adam kernel runs on torch's OpenMP threads: torchrun starts every rank with
        # OMP_NUM_THREADS=1, which would leave the host update on one core per rank.
        self.host_threads = host_threads or default_host_threads()
        torch.set_num_threads(self.host_threads)
        decay = [p for bank in self.banks.values() for n in _DECAYED for p in bank.expert_params[n]]
        no_decay = [p for bank in self.banks.values() for n in WEIGHT_NAMES if n not in _DECAYED
                    for p in bank.expert_params[n]]
        from .host_adam import HostAdam  # DeepSpeed's CPU Adam kernel, the GIL released while it runs

        self.optimizer = HostAdam(
            [
                {"params": decay, "weight_decay": optim.weight_decay, "eps": optim.expert_eps},
                {"params": no_decay, "weight_decay": 0.0, "eps": optim.expert_eps},
            ],
            lr=optim.lr, betas=tuple(optim.betas), eps=optim.expert_eps, adamw_mode=True,
        )
        self.last_fetched: dict[str, list[int]] = {}
        # Bytes moved, cumulative: host→device by this rank, received into its device expert copies,
        # and gradients device→host as they cross (its own in the compute dtype; fp32 sums with replicas:
        # with sharded host state the owner's).
        self.traffic = {"host_to_device": 0, "device_received": 0, "device_to_host": 0}
        self._exchange: tuple | None = None  # the fetch's all-to-all in flight (sharded host state)
        self.steps_log: list[dict[str, Any]] = []  # per step, when RECORD_STEPS (tests)
        # Gradients back (module docstring). Their collectives are issued from the hooks of the backward
        # pass on one rank and from step() on another, so they need a group on which nothing else runs
        # meanwhile: the replica group is ECSS's own with expert parallelism, but without it is the world,
        # over which DeepSpeed reduces the dense gradients; it then gets a twin (every rank builds
        # ExpertOffload, so every rank makes the group, as new_group requires).
        self._grad_group = self.replica_group
        if dist.is_initialized() and 1 < _group_size(self.replica_group) == dist.get_world_size():
            self._grad_group = dist.new_group(list(range(dist.get_world_size())))
        # What lands on the host: the gradients themselves, in the compute dtype, where no replica adds to
        # them; fp32 sums otherwise (replicas all-reduce in fp32; owners sum what they receive in fp32).
        plain = not self.sharded and _group_size(self.replica_group) == 1
        self._return_dtype = dtype if plain else torch.float32
        self._landing: torch.Tensor | None = None  # pinned on CUDA; reused step after step
        # A delayed update reads its step's landing buffer on the worker while the next step lands its own
        # gradients: the two alternate.
        self._spare_landing: torch.Tensor | None = None
        self._returns: dict[str, _Return] | None = None  # this step's, once its last backward is announced
        self._order: list[str] = list(reversed(self.banks))  # the order backward reaches the layers
        self._next = 0  # self._order[:_next] are on their way
        for layer, bank in self.banks.items():
            bank.on_backward = self._passed_hook(layer)

    # ---- per step -----------------------------------------------------------------------------
    def plan(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Layer → sorted expert ids that the micro-batches of one step route to, united over the ranks
        whose tokens this rank's experts compute: the expert-parallel group with sharded host state,
        every data-parallel rank without it (module docstring)."""
        batches = list(batches)
        masks = []
        for layer in self.layers.values():
            mask = torch.zeros(layer.experts.num_experts, dtype=torch.bool, device=self.device)
            for batch in batches:
                ids = layer.route(batch["input_ids"].to(self.device), batch["domain_ids"].to(self.device))
                mask[ids.reshape(-1)] = True
            masks.append(mask)
        stacked = torch.stack(masks).to(torch.int32)
        if RECORD_STEPS:
            self.steps_log.append({"routed_here": {n: r.nonzero().flatten().tolist()
                                                   for n, r in zip(self.layers, stacked)}})
        union = self.ep_group if self.sharded else self.group
        if union is not None and dist.is_initialized() and dist.get_world_size(union) > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=union)
        return {name: row.nonzero().flatten().cpu() for name, row in zip(self.layers, stacked)}

    def fetch(self, plan: dict[str, torch.Tensor], training: bool = True) -> None:
        """Bring the experts of `plan` to the device. `training`: the step's fetch (a validation fetch is
        not), after which a delayed update in flight may refresh its shadows."""
        if self.sharded:
            self._fetch_from_owners(plan)
        else:
            if self.copy_stream is not None:  # the pool is overwritten only after the last step used it
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            for name, bank in self.banks.items():
                bank.fetch(plan[name], self.device, self.copy_stream)
                self._watch(name, bank)
                moved = len(bank.active) * self._row_bytes(bank, self.dtype)
                self.traffic["host_to_device"] += moved
                self.traffic["device_received"] += moved
        self.last_fetched = {name: bank.active.tolist() for name, bank in self.banks.items()}
        if training and self._worker is not None:
            # The shadows have been read (or are being read by the copies this event closes): the update
            # in flight may now bring its rows' shadows up to date.
            done = self.copy_stream.record_event() if self.copy_stream is not None else None
            self._fetched.put(done)
        if RECORD_STEPS and self.steps_log:  # the entry plan() opened for this step
            self.steps_log[-1].update(fetched=self.last_fetched, traffic=dict(self.traffic))

    def _row_sizes(self, bank: HostExpertBank) -> list[int]:
        return [bank.host[name][0].numel() for name in WEIGHT_NAMES]

    def _row_bytes(self, bank: HostExpertBank, dtype: torch.dtype) -> int:
        return sum(self._row_sizes(bank)) * dtype.itemsize

    def _exchange_plan(self) -> torch.Tensor:
        """counts[r, j, b]: how many of replica r's active experts of bank b lie in replica j's block
        (all-gathered active masks: every rank knows every pair, so the all-to-alls' splits agree)."""
        banks = list(self.banks.values())
        masks = torch.zeros(len(banks), banks[0].shard_size, dtype=torch.int32, device=self.device)
        for b, bank in enumerate(banks):
            masks[b, (bank.active - bank.first).to(self.device)] = 1
        everyone = torch.empty(self.replicas * len(banks), banks[0].shard_size, dtype=torch.int32, device=self.device)
        dist.all_gather_into_tensor(everyone, masks, group=self.replica_group)
        self._masks = everyone.cpu().bool().view(self.replicas, len(banks), -1)  # [R, banks, shard_size]
        bank, bounds = banks[0], banks[0].bounds
        blocks = [bank.block_of(j) for j in range(self.replicas)]
        return torch.stack([self._masks[:, :, bounds[k]:bounds[k + 1]].sum(-1) for k in blocks],
                           dim=1)  # [r, j, b]: j the owner, of block block_of(j)

    def _my_block(self) -> torch.Tensor:
        """The replicas' active masks over this rank's own block: [R, banks, owned_size]."""
        bank = next(iter(self.banks.values()))
        return self._masks[:, :, bank.bounds[bank.block]:bank.bounds[bank.block + 1]]

    def _in_block_order(self) -> list[int]:
        """The owners, ordered by the block each owns (the order of the shard's expert ids)."""
        bank = next(iter(self.banks.values()))
        return sorted(range(self.replicas), key=bank.block_of)

    def _numbers(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [..., b] of expert rows → numbers (all weights of those rows)."""
        sizes = torch.tensor([sum(self._row_sizes(bank)) for bank in self.banks.values()])
        return (counts * sizes).sum(-1)

    @torch.no_grad()
    def _fetch_from_owners(self, plan: dict[str, torch.Tensor]) -> None:
        """Every rank gets exactly the experts it asked for (its expert-parallel group's routed set in its
        shard) from their owners: one host→device copy per owner of what any replica asked of its block,
        one all-to-all over the replica group."""
        banks = list(self.banks.values())
        for name, bank in self.banks.items():
            bank.select(plan[name], self.device)
        counts = self._exchange_plan()
        self._counts = counts
        me = banks[0].replica_rank
        send = self._numbers(counts[:, me]).tolist()  # to each replica r: its rows of my block
        receive = self._numbers(counts[me]).tolist()  # from each owner j: my rows of its block
        # My block's rows that anyone asked for: uploaded once, in the compute dtype.
        mine = self._my_block()
        wanted = mine.any(0)
        uploaded: list[list[torch.Tensor]] = []
        for b, bank in enumerate(banks):
            rows = wanted[b].nonzero().flatten().tolist()
            copies = [torch.empty((len(rows), *bank.shadow[name].shape[1:]), dtype=self.dtype, device=self.device)
                      for name in WEIGHT_NAMES]
            with _on(self.copy_stream):
                for name, target in zip(WEIGHT_NAMES, copies):
                    copy_rows(bank.shadow[name], rows, target, non_blocking=self.pin)
            uploaded.append(copies)
            self.traffic["host_to_device"] += len(rows) * self._row_bytes(bank, self.dtype)
        if self.copy_stream is not None:  # the exchange reads what the copies wrote
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        # Segment for replica r: banks, then weights, rows in expert order. The rows each replica picks out
        # of the uploaded union, found on the host and moved to the device in one copy.
        picks = [mine[r, b][wanted[b]].nonzero().flatten() for r in range(self.replicas) for b in range(len(banks))]
        picks = torch.cat(picks).to(self.device).split([len(p) for p in picks]) if picks else []
        outgoing = []
        for i, pick in enumerate(picks):
            outgoing += [w.index_select(0, pick).reshape(-1) for w in uploaded[i % len(banks)]]
        inbound = torch.empty(sum(receive), device=self.device, dtype=self.dtype)
        work = None
        if int(self._numbers(counts).sum()):  # every rank knows the totals: all skip together
            # Asynchronous: the layers below the first RRE layer compute while the rows travel; the first
            # expert layer's forward waits for them (`arrive`).
            work = dist.all_to_all_single(inbound, torch.cat(outgoing) if outgoing else inbound.new_empty(0),
                                          receive, send, group=self.replica_group, async_op=True)
        self._exchange = (work, inbound, counts, me)
        for bank in banks:
            bank.device_weights = {}
            bank.arrive = self._finish_exchange

    def _finish_exchange(self) -> None:
        """Wait for the fetch's all-to-all and lay its rows out as every bank's device copies."""
        if self._exchange is None:
            return
        work, inbound, counts, me = self._exchange
        self._exchange = None
        if work is not None:
            work.wait()
        banks = list(self.banks.values())
        # Owner j's segment holds my rows of its block (banks, then weights); the device copies take the
        # blocks in expert order.
        mine = counts[me].tolist()  # [owner j][bank b]: my rows of owner j's block
        segment: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        offset = 0
        for j in range(self.replicas):
            segment[j] = {}
            for b, bank in enumerate(banks):
                for w, size in enumerate(self._row_sizes(bank)):
                    n = mine[j][b] * size
                    segment[j][b, w] = inbound[offset: offset + n]
                    offset += n
        order = self._in_block_order()
        pieces = [[[segment[j][b, w] for j in order] for w in range(len(WEIGHT_NAMES))] for b in range(len(banks))]
        for b, (layer, bank) in enumerate(self.banks.items()):
            bank.device_weights = {
                name: torch.cat(pieces[b][w]).view(len(bank.active), *bank.host[name].shape[1:])
                .clone().requires_grad_(True)
                for w, name in enumerate(WEIGHT_NAMES)
            }
            self._watch(layer, bank)
            self.traffic["device_received"] += len(bank.active) * self._row_bytes(bank, self.dtype)
            bank.arrive = None
        if RECORD_STEPS and self.steps_log:
            self.steps_log[-1]["traffic"] = dict(self.traffic)

    # ---- gradients back to the host, from the hooks of the step's last backward --------------------
    def last_micro_batch(self) -> None:
        """The next backward is the step's last: from it on, each layer's expert gradients start back to
        the host (and to their owners or through the replicas' reduction) as soon as the backward has left
        the layer, while the backward of the layers below still runs (module docstring, "Gradients back"). Earlier
        micro-batches only accumulate. Without this call `step` sends everything itself, after backward."""
        self._prepare_returns()

    def _prepare_returns(self) -> None:
        """This step's return of each layer: what it sends, and where it lands in the pinned host buffer."""
        if self.sharded:
            self._owner_layout = self._owner_rows()
            kept = [self._owner_layout["used"][b].nonzero().flatten().tolist() for b in range(len(self.banks))]
        else:
            kept = [(bank.active - bank.owned_first).tolist() for bank in self.banks.values()]
        returns: dict[str, _Return] = {}
        offset = 0
        for (layer, bank), experts in zip(self.banks.items(), kept):
            size = len(experts) * sum(self._row_sizes(bank))
            returns[layer] = _Return(offset, size, experts)
            offset += size
        if self._landing is None or self._landing.numel() < offset:  # grown, never shrunk: pinning is slow
            self._landing = torch.empty(max(offset, 1), dtype=self._return_dtype, pin_memory=self.pin)
        self._returns, self._next = returns, 0

    def _watch(self, layer: str, bank: HostExpertBank) -> None:
        """Hooks on this fetch's device weights (fresh leaves every fetch: the hooks go with them)."""
        for weight in bank.device_weights.values():
            weight.register_post_accumulate_grad_hook(self._gradient_hook(layer))

    def _gradient_hook(self, layer: str) -> Callable[[torch.Tensor], None]:
        def landed(_: torch.Tensor) -> None:
            if self._returns is None:  # not the step's last backward: the gradient only accumulates
                return
            self._returns[layer].landed += 1
            self._check_ready(layer)

        return landed

    def _passed_hook(self, layer: str) -> Callable[[], None]:
        def passed() -> None:
            if self._returns is None:
                return
            self._returns[layer].passed = True
            self._check_ready(layer)

        return passed

    def _check_ready(self, layer: str) -> None:
        """A layer may go once the last backward has gone through it, on every rank alike, whether this rank
        computed rows of it or not. Its weights' gradients have accumulated by then (their nodes come first
        in the backward of the layer); where a rank computed no rows of it, none will come."""
        ret, bank = self._returns[layer], self.banks[layer]
        if ret.ready or not ret.passed:
            return
        if ret.landed == len(WEIGHT_NAMES) or bank.rows_computed == 0:
            ret.ready = True
            self._send_ready(before_step=True)

    def _send_ready(self, before_step: bool) -> None:
        """Send the ready layers at the head of the fixed order. Every rank issues the layers' collectives in
        this order, so a layer that one rank cannot send yet (no gradient reached its weights in the last
        backward) holds back the layers after it there until `step`, rather than letting the ranks issue
        their collectives in different orders."""
        with torch.no_grad():
            while self._next < len(self._order) and self._returns[self._order[self._next]].ready:
                self._send(self._order[self._next], before_step)
                self._next += 1

    def _send(self, layer: str, before_step: bool) -> None:
        """Start layer's return: its collective (asynchronous) and, queued behind it, its device→host copy."""
        ret, bank = self._returns[layer], self.banks[layer]
        ret.before_step = before_step
        if self.sharded:
            land = self._send_to_owners(list(self.banks).index(layer), bank, ret)
        else:
            land = self._send_replicated(bank, ret)
        if ret.work is None or self.copy_stream is not None:
            self._land(ret, land)  # CUDA: queued on the copy stream behind the collective; CPU: done here
        else:
            # gloo: waiting for the collective here would block this backward on a rank that issues it only
            # in its step(); the copy follows there
            ret.finish = lambda: self._land(ret, land)

    def _send_replicated(self, bank: HostExpertBank, ret: _Return) -> Callable[[], list[torch.Tensor]]:
        """Without sharded host state: the gradients as they are, or with replicas their fp32 sum (every
        replica steps the whole shard with it: fp32 keeps today's sum exact)."""
        grads = list(bank.gradients().values())
        if _group_size(self.replica_group) == 1:
            return lambda: grads
        flat = torch.cat([g.reshape(-1).float() for g in grads]) if grads else torch.zeros(0, device=self.device)
        if ret.size:  # the replicas fetched the same experts: all skip together
            ret.work = dist.all_reduce(flat, group=self._grad_group, async_op=True)
        ret.keep.append(flat)
        return lambda: [flat]

    def _send_to_owners(self, b: int, bank: HostExpertBank, ret: _Return) -> Callable[[], list[torch.Tensor]]:
        """Sharded host state: my rows of each owner's block to that owner, in the compute dtype; as an
        owner, what my replicas send me, summed per expert in fp32."""
        layout, me = self._owner_layout, bank.replica_rank
        counts, sizes = self._counts, self._row_sizes(bank)
        mine = [int(counts[me, j, b]) for j in range(self.replicas)]  # my rows of owner j's block
        outgoing = []
        if sum(mine):
            grads = bank.gradients()
            for j in range(self.replicas):  # to owner j: my rows of its block, weight by weight
                start = layout["first"][j][b]
                outgoing += [grads[name][start: start + mine[j]].reshape(-1).to(self.dtype) for name in WEIGHT_NAMES]
        outgoing = torch.cat(outgoing) if outgoing else torch.zeros(0, dtype=self.dtype, device=self.device)
        receive = [int(counts[r, me, b]) * sum(sizes) for r in range(self.replicas)]
        inbound = torch.empty(sum(receive), dtype=self.dtype, device=self.device)
        if int(counts[:, :, b].sum()):  # every rank knows the totals: all skip together
            ret.work = dist.all_to_all_single(inbound, outgoing, receive, [n * sum(sizes) for n in mine],
                                              group=self._grad_group, async_op=True)
        ret.keep += [outgoing, inbound]
        used = layout["used"][b]

        def summed() -> list[torch.Tensor]:
            sums = [torch.zeros(int(used.sum()), *bank.host[name].shape[1:], device=self.device)
                    for name in WEIGHT_NAMES]
            offset = 0
            for r in range(self.replicas):  # replica r's rows: weight by weight, in expert order
                slots = layout["slots"][r][b]
                for w, size in enumerate(sizes):
                    rows = inbound[offset: offset + len(slots) * size].view(len(slots), *sums[w].shape[1:])
                    sums[w].index_add_(0, slots, rows.float())
                    offset += len(slots) * size
            return sums

        return summed

    def _land(self, ret: _Return, land: Callable[[], list[torch.Tensor]]) -> None:
        """After the layer's collective: the sum of squares of what it returns (on the device, for the
        global norm) and the copy of it into its slice of the pinned landing buffer."""
        if self.copy_stream is not None:  # the gradients were made on the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(self.copy_stream):
            if ret.work is not None and self.copy_stream is not None:
                ret.work.wait()  # NCCL: the copy stream waits for the collective, the host does not
            parts = land()
            # vector_norm reads bf16 and sums in fp32 in one pass; `t.float().pow(2)` made two fp32 copies of
            # the layer's returned gradients (GiBs at sigma-1t widths) on the copy stream.
            norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in parts]
            ret.square = torch.stack(norms).square().sum() if norms else torch.zeros((), device=self.device)
            host = self._landing[ret.offset: ret.offset + ret.size]
            offset = 0
            for t in parts:
                host[offset: offset + t.numel()].copy_(t.reshape(-1), non_blocking=self.pin)
                offset += t.numel()
            ret.done = self.copy_stream.record_event() if self.copy_stream is not None else None
        ret.keep += parts
        if self.copy_stream is not None:
            # Freed once the copy stream has passed this copy (which waited for the collective), not at
            # step(): the layers' buffers would pile up over the backward otherwise.
            for t in ret.keep:
                t.record_stream(self.copy_stream)
            ret.keep = []
        self.traffic["device_to_host"] += ret.size * host.element_size()

    def _drain(self) -> dict[str, _Return]:
        """Send what has not gone yet (the same order on every rank), then wait until it has all landed."""
        if self.sharded:
            self._finish_exchange()  # a step whose forward never reached an expert layer
        if self._returns is None:  # no last_micro_batch() call: everything goes now
            self._prepare_returns()
        with torch.no_grad():
            for layer in self._order[self._next:]:
                self._send(layer, before_step=False)
        self._next = len(self._order)
        returns = self._returns
        for ret in returns.values():
            if ret.work is not None and self.copy_stream is None:
                ret.work.wait()
            if ret.finish is not None:
                ret.finish()
            if ret.done is not None:
                ret.done.synchronize()
        if RECORD_STEPS and self.steps_log:
            self.steps_log[-1]["returned_before_step"] = [n for n in self._order if returns[n].before_step]
        return returns

    def _owner_rows(self) -> dict[str, Any]:
        """Sharded host state, from the fetch's exchange plan: where my rows of owner j's block start among
        my active rows (`first[j][b]`), which experts of my block any replica used (`used[b]`), and where
        replica r's rows go among them (`slots[r][b]`, on the device)."""
        banks = list(self.banks.values())
        counts, me = self._counts, banks[0].replica_rank
        # My active rows are in expert order: owner j's come after those of the blocks before its own.
        order = self._in_block_order()
        in_order = counts[me][order]  # [k-th block in expert order][bank]
        first = torch.empty_like(in_order)
        first[order] = in_order.cumsum(0) - in_order
        mine = self._my_block()
        used = mine.any(0)
        slots = [mine[r, b][used[b]].nonzero().flatten() for r in range(self.replicas) for b in range(len(banks))]
        slots = torch.cat(slots).to(self.device).split([len(x) for x in slots]) if slots else []
        return {"first": first.tolist(), "used": used,
                "slots": [slots[r * len(banks): (r + 1) * len(banks)] for r in range(self.replicas)]}

    # ---- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0, skip: bool = False, step: int | None = None
             ) -> dict[str, float]:
        """Wait for the expert gradients on their way back (send what has not gone), take their global norm
        and the factor that unscales, averages and clips them, release; update them on the host (in line,
        or on the worker with a delayed update: the multiply by the factor too).

        `grad_scale` is the fp16 loss scale the gradients carry; `skip` (an fp16 overflow step that the
        engine skipped) releases without updating, as the dense part does. `step`: the training step
        this update ends (1 for the first), for the warm-up of a delayed update (None: after it).
        """
        self._delay_this_update = self.delayed_update and (step is None or step > self.delay_after)
        returns = self._drain()  # even when skipped: the other ranks' collectives need this rank's
        if skip:
            self.release()
            return {"expert_grad_norm": 0.0, "experts_updated": 0}
        # Squares are summed over every shard, and with sharded host state over every owner's block:
        # each element once.
        groups = [self.replica_group, self.ep_group] if self.sharded else [self.ep_group]
        factor, norm = self._clip_factor([ret.square for ret in returns.values()], grad_scale, groups)
        landed = _Landed(self._landing, sum(ret.size for ret in returns.values()), factor,
                         [(layer, ret.offset, ret.experts) for layer, ret in returns.items()])
        if self._delay_this_update:  # the worker reads this buffer; the next step lands in the other one
            self._landing, self._spare_landing = self._spare_landing, self._landing
        rows_of = {layer: ret.experts for layer, ret in returns.items()}  # owned rows stepped, per layer
        stats = {"expert_grad_norm": norm, "experts_updated": sum(len(ret.experts) for ret in returns.values())}
        self.release()
        self._update(lr, landed, rows_of)
        return stats

    def _gradient_pairs(self, landed: _Landed) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(expert parameter, its fp32 gradient) for every row stepped: the landed gradients unscaled,
        averaged and clipped by one multiply, in one pass over host memory. fp32 sums are scaled where they
        landed (the buffer is this update's alone); compute-dtype gradients are widened into their own fp32
        tensor by the same multiply."""
        torch.set_num_threads(self.host_threads)  # OpenMP's thread count is per calling thread
        source = landed.buffer[:landed.total]
        if source.dtype == torch.float32:
            flat = source.mul_(landed.factor) if landed.factor != 1.0 else source
        else:  # a 1-element fp32 factor: the multiply runs in fp32 on the widened values
            flat = torch.empty(landed.total, dtype=torch.float32)
            torch.mul(source, torch.tensor([landed.factor], dtype=torch.float32), out=flat)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer, offset, experts in landed.layers:
            bank = self.banks[layer]
            for name in WEIGHT_NAMES:
                n = len(experts) * bank.host[name][0].numel()
                rows = flat[offset: offset + n].view(len(experts), *bank.host[name].shape[1:])
                offset += n
                pairs += [(bank.expert_params[name][e], rows[i]) for i, e in enumerate(experts)]
        return pairs

    def _clip_factor(self, squares: list[torch.Tensor], grad_scale: float, norm_groups: list[Any]
                     ) -> tuple[float, float]:
        """From the returned gradients' sums of squares (device scalars): the global norm of the unscaled,
        averaged gradients (squares summed over the groups of `norm_groups` that exist), and the one factor
        that unscales, averages and clips them (torch.nn.utils.clip_grad_norm_'s rule)."""
        # The loss is a mean over all data-parallel ranks, as DeepSpeed averages the dense gradients.
        mean = grad_scale * _group_size(self.group)
        square = torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)
        square = (square / mean ** 2).reshape(1)
        for group in norm_groups:
            if group is not None:
                dist.all_reduce(square, group=group)
        norm = float(square.sqrt())
        factor = 1.0 / mean
        if self.optim.grad_clip > 0 and norm > self.optim.grad_clip:
            factor *= self.optim.grad_clip / (norm + 1e-6)
        return factor, norm

    # ---- the host update, in line or one step behind ------------------------------------------------
    def _update(self, lr: float, landed: _Landed, rows: dict[str, list[int]]) -> None:
        """The landed gradients scaled (`_gradient_pairs`), Adam on the host with them; then the shadows of
        `rows` (per layer, owned rows) follow their masters. In line, or with `delayed_update` all of it on a
        worker thread while the next step runs: the next step then still fetches the shadows from before
        this update, and this update's shadows are refreshed at the end of the next step, once it has landed
        (module docstring)."""
        if not self._delay_this_update:  # in line (or still in the warm-up of a delayed update)
            self._join()  # nothing in flight, unless a resume changed the warm-up: then let it land
            self._refresh(self._pending_rows)
            self._pending_rows = {}
            self._apply(lr, self._gradient_pairs(landed))
            self._refresh(rows)
            return
        self._join()  # the previous update has reached the masters and its rows' shadows
        self._refresh(self._pending_rows)  # rows left lagging by a resume (no worker refreshes them)
        self._pending_rows = rows
        self._fetched = queue.SimpleQueue()
        self._updated = threading.Event()
        self._worker = threading.Thread(target=self._apply_then_refresh, args=(lr, landed, rows),
                                        name="ecss-host-adam", daemon=True)
        self._worker.start()

    def _apply_then_refresh(self, lr: float, landed: _Landed, rows: dict[str, list[int]]) -> None:
        """The worker: the gradients' scaling pass and Adam on the masters; then, once the next step's fetch
        has read the shadows, this update's rows' shadows (so the refresh, too, stays off the critical
        path)."""
        try:
            self._apply(lr, self._gradient_pairs(landed))
        except BaseException as exc:  # handed to the training thread at its next wait
            self._failure = exc
            return
        finally:
            self._updated.set()
        done = self._fetched.get()  # None: no copy to wait for (CPU), or released by close()
        if done is not None:
            done.synchronize()
        self._refresh(rows)
        self._pending_rows = {}

    def _apply(self, lr: float, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for param, grad in pairs:
            param.grad = grad
        if pairs:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        for param, _ in pairs:
            param.grad = None

    def _refresh(self, rows: dict[str, list[int]]) -> None:
        for layer, bank in self.banks.items():
            bank.refresh_shadows(rows.get(layer, []))

    def wait(self) -> None:
        """Until the update in flight (delayed_update) has reached the masters and Adam states; its rows'
        shadows lag until the next step's fetch has read them."""
        if self._worker is not None:
            self._updated.wait()
            self._raise_failure()

    def _join(self) -> None:
        if self._worker is not None:
            self._updated.wait()
            self._raise_failure()
            self._worker.join()  # the step's fetch has released its shadow refresh
            self._worker = None

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            self._worker = None
            raise RuntimeError(f"ECSS: the delayed host update failed: {failure}") from failure

    def close(self) -> None:
        """Let a delayed update in flight finish, shadows included (no further fetch will come)."""
        if self._worker is not None:
            self._fetched.put(None)
            self._join()
            self._pending_rows = {}

    def release(self) -> None:
        for bank in self.banks.values():
            bank.release()
        self._returns, self._next = None, 0

    # ---- checkpoint and export --------------------------------------------------------------------
    @property
    def shard(self) -> tuple[int, int]:
        """(expert-parallel rank, expert-parallel size): which shard of the experts this rank holds."""
        bank = next(iter(self.banks.values()))
        return bank.ep_rank, bank.ep_size

    @property
    def owner(self) -> tuple[int, int]:
        """(replica index, replicas): which block of its shard this rank owns ((0, 1) when not sharded)."""
        bank = next(iter(self.banks.values()))
        return (bank.replica_rank, bank.replicas) if self.sharded else (0, 1)

    def state_dict(self) -> dict[str, Any]:
        """This shard's (with sharded host state: this owner's block's) masters and Adam states per layer
        and weight, stacked over its experts (zeros where never stepped), and each expert's own step count."""
        self.wait()
        ep_rank, ep_size = self.shard
        out: dict[str, Any] = {"shard": torch.tensor([ep_rank, ep_size])}
        if self.sharded:
            out["owner"] = torch.tensor(list(self.owner))
            out["block"] = torch.tensor(next(iter(self.banks.values())).block)
        for layer, bank in self.banks.items():
            for name in WEIGHT_NAMES:
                params = bank.expert_params[name]
                steps = torch.zeros(len(params), dtype=torch.long)
                exp_avg = torch.zeros_like(bank.host[name])
                exp_avg_sq = torch.zeros_like(bank.host[name])
                for e, p in enumerate(params):
                    state = self.optimizer.state.get(p)
                    if state:
                        steps[e] = int(state["step"])
                        exp_avg[e] = state["exp_avg"]
                        exp_avg_sq[e] = state["exp_avg_sq"]
                out[f"{layer}.{name}"] = {"master": bank.host[name], "step": steps, "exp_avg": exp_avg,
                                          "exp_avg_sq": exp_avg_sq}
                if self.delayed_update:  # the shadows the next step fetches, where they lag their masters
                    rows = torch.tensor(self._pending_rows.get(layer, []), dtype=torch.long)
                    out[f"{layer}.{name}"].update(pending_rows=rows, pending_shadow=bank.shadow[name][rows].clone())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait()
        saved_shard = tuple(int(v) for v in state["shard"])
        if saved_shard != self.shard:
            raise ValueError(f"ECSS state of expert shard {saved_shard} (rank, size) loaded into shard {self.shard}")
        saved_owner = tuple(int(v) for v in state["owner"]) if "owner" in state else (0, 1)
        if saved_owner != self.owner:
            raise ValueError(f"ECSS state of block {saved_owner} (replica, replicas) of its shard loaded into "
                             f"block {self.owner}: written with another ecss_shard_states layout")
        if self.sharded:
            block = next(iter(self.banks.values())).block
            saved_block = int(state["block"]) if "block" in state else saved_owner[0]  # before blocks rotated
            if saved_block != block:
                raise ValueError(f"ECSS state of block {saved_block} of its shard loaded by the owner of block "
                                 f"{block}: written before owners' blocks were rotated by shard; resume it "
                                 f"with the version that wrote it, or start from its export")
        for layer, bank in self.banks.items():
            for name in WEIGHT_NAMES:
                saved = state[f"{layer}.{name}"]
                if saved["master"].shape != bank.host[name].shape:
                    raise ValueError(f"{layer}.{name}: saved shape {tuple(saved['master'].shape)}, "
                                     f"model {tuple(bank.host[name].shape)}")
                bank.host[name].copy_(saved["master"])
                for e, p in enumerate(bank.expert_params[name]):
                    self.optimizer.state.pop(p, None)
                    step = int(saved["step"][e])
                    if step:
                        self.optimizer.state[p] = {
                            "step": step,
                            "exp_avg": saved["exp_avg"][e].clone(),
                            "exp_avg_sq": saved["exp_avg_sq"][e].clone(),
                        }
            bank.refresh_shadows(list(range(bank.owned_size)))
            if self.delayed_update:  # an update in flight when it was saved: its rows' shadows still lag
                pending = state[f"{layer}.{WEIGHT_NAMES[0]}"].get("pending_rows")
                rows = pending.tolist() if pending is not None else []
                for name in WEIGHT_NAMES:
                    if rows:
                        bank.shadow[name][rows] = state[f"{layer}.{name}"]["pending_shadow"].to(bank.shadow[name].dtype)
                self._pending_rows[layer] = rows

    def expert_rows(self) -> list[tuple[str, torch.Tensor, int]]:
        """This rank's shard (sharded host state: its own block) as (ExpertBank tensor name, host master
        rows, first row) pieces."""
        self.wait()
        return [(f"{layer}.experts.{name}", bank.host[name], bank.owned_first)
                for layer, bank in self.banks.items() for name in WEIGHT_NAMES]

    def expert_state(self) -> dict[str, torch.Tensor]:
        """Every layer's experts, whole, under `ExpertBank` names (`<layer>.experts.w_in`, ...), on the
        first rank of each expert-parallel group (the shards are gathered there); empty elsewhere.
        Collective over the expert-parallel group (and the replica group with sharded host state)."""
        self.wait()  # every update in the masters
        out: dict[str, torch.Tensor] = {}
        for layer, bank in self.banks.items():
            for name in WEIGHT_NAMES:
                if self.sharded:  # the blocks of the shard, from their owners, in expert order
                    widest = max(b - a for a, b in zip(bank.bounds, bank.bounds[1:]))
                    block = bank.host[name].to(self.device)
                    padded = block.new_zeros((widest, *block.shape[1:]))
                    padded[: len(block)] = block
                    gathered = block.new_empty((widest * bank.replicas, *block.shape[1:]))
                    dist.all_gather_into_tensor(gathered, padded, group=self.replica_group)
                    size = [hi - lo for lo, hi in zip(bank.bounds, bank.bounds[1:])]
                    shard = torch.cat([gathered[j * widest: j * widest + size[bank.block_of(j)]]
                                       for j in self._in_block_order()]).cpu()
                else:
                    shard = bank.host[name]
                if self.ep_group is None:
                    out[f"{layer}.experts.{name}"] = shard.clone()
                    continue
                master = shard.to(self.device)  # NCCL gathers device tensors only
                first = dist.get_global_rank(self.ep_group, 0)
                parts = [torch.empty_like(master) for _ in range(bank.ep_size)] if bank.ep_rank == 0 else None
                dist.gather(master, parts, dst=first, group=self.ep_group)
                if parts is not None:
                    out[f"{layer}.experts.{name}"] = torch.cat(parts).cpu()
        return out

    def host_bytes(self) -> int:
        """Host memory held: masters, their compute-dtype shadows (none under fp32) and Adam states (two
        fp32 moments per stepped expert)."""
        masters = sum(t.numel() * t.element_size() for b in self.banks.values() for t in b.host.values())
        shadows = sum(t.numel() * t.element_size() for b in self.banks.values() if b.shadow is not b.host
                      for t in b.shadow.values())
        moments = sum(s["exp_avg"].numel() * 8 for s in self.optimizer.state.values() if s)
        return masters + shadows + moments


__all__ = ["ExpertOffload", "HostExpertBank"]
