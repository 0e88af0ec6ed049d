"""Memory and time planner: `pangu plan`, and the check the training program makes before it allocates.

A plan takes one training configuration (``pangu_model.train.TrainConfig``), a cluster and a parallel
plan (``pangu_model.topology``) and a GPU kind from :data:`HARDWARE`, and says, per GPU and per node, how many
bytes the run holds on the device and in host memory, how many bytes cross PCIe per step, how long a
step takes and what MFU that is, and whether it fits. Nothing is allocated: parameter counts come from
the model's own module tree built on the meta device (as ``pangu_model.info`` does).

Everything below is a *model* of what this project's code does; each figure is stated with its rule so
that a wrong one can be found and fixed. The GPU kind is an argument (``pangu plan --gpu``, default
``h100``; the trainer's check takes the device's name): topology presets name no GPU, so a plan that does
not fit in one kind's GPU memory notes the kinds it fits on. ``--gpu cpu`` plans the ranks as CPU processes,
as the trainer's check on a machine without a GPU does (memory only: the table has no CPU speeds).

Parameters per GPU
------------------
Layers are split over pipeline stages in order as the trainer splits them (``pangu_model.topology.stage_layers``:
``num_layers // pipeline`` each, one more on the ``num_layers % pipeline`` stages before the last; the query
layer is the last). Stage 0 also holds the word and position embeddings, the last stage the final LayerNorm, the query
embedding and, with ``pipeline > 1``, its own copy of the tied word embedding for the head (Megatron's
rule). Dense parameters of a stage are divided by ``tensor`` (LayerNorms, biases and the position tables,
which Megatron replicates, are divided too: < 0.1 % of a block). Routed experts are divided by
``expert``: on the device, or, with ECSS, in host memory. The stage whose GPU needs the most bytes is the
one reported.

Device bytes (``p`` = bytes per element of the compute dtype: 2 for bf16/fp16, 4 for fp32; ``Ψ`` =
parameters on the GPU; ``dp`` = data-parallel degree; experts under DeepSpeed MoE partition over the
expert-data-parallel group ``dp / ep``)

* parameters ``p·Ψ`` (ZeRO-3: ``p·Ψ/dp`` plus ``stage3_max_live_parameters`` = 1e9 gathered at a time);
* gradients ``p·Ψ`` (ZeRO ≥ 2: ``p·Ψ/dp``, in DeepSpeed's partition buffer). bf16 without
  ``grad_accum_dtype`` accumulates in bf16, which is what ``pangu_model/deepspeed_config.py`` asks for;
* optimizer states: fp32 master + Adam m and v = 12 bytes per parameter under bf16/fp16 (8 under fp32:
  the parameters are the masters), divided by ``dp`` for ZeRO ≥ 1; on the host with ``offload_optimizer``;
* during the dense optimizer step, the fp32 copy of the gradient partition (4·Ψ/dp; DeepSpeed
  ``stage_1_and_2.py``), and the ZeRO reduce buckets: ``reduce_bucket_size`` elements × ``p``, twice
  (``overlap_comm`` double-buffers them on CUDA);
* activations, per layer and micro-batch, after Korthikanti et al. 2022 ("Reducing activation
  recomputation in large transformer models", eq. 1-2) without sequence parallelism:
  ``s·b·h·(4p + 2 + 12p/t)`` bytes (= ``s·b·h·(10 + 24/t)`` in 16-bit). Their ``5·a·s²·b/t`` term for
  the stored attention matrix is absent: ``pangu_model/model.py`` calls
  ``F.scaled_dot_product_attention``, whose flash / memory-efficient CUDA kernels keep only q, k, v,
  the output and a log-sum-exp (dropout is regenerated from the RNG state). With
  ``gradient_checkpointing`` (a model field; every preset leaves it off) a layer keeps only its input
  (``p·s·b·h``) and one layer at a time is recomputed. A pipeline stage ``i`` under 1F1B holds
  ``min(pipeline − i, micro-batches per step)`` micro-batches in flight. The trainer's check on a machine
  without a GPU adds what the CPU's math kernel keeps (``_math_attention_bytes``), counts a ZeRO bucket
  only up to the rank's gradients (host pages cost memory once written) and each process's device bytes as
  host bytes;
* logits on the last stage: ``b·s·V/t·(p + 12)``: the logits in the compute dtype, the fp32
  log-softmax that ``cross_entropy`` saves, and two fp32 gradient buffers in backward.

ECSS (``pangu_model/ecss.py``), counted from the code
---------------------------------------------------
Per sparse layer a GPU's expert-parallel rank holds a shard of ``S = experts / ep`` experts (sigma-1t:
80); the ``R = dp / ep`` ranks holding the same shard (one per expert-parallel group) are its replicas.
Without sharded host state every replica keeps the whole shard; with ``ecss_shard_states`` block ``k`` is
``[k·S//R, (k+1)·S//R)`` (``HostExpertBank.bounds``: blocks of ``⌊S/R⌋`` or ``⌈S/R⌉`` experts; sigma-1t: 80
over 64, 1 or 2) and replica ``j`` of shard ``e`` owns block ``(j + e) mod R`` (``ecss.owned_block``), so a
node's ranks own consecutive blocks (sigma-1t: 10 experts a layer on every node). The per-GPU figures count
the largest block, ``O = ⌈S/R⌉`` experts per layer; a node's host memory and DRAM traffic sum its GPUs'
blocks (``EcssRouting.node_blocks``, the busiest node). Parameters below are per GPU over its
sparse layers: an expert is ``2·d·d_ff + d_ff + d`` parameters.

Host, per GPU, for the ``E_h`` expert parameters it keeps (the shard, or its block):

* resident: fp32 masters (4 B) + their shadows in the compute dtype, the source of every fetch (``p`` B,
  pinned on CUDA; none under fp32, where the masters are the shadows) + DeepSpeedCPUAdam's m and v (8 B,
  allocated as each expert is first stepped; counted for every expert) = **12 + p bytes per kept expert
  parameter** (14 under bf16), and the pinned buffer the gradients land in, kept from step to step
  (``ExpertOffload._landing``, per uploaded parameter: p B where no replica adds to them, else 4 B for
  their fp32 sums: the replicas' all-reduce, or with sharded state the owner's per-expert sums; two of
  them with ``ecss_delayed_update``: the worker reads one while the next step lands in the other);
* each step: the host update widens compute-dtype gradients into their own fp32 copy for the host
  optimizer (4 B per uploaded parameter; fp32 sums are scaled where they landed, no copy); the fetch copies straight from the pinned shadows (runs of rows,
  ``copy_rows``), with no staging copy;
* checkpoint save (every rank that writes a shard or a block): ``ExpertOffload.state_dict`` builds fresh m
  and v tensors for what it keeps, +8 B per parameter;
* resume: ``torch.load`` of the file (12 B) next to the masters (4 B) while ``load_state_dict`` clones m and
  v (8 B): **24 bytes per kept expert parameter** at the peak;
* start-up: ``build_model`` (``pangu_model.materialize``) makes one module at a time in fp32 on the host
  before it moves to the GPU (the largest: the word embedding or one FFN linear); the experts of the rank's
  **whole shard** (``S`` per layer, sharded state or not: ``build_model`` knows only the expert-parallel
  shard) are made on the host and stay there until ``ExpertOffload`` copies each RRE layer's block (or
  shard) into its pinned master and drops the layer's bank: ``4·(shard) + 4·(one layer's kept experts)``.

Which experts a step moves, per rank and sparse layer:

* **without sharded host state** ``ExpertOffload.plan`` unites the routed sets of every data-parallel rank
  (``all_reduce(MAX)`` over the world) and every micro-batch of the step, so every replica fetches, steps
  and uploads ``A = U = min(S, micro_batch · seq · gradient_accumulation · dp · active)``: an **upper
  bound** that assumes the step's tokens reach every expert they could (with 40 domains and ≥ 10⁴ tokens
  per domain per step every expert is hit).
* **with sharded host state** the union is rank-local: ``plan()`` unites only over the expert-parallel
  group, so a rank fetches ``A`` = the experts of its shard that its group's rows (all micro-batches of
  the step) route to. With domain-affine steps (``TrainConfig.domain_affine``; on by default for RRE: all
  rows of a node in a step come from one domain, ``tokenizer.dataset``) ``A`` is that domain's experts on
  the rank: ``K / ep`` with the interleaved layout (sigma-1t: 16 per domain over 8 ranks = **2**), ``K``
  with the contiguous one, and at most the group's ``b·s·gas·ep·active`` token assignments. Without
  domain-affine rows, ``A`` = ``Σ_d m_d·(1 − (1 − w_d)^n)``, the expected experts of the domains that the
  group's ``n = b·gas·ep`` rows bring (``m_d`` experts of domain ``d`` on the rank), an expectation.
  The owner of a block uploads and steps ``U`` = the union of what its replicas asked of its block:
  **the whole block** (``O``), the bound that memory and time use. Its expectation is
  ``Σ_{e ∈ block} P(domain of e in the step)``; the affine schedule (``affine_schedule``) lays a domain's
  slots of a window down consecutive steps, so a domain of weight ``w_d ≥ 1/nodes`` is in **every** step
  and the expectation is the bound (sigma-1t, uniform: 2 = 2; independent draws per node would give
  ``1 − (1 − 1/40)^64 ≈ 0.80`` of the block, but the schedule is not independent); without domain-affine
  rows ``1 − (1 − w_d)^(b·gas·dp)``. The replicas ask ``Q`` rows of the block: with domain-affine steps a
  domain sits on at most ``⌈nodes·w_d⌉`` nodes of a step (``nodes·w_d`` on average), each with ``R/nodes``
  replicas, so ``Q = Σ_{e ∈ block} ⌈nodes·w_d⌉·R/nodes`` with at most ``nodes`` domain slots in all
  (sigma-1t: 2 × 2 = **4**; expected 3.2); without, ``R·Σ_e (1 − (1 − w_d)^n)`` expected. The weights
  ``w_d`` are the preset's mixture when it names weights, otherwise **uniform** (the default "natural"
  mixture follows the data's token counts, unknown to the planner); with named weights the heaviest
  domains are put on the worst block. A skewed mixture raises ``Q``: a domain on ``k`` nodes of a step
  sends its owner ``k`` copies of each gradient.

Device, per GPU: the ``A`` fetched parameters' weights in the compute dtype and their gradients
(``2p·A``). Gradients back (``ExpertOffload._send``, per sparse layer from its hooks in the last backward):
with replicas and unsharded state the fp32 copies of the gradients and their concatenation, all-reduced
(``4A + 4A``; the copies cost nothing under fp32); with sharded state the rows to send, concatenated in the
compute dtype (``p·A``), the rows inbound from the replicas (``p·Q``) and the fp32 per-expert sums (``4U``);
without replicas nothing (the copy reads the gradients). A layer's are freed once its copy to the host is
done; the plan counts every sparse layer's (the link may trail the backward: sigma-1t's does) beside the
activations of the blocks below the lowest expert layer (phase ``ecss_gradient_return``). With sharded host
state also, in ``_fetch_from_owners``, the uploaded union (``p·U``), the outgoing rows picked per replica and
their concatenation (``2p·Q``) and the inbound rows (``p·A``) next to the device copies being assembled
(``p·A``; one weight of one layer cloned at a time is left out).

Transfers: host→device **p bytes per uploaded parameter** (``U``; ``A`` = ``U`` without sharding): the code
copies the compute-dtype shadow rows from pinned memory into a device pool on a copy stream (one event per
layer); the gradients come back in the compute dtype where no replica adds to them (p B), otherwise as
fp32 sums (4 B: the replicas' fp32 all-reduce, or the owner's sums of the rows it received; an owner's 4
B per stepped parameter are no more than the p·Q B of those rows once Q ≥ 2U under bf16). With sharded
host state, over the replica
group (one rank per expert-parallel group: across nodes, the network): the active masks all-gathered
(int32, one per expert of the shard: tiny, as the routed masks all-reduced over the expert-parallel
group), then **one all-to-all** of the fetched rows in the compute dtype (the largest block's owner sends
``p·Q``, every rank receives ``p·A``) and **one all-to-all per sparse layer** of the gradients in the
compute dtype (sends ``p·A`` in all, the owner receives ``p·Q`` and sums them in fp32 on its device). The plan also states what PCIe moves each way during the step's dense compute
(``times["compute_dense"]``): what the transfers would have to fit in to hide under it.

Time per step
-------------
* compute: model FLOPs (``pangu_model.metrics.flops_per_token``, PaLM's 6·N + 12·L·d·T, × tokens per
  step / GPUs) × 4/3 with recomputation, at ``peak × compute_efficiency``. Expert GEMMs are a roofline:
  the slower of their FLOPs and of streaming their weights from HBM three times per micro-batch
  (forward, input-gradient and weight-gradient GEMMs), because with few tokens per expert they are
  bandwidth-bound. A pipeline adds the 1F1B bubble: × ``(m + pp − 1)/m`` for ``m`` micro-batches.
* communication, ring algorithms (all-reduce ``2(n−1)/n``, reduce-scatter and all-gather ``(n−1)/n`` of
  the buffer), on NVLink when the group lies inside a node, on the network otherwise:
  the dense gradient reduction **overlaps the backward pass** (2/3 of the compute; only what is
  longer shows); the ZeRO ≥ 1 parameter all-gather after the step, tensor-parallel all-reduces
  (4 per layer and micro-batch), expert all-to-alls (4 per sparse layer and micro-batch) and pipeline
  sends are **not overlapped**.
* ECSS and ZeRO-Offload: the trainer runs them around the compute (fetch before the first forward,
  ``ExpertOffload.step`` after the last backward), so they add up, except: with sharded host state the
  owners' host→device copies and the all-to-all of the fetched rows overlap the forward of the layers
  below the first expert layer (a third of those layers' compute time); the gradients' exchange (the
  replicas' fp32 all-reduce, or the owners' all-to-all, as long as its busiest rank's larger direction,
  ``p·max(A, Q)``) and their copy to the host run from each sparse layer's hooks in the last micro-batch's
  backward (2/3 of its compute): a layer's start once the backward, every block an equal part of it from
  the top, has passed the layer and once the layer above's are done, and only what ends after that backward
  shows (``_shown_after_backward``, charged to the exchange first; the dense gradient reduction shares the
  network in the same window, which the plan does not add up: optimistic where both are long); and with
  ``ecss_delayed_update`` CPU Adam and the shadow refresh run beside the next step (only what outlasts it
  shows). Otherwise: host→device copy of ``U``, the gradients' multiply (unscale, average, clip: it reads
  what landed and writes fp32, ``p_g + 4`` B per parameter of ``U`` for the node's GPUs) and the CPU Adam
  update of ``U`` (with ``ecss_delayed_update`` the multiply runs with Adam on the worker, beside the next
  step); with sharded state the mask
  collectives and the fetch's all-to-all (``p·max(A, Q)``, over the network). A copy takes the longer of its
  PCIe time (per GPU) and of the node's host-DRAM traffic (all GPUs of a node share it: the fetch's DMA
  reads the shadow, p B per parameter; the gradients are written once, p or 4 B). CPU Adam is bound by host DRAM: it reads the
  parameter, gradient, m and v and writes three of them back, 28 bytes per updated parameter, and the
  shadow refresh reads the master and writes the shadow (4 + p B; none under fp32), for the 8 GPUs of a
  node. The copies are issued on a copy stream that each layer waits for, so a layer's compute may
  overlap the later layers' copies; the plan still adds the whole copy time (an upper bound).
* step time = compute (with bubble) + the non-overlapped terms; MFU = model FLOPs per GPU /
  (step time × peak), as ``metrics.py`` computes it during training.
* dense counterpart (sparse models): the same plan for the same TrainConfig and cluster with the model's
  dense base shape (router dense, no sparse layers: sigma-1t → the 13b shape), ECSS off and expert
  parallel 1 (:func:`dense_counterpart_config`); ``dense_counterpart["step_time_ratio"]`` = this step time
  / that one.

Fits
----
A plan fits when the largest device phase (forward/backward, dense optimizer step, ECSS fetch and
gradient return) is at
most ``GPU memory × (1 − GPU_RESERVE_FRACTION)`` and the largest host phase per node (start-up, step,
checkpoint save, resume) at most ``host RAM × (1 − HOST_RESERVE_FRACTION)``; every reason it does not
is listed with its numbers. A node's figures are its GPUs' times the GPUs per node (the worst stage's GPU
with a pipeline; the ranks that write checkpoints, one per expert shard, share node 0).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cleaning.errors import one_line
from cleaning.yamlfile import names_a_file

from .config import PIPELINE_ROUTERS, PRESETS, SHAPE_FIELDS, PanguConfig
from .materialize import on_meta
from .metrics import PEAK_FLOPS, flops_per_token
from .model import PanguModel
from .moe import rre_expert_ids
from .topology import ClusterSpec, Layout, ParallelPlan, TopologyError, describe_split, load_topology, stage_layers

if TYPE_CHECKING:  # the training config imports the planner (its start-up check): imported where used
    from .train import TrainConfig

GiB = 2**30
TiB = 2**40


# --------------------------------------------------------------------------------------------
# Hardware figures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """One GPU kind in one kind of server. Peak FLOP/s come from `pangu_model.metrics.PEAK_FLOPS`."""

    key: str
    name: str
    peak_key: str  # key of pangu_model.metrics.PEAK_FLOPS
    memory_bytes: int  # HBM per GPU as torch reports it (total_memory): less than the datasheet's figure
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction
    pcie_h2d_bytes_per_s: float  # pinned host → device, per GPU
    pcie_d2h_bytes_per_s: float  # device → host, per GPU
    network_bytes_per_s: float  # per GPU, one direction, between nodes
    host_ram_bytes: int  # per node (default; --host-ram-gb overrides)
    host_dram_bytes_per_s: float  # per node, sustained
    compute_efficiency: float  # share of the dense peak that the model's GEMMs reach on average
    sources: tuple[str, ...] = ()

    def peak_flops(self, precision: str) -> float:
        table = PEAK_FLOPS[self.peak_key]
        return table.get(precision, table["bf16"])


_COMMON_SOURCES = (
    "bf16 dense peak 989 TFLOP/s, fp32 as TF32 494.7: NVIDIA H100/H200 SXM datasheets (no sparsity), the "
    "table in pangu_model/metrics.py",
    "NVLink 4: 900 GB/s per GPU is both directions together; a ring step sends at most 450 GB/s",
    "PCIe Gen5 x16 ≈ 55 GB/s pinned host→device per GPU (copy engine, SPEC §10); device→host assumed equal",
    "network: one 400 Gb/s InfiniBand NDR NIC per GPU (DGX H100/H200 layout) = 50 GB/s: assumption",
    "host: 2 × Xeon 8480C, 16 channels DDR5-4800 = 614 GB/s theoretical, 450 GB/s sustained assumed; "
    "2 TiB per node (DGX H100/H200): assumption, override with --host-ram-gb",
    "compute_efficiency 0.5: assumption; Megatron-Core reaches 41-48 % MFU on dense GPT on H100 with its "
    "communication included (SPEC §10), so its GEMMs alone run at about half the datasheet peak",
)

HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(
        key="h100", name="NVIDIA H100 SXM5 80 GB", peak_key="H100",
        memory_bytes=int(79.2 * GiB), hbm_bytes_per_s=3.35e12, nvlink_bytes_per_s=450e9,
        pcie_h2d_bytes_per_s=55e9, pcie_d2h_bytes_per_s=55e9, network_bytes_per_s=50e9,
        host_ram_bytes=2 * TiB, host_dram_bytes_per_s=450e9, compute_efficiency=0.5,
        sources=("HBM3 80 GB, 3.35 TB/s: NVIDIA H100 SXM datasheet; planned as the 79.2 GiB torch reports "
                 "(nvidia-smi: 81,559 MiB)",) + _COMMON_SOURCES,
    ),
    "h200": Hardware(
        key="h200", name="NVIDIA H200 SXM 141 GB", peak_key="H200",
        memory_bytes=int(139.8 * GiB), hbm_bytes_per_s=4.8e12, nvlink_bytes_per_s=450e9,
        pcie_h2d_bytes_per_s=55e9, pcie_d2h_bytes_per_s=55e9, network_bytes_per_s=50e9,
        host_ram_bytes=2 * TiB, host_dram_bytes_per_s=450e9, compute_efficiency=0.5,
        sources=("HBM3e 141 GB, 4.8 TB/s: NVIDIA H200 datasheet; planned as the 139.8 GiB torch reports "
                 "(nvidia-smi: 143,771 MiB)",) + _COMMON_SOURCES,
    ),
}

GPU_RESERVE_FRACTION = 0.10  # CUDA context and NCCL buffers (~1-2 GiB) + caching-allocator fragmentation
HOST_RESERVE_FRACTION = 0.10  # OS, page cache, data-loader workers, launcher
ADAM_BYTES_TOUCHED = 28  # CPU Adam per parameter: read p, g, m, v (16 B fp32), write p, m, v (12 B)
ZERO3_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters
# Assumed: what one node writes to the shared filesystem that holds the checkpoints (a parallel
# filesystem's share per client node; local NVMe is faster, NFS slower). Sets the checkpoint time.
CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE = 2e9
CPU = "cpu"  # `pangu plan --gpu cpu`: the ranks are CPU processes (memory only; the table has GPU speeds)
BARE_MODEL_DEFAULTS: dict[str, Any] = {  # a bare model preset (`--preset 200b`) plans with these
    "precision": "bf16", "zero_stage": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
    "seq_len": 1024,
}


def hardware(gpu: str) -> Hardware:
    """A :data:`HARDWARE` entry by key (``h100``) or by a device name (``NVIDIA H200``)."""
    key = gpu.lower()
    if key in HARDWARE:
        return HARDWARE[key]
    for candidate in HARDWARE:
        if candidate in key.replace(" ", ""):
            return HARDWARE[candidate]
    raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(HARDWARE)}")


# --------------------------------------------------------------------------------------------
# Parameters, counted on the meta device
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterLayout:
    """Parameter counts of one model by where they live: embeddings, each block's dense and expert part."""

    total: int
    word_embedding: int
    position_embedding: int
    top_query_embedding: int
    final_norm: int
    block_dense: tuple[int, ...]  # per layer, bottom-up, the query layer last
    block_experts: tuple[int, ...]  # per layer: all routed experts of that layer
    per_expert: int
    experts_per_layer: int


@lru_cache(maxsize=16)
def _layout_of(config_json: str) -> ParameterLayout:
    config = PanguConfig.model_validate_json(config_json)
    with on_meta():
        model = PanguModel(config)
    layers = config.num_layers
    dense = [0] * layers
    experts = [0] * layers
    singles = {"word_embedding.": 0, "position_embedding.": 0, "top_query_embedding.": 0, "final_norm.": 0}
    total = 0
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        total += count
        if name.startswith("blocks."):
            index = int(name.split(".")[1])
        elif name.startswith("query_layer."):
            index = layers - 1
        else:
            prefix = next((p for p in singles if name.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"planner: parameter {name} has no place in the layout")
            singles[prefix] += count
            continue
        (experts if ".ffn.experts." in name else dense)[index] += count
    sparse = sum(1 for e in experts if e)
    per_layer = config.total_experts
    return ParameterLayout(
        total=total,
        word_embedding=singles["word_embedding."],
        position_embedding=singles["position_embedding."],
        top_query_embedding=singles["top_query_embedding."],
        final_norm=singles["final_norm."],
        block_dense=tuple(dense),
        block_experts=tuple(experts),
        per_expert=sum(experts) // (sparse * per_layer) if sparse and per_layer else 0,
        experts_per_layer=per_layer if sparse else 0,
    )


def parameter_layout(config: "PanguConfig") -> ParameterLayout:
    """Counts from the module tree on the meta device (cached per config)."""
    return _layout_of(config.model_dump_json())


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
class PlanDoesNotFit(ValueError):
    """The run cannot fit the machines; the message names every reason with its numbers."""

    def __init__(self, plan: "Plan") -> None:
        self.plan = plan
        super().__init__(
            f"{plan.preset} on {plan.cluster['nodes']} × {plan.cluster['gpus_per_node']} {plan.gpu_name} does not "
            "fit: " + "; ".join(plan.reasons)
        )


@dataclass
class Plan:
    """What `plan_training` found. Byte figures are ints, times seconds; `to_dict()` is the JSON."""

    preset: str
    model: str
    gpu: str
    gpu_name: str
    cluster: dict[str, int]
    parallel: dict[str, int]
    training: dict[str, Any]
    parameters: dict[str, int]
    gpu_breakdown: dict[str, int]  # per GPU, the worst stage, by item
    gpu_phases: dict[str, int]
    host_breakdown: dict[str, int]  # per GPU (the busiest)
    host_phases_per_node: dict[str, int]
    transfers: dict[str, int]  # bytes per GPU per step
    times: dict[str, float]  # seconds per step
    fits: bool
    gpu_bytes_per_gpu: int
    gpu_capacity_bytes: int
    gpu_usable_bytes: int
    host_bytes_per_node: int
    host_capacity_bytes: int | None
    host_usable_bytes: int | None
    h2d_bytes_per_gpu_per_step: int
    step_time_s: float | None  # None for CPU processes (the table's speeds are GPUs')
    mfu: float | None
    tokens_per_step: int
    tokens_per_s: float | None
    checkpoint_bytes_per_node: int = 0  # node 0, the busiest writer
    checkpoint_s: float = 0.0  # at CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE
    d2h_bytes_per_gpu_per_step: int = 0
    # what PCIe moves, each way, in the step's dense compute (times["compute_dense"]): what the
    # transfers would have to fit in to hide under compute (times says how much of them does)
    h2d_link_bytes_in_dense_compute: int = 0
    d2h_link_bytes_in_dense_compute: int = 0
    ecss: dict[str, Any] = field(default_factory=dict)  # experts per sparse layer an ECSS step moves (EcssRouting)
    # sparse models: the same run with the model's dense base shape (router dense, ECSS off, expert 1);
    # step_time_ratio = this plan's step time / the counterpart's
    dense_counterpart: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    host_breakdown_per_node: dict[str, int] = field(default_factory=dict)  # its GPUs' sums
    host_phases_per_gpu: dict[str, int] = field(default_factory=dict)  # the busiest GPU

    @property
    def host_bytes_per_gpu(self) -> int:
        return self.host_bytes_per_node // max(1, self.cluster["gpus_per_node"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _ring(kind: str, size: int) -> float:
    """Bytes each rank sends per byte of buffer, ring algorithms."""
    if size <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (size - 1) / size


def _shown_after_backward(total: float, block_experts: tuple[int, ...], backward: float) -> float:
    """ECSS gradients back (`pangu_model.ecss`): each sparse layer's share of `total` (its exchange and its
    copy to the host) starts once the backward, every block an equal part of it from the top down, has
    passed that layer, and once the layer above's share is done; what ends after the backward shows."""
    sparse = [i for i, experts in enumerate(block_experts) if experts]
    if not sparse or total <= 0:
        return 0.0
    per_block, share, end = backward / len(block_experts), total / len(sparse), 0.0
    for i in sorted(sparse, reverse=True):
        end = max(end, (len(block_experts) - i) * per_block) + share
    return max(0.0, end - backward)


def _group_bandwidth(groups: list[list[int]], gpus_per_node: int, hw: Hardware) -> float:
    inside = all(len({r // gpus_per_node for r in g}) == 1 for g in groups[:1])
    return hw.nvlink_bytes_per_s if inside else hw.network_bytes_per_s


def _stage_bounds(num_layers: int, stage: int, pp: int) -> tuple[int, int]:
    """[first, last + 1) of the layers of `stage` (the trainer's split, uneven where pp does not divide)."""
    counts = stage_layers(num_layers, pp)
    first = sum(counts[:stage])
    return first, first + counts[stage]


def _stage_params(layout: ParameterLayout, stage: int, pp: int) -> tuple[int, int]:
    """(dense, routed-expert) parameters of one pipeline stage."""
    lo, hi = _stage_bounds(len(layout.block_dense), stage, pp)
    dense = sum(layout.block_dense[lo:hi])
    experts = sum(layout.block_experts[lo:hi])
    if stage == 0:
        dense += layout.word_embedding + layout.position_embedding
    if stage == pp - 1:
        dense += layout.final_norm + layout.top_query_embedding
        if pp > 1:
            dense += layout.word_embedding  # the tied head's copy on the last stage
    return dense, experts


# --------------------------------------------------------------------------------------------
# ECSS: which experts a step moves (module docstring, "Fetched experts per step")
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EcssRouting:
    """Experts per sparse layer that one ECSS step moves, on the worst rank and the largest block."""

    sharded: bool  # ecss_shard_states with more than one replica
    domain_affine: bool
    mixture: str  # the domain weights the expectations use, in words
    shard: int  # S: experts of a layer on one expert-parallel rank
    replicas: int  # R: ranks holding the same shard (1 without sharded host state)
    owned: int  # experts of a layer whose masters + Adam states a rank keeps (the largest block)
    fetched: int  # A: experts of a layer a rank computes with (device copies)
    union: int  # U: experts of a layer an owner copies host→device and steps (its block's union)
    asked: int  # Q: rows of a layer asked of the largest block by all replicas (0 without sharding)
    union_expected: float  # E|U| (the figure above is its bound, the whole block)
    asked_expected: float  # E[Q]
    why: str  # one sentence for the notes
    node_blocks: tuple[int, ...] = ()  # experts of a layer each rank of the busiest node owns (sharded)


def _domain_weights(train_config: "TrainConfig", domains: int) -> tuple[list[float], str]:
    """The sampling weight of each of the model's domains, as far as the config says: a name → weight
    map or a named mixture (tokenizer.dataset.MIXTURE_PRESETS) gives its weights (domains without one get
    none), "natural" (tokens per domain of the data, unknown here) or None a uniform mixture."""
    mixture = train_config.mixture
    if isinstance(mixture, str) and mixture != "natural":
        from tokenizer.dataset import MIXTURE_PRESETS

        mixture = MIXTURE_PRESETS.get(mixture, None)
    if isinstance(mixture, dict) and sum(mixture.values()) > 0:
        total = sum(mixture.values())
        weights = sorted((w / total for w in mixture.values()), reverse=True)[:domains]
        return weights + [0.0] * (domains - len(weights)), (
            f"the mixture's {len(mixture)} weights, heaviest domains on the worst block")
    why = "uniform over the model's domains" + (" (mixture 'natural' follows the data's tokens, unknown to the "
                                                 "planner)" if train_config.mixture in (None, "natural") else "")
    return [1.0 / domains] * domains, why


def _worst_pairing(counts: list[int], values: list[float]) -> float:
    """Σ counts·values with the largest counts on the largest values (the domain ids are not known)."""
    return sum(c * v for c, v in zip(sorted(counts, reverse=True), sorted(values, reverse=True)))


def _worst_slots(counts: list[int], caps: list[int], nodes: int) -> int:
    """The most rows one step's nodes can ask of a block whose domains hold `counts` experts: domain d is
    on at most caps[d] nodes, and a step has `nodes` (one domain each), the largest counts served first."""
    total, left = 0, nodes
    for count, cap in zip(sorted(counts, reverse=True), sorted(caps, reverse=True)):
        take = min(cap, left)
        total, left = total + count * take, left - take
    return total


def _ecss_routing(train_config: "TrainConfig", model: "PanguConfig", ep: int, dp: int, nodes: int,
                  sharded: bool) -> EcssRouting:
    """A, U and Q per sparse layer (module docstring); 0 experts for a model without RRE layers."""
    b, s, gas = train_config.micro_batch_size, train_config.row_length, train_config.gradient_accumulation_steps
    active = max(1, model.experts_active_per_token)
    affine = train_config.domain_affine if train_config.domain_affine is not None else model.router == "rre"
    domains, per_domain = model.num_domains, model.experts_per_domain
    total = model.total_experts
    shard = total // ep if total else 0
    replicas = max(1, dp // ep) if sharded else 1
    weights, mixture = _domain_weights(train_config, domains)
    if not shard or model.router != "rre":
        return EcssRouting(sharded, affine, mixture, shard, replicas, 0, 0, 0, 0, 0.0, 0.0, "")
    if not sharded:
        # Every replica keeps and steps the whole shard, so the replicas agree on what they update: the
        # routed sets of every data-parallel rank are united (the world's tokens reach every expert).
        fetched = min(shard, b * s * gas * dp * active)
        why = (f"the routed sets of all {dp} data-parallel ranks are united ({b * s * gas * dp:,} tokens per step)"
               if dp > 1 else f"the rank's own {b * s * gas:,} tokens per step")
        return EcssRouting(False, affine, mixture, shard, 1, shard, fetched, fetched, 0, float(fetched), 0.0, why)

    # domain of every expert id, and of every expert of every shard (PanguConfig.expert_layout)
    grid = rre_expert_ids(torch.arange(domains).repeat_interleave(per_domain), torch.arange(per_domain).repeat(domains),
                          domains, per_domain, model.expert_layout)
    domain_of = [0] * total
    for index, expert in enumerate(grid.tolist()):
        domain_of[expert] = index // per_domain
    shards = [domain_of[r * shard:(r + 1) * shard] for r in range(ep)]
    bounds = [j * shard // replicas for j in range(replicas + 1)]  # ecss.HostExpertBank.bounds
    owned = max(hi - lo for lo, hi in zip(bounds, bounds[1:]))
    blocks = [list(Counter(sh[lo:hi]).values()) for sh in shards for lo, hi in zip(bounds, bounds[1:])]
    group_tokens = b * s * gas * ep * active  # an expert-parallel group's token assignments per step
    rows_group, rows_step = b * gas * ep, b * gas * dp
    per_node = max(1, replicas // max(1, nodes))  # replicas of a shard in one node: one domain per node
    if affine:
        # One domain per node and step: a rank fetches that domain's experts of its shard. The schedule
        # (tokenizer.dataset.affine_schedule) gives domain d ⌈nodes·w_d⌉ nodes of a step at most, nodes·w_d
        # on average, and puts a domain with nodes·w_d ≥ 1 in every step.
        most = max(max(Counter(sh).values()) for sh in shards)
        fetched = min(most, shard, group_tokens)
        caps = [min(nodes, math.ceil(nodes * w - 1e-9)) for w in weights]
        present = [min(1.0, nodes * w) for w in weights]
        asked = max(_worst_slots(c, caps, nodes) for c in blocks) * per_node
        asked_mean = max(_worst_pairing(c, [nodes * w * per_node for w in weights]) for c in blocks)
        why = (f"domain-affine steps: all rows of a node come from one domain, whose {most} experts per layer on "
               f"this rank ({model.expert_layout} layout: {per_domain} per domain over {ep} ranks) are the ones "
               f"fetched")
    else:
        # Independent rows: the expert-parallel group's rows bring about Σ_d (1 − (1 − w_d)^n) domains.
        chance = [1.0 - (1.0 - w) ** rows_group for w in weights]
        expected = max(_worst_pairing(list(Counter(sh).values()), chance) for sh in shards)
        fetched = min(shard, group_tokens, math.ceil(expected - 1e-9))
        asked_mean = max(_worst_pairing(c, [replicas * x for x in chance]) for c in blocks)
        asked = min(replicas * owned, math.ceil(asked_mean - 1e-9))
        present = [1.0 - (1.0 - w) ** rows_step for w in weights]
        distinct = sum(chance)
        why = (f"independent rows: the {rows_group} rows of the expert-parallel group bring {distinct:.1f} of the "
               f"{domains} domains on average ({mixture}), so about {fetched} of the shard's {shard} experts per "
               f"layer (an expectation)")
    union_mean = max(_worst_pairing(c, present) for c in blocks)
    # ecss.owned_block: the owner of replica index r in shard e owns block (r + e) mod R; a node holds
    # whole expert-parallel groups with consecutive replica indices, so its ranks own consecutive blocks.
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    groups_per_node = max(1, replicas // max(1, nodes))
    node_blocks = max((tuple(sizes[(r + e) % replicas] for r in range(n * groups_per_node, (n + 1) * groups_per_node)
                             for e in range(ep)) for n in range(max(1, nodes))), key=sum)
    return EcssRouting(True, affine, mixture, shard, replicas, owned, fetched, owned, asked, union_mean,
                       asked_mean, why, node_blocks)


def _math_attention_bytes(model: PanguConfig, b: int, s: int, tp: int, mixed: bool) -> int:
    """What one layer's attention keeps for backward, beyond Korthikanti's flash-kernel count, where
    ``F.scaled_dot_product_attention`` runs its math kernel (the CPU): per head, the fp32 softmax output, and
    with dropout its 1-byte mask and the fp32 dropped probabilities (Korthikanti's ``5·a·s²·b`` term, in fp32);
    under bf16/fp16 also the fp32 copies of q, k, v and the output that ``model.py`` makes for an fp32 softmax.
    Measured on 350m (bf16, seq 1024, dropout 0.1, one CPU process): peak RSS 11.0 / 16.5 GiB at micro-batch
    1 / 2, planned 11.7 / 16.8 GiB with this term (7.8 / 9.1 GiB without)."""
    per_head = 9 if model.dropout > 0 else 4
    upcast = 16 * b * s * model.d_model // tp if mixed else 0
    return math.ceil(model.num_heads / tp) * b * s * s * per_head + upcast


def plan_training(
    train_config: "TrainConfig",
    cluster: ClusterSpec,
    parallel: ParallelPlan,
    gpu: str = "h100",
    host_ram_gb: float | None = None,
    gpu_memory_bytes: int | None = None,
    host_ram_bytes: int | None = None,
    check_host: bool = True,
    dense_counterpart: bool = True,
    cpu_processes: bool = False,
) -> Plan:
    """The memory and time plan of `train_config` on `cluster` with `parallel` (see the module docstring).

    `host_ram_gb` (decimal GB) or `host_ram_bytes` replace the table's host RAM per node,
    `gpu_memory_bytes` the GPU's memory (the real device's, at start). A sparse model's plan carries its
    dense counterpart's step time (`dense_counterpart`: see :func:`dense_counterpart_config`).
    `cpu_processes`: the ranks compute on the CPU, where the attention kernel (the math one) keeps the
    attention probabilities and an allocation costs memory only where it is written. Raises
    ValueError when the parallel plan is not valid for the model or the cluster.
    """

    hw = hardware(gpu)
    model = train_config.pangu_config()
    layout = parameter_layout(model)
    parallel = _checked_parallel(parallel, model, cluster)
    tp, pp, ep, dp = parallel.tp, parallel.pp, parallel.ep, parallel.dp
    gpn, world = cluster.gpus_per_node, cluster.world_size
    groups = Layout.build(cluster, parallel).groups()

    p = {"fp32": 4, "bf16": 2, "fp16": 2}[train_config.precision]
    mixed = p < 4
    zero = train_config.zero_stage
    offload = train_config.offload_optimizer
    ecss = train_config.ecss
    b, s, gas = train_config.micro_batch_size, train_config.row_length, train_config.gradient_accumulation_steps
    h, vocab = model.d_model, model.vocab_size
    recompute = model.gradient_checkpointing
    tokens_per_step = b * s * gas * dp
    active = max(1, model.experts_active_per_token)
    layers_per_stage = max(stage_layers(model.num_layers, pp))  # the busiest stage sets the pace
    notes: list[str] = []
    reasons: list[str] = []

    state_bytes = 12 if mixed else 8  # fp32 master (mixed precision only) + Adam m, v
    dense_shard = dp if zero >= 1 else 1
    expert_shard = max(1, dp // ep) if zero >= 1 else 1
    bucket = 2 * int(train_config.reduce_bucket_size) * p if zero >= 1 else 0
    # ECSS with sharded host state (`ecss_shard_states`): each of the dp/ep replicas of an expert shard keeps
    # the masters and Adam states of its block only; a rank fetches its expert-parallel group's routed set.
    shard_states = ecss and bool(train_config.ecss_shard_states) and dp // ep > 1
    routing = _ecss_routing(train_config, model, ep, dp, cluster.nodes, shard_states) if ecss else None

    def device_for_stage(stage: int) -> dict[str, Any]:
        dense_stage, experts_stage = _stage_params(layout, stage, pp)
        dense = math.ceil(dense_stage / tp)
        experts_rank = experts_stage // ep  # this rank's shard of the stage's routed experts
        first, last = _stage_bounds(model.num_layers, stage, pp)
        stage_sparse = sum(1 for e in layout.block_experts[first:last] if e)
        stage_layer_count = last - first
        experts_on_rank_per_layer = layout.experts_per_layer // ep if stage_sparse else 0
        if not stage_sparse:
            fetched_per_layer = 0
        elif routing is not None:
            fetched_per_layer = routing.fetched
        else:
            fetched_per_layer = min(experts_on_rank_per_layer, b * s * gas * dp * active)
        fetched = fetched_per_layer * layout.per_expert * stage_sparse if ecss else 0  # A: device copies
        # U: the rows an owner uploads and steps; Q: the rows all replicas ask of its block (sharded state)
        union = routing.union * layout.per_expert * stage_sparse if shard_states and routing else fetched
        asked = routing.asked * layout.per_expert * stage_sparse if shard_states and routing else 0
        device_experts = 0 if ecss else experts_rank
        out: dict[str, int] = {}
        if zero >= 3:
            out["parameters"] = p * math.ceil(dense / dense_shard) + p * math.ceil(device_experts / expert_shard)
            out["zero3_live_parameters"] = p * int(min(ZERO3_LIVE_PARAMETERS, dense + device_experts))
        else:
            out["parameters"] = p * (dense + device_experts)
        if zero >= 2:
            out["gradients"] = p * (math.ceil(dense / dense_shard) + math.ceil(device_experts / expert_shard))
        else:
            out["gradients"] = p * (dense + device_experts)
        opt_elems = math.ceil(dense / dense_shard) + math.ceil(device_experts / expert_shard)
        out["optimizer_states"] = 0 if offload else state_bytes * opt_elems
        if cpu_processes:
            # DeepSpeed allocates whole buckets, but host pages cost memory only once written, and a bucket is
            # written with this rank's gradients: never more than all of them (a small model's are small).
            out["zero_buckets"] = min(bucket, 2 * p * (dense + device_experts))
        else:
            out["zero_buckets"] = bucket
        in_flight = min(pp - stage, gas) if pp > 1 else 1
        sbh = s * b * h
        full_layer = sbh * (4 * p + 2) + math.ceil(12 * p * sbh / tp)
        if cpu_processes:
            full_layer += _math_attention_bytes(model, b, s, tp, mixed)
        if recompute:
            out["activations"] = p * sbh * stage_layer_count * in_flight + full_layer
        else:
            out["activations"] = full_layer * stage_layer_count * in_flight
        out["logits"] = math.ceil(b * s * vocab / tp) * (p + 12) if stage == pp - 1 else 0
        out["ecss_fetched_weights_and_grads"] = 2 * p * fetched
        # _fetch_from_owners: the uploaded union, the outgoing rows (picked, then concatenated), the inbound
        out["ecss_fetch_exchange_buffers"] = p * (union + 2 * asked + fetched) if shard_states else 0
        # Gradients back, per sparse layer from its hook (ExpertOffload._send): with sharded state its rows
        # concatenated to send (compute dtype), the replicas' rows inbound and the fp32 per-expert sums; with
        # replicas and unsharded state the fp32 copies and their concatenation, all-reduced; without
        # replicas nothing (the copy reads the gradients). Each layer's are freed once the copy stream has
        # passed its copy; counted for every sparse layer (a bound: the link behind the whole backward).
        if shard_states:
            out["ecss_gradient_return_buffers"] = p * fetched + p * asked + 4 * union
        else:
            out["ecss_gradient_return_buffers"] = ((4 if mixed else 0) + 4) * fetched if dp // ep > 1 else 0
        out["dense_step_fp32_gradients"] = 0 if offload or not mixed else 4 * opt_elems
        static = out["parameters"] + out.get("zero3_live_parameters", 0) + out["gradients"] + out["optimizer_states"]
        phases = {
            "forward_backward": static + out["zero_buckets"] + out["activations"] + out["logits"] + 2 * p * fetched,
            "dense_optimizer_step": static + out["zero_buckets"] + out["dense_step_fp32_gradients"] + 2 * p * fetched,
        }
        if shard_states:
            phases["ecss_fetch"] = static + p * fetched + out["ecss_fetch_exchange_buffers"]
        if ecss:
            # The lowest expert layer's return starts with every return above it still in flight (the bound
            # above) and the activations of the blocks below it still held.
            below = next((i for i, e in enumerate(layout.block_experts[first:last]) if e), stage_layer_count)
            phases["ecss_gradient_return"] = (static + out["zero_buckets"] + 2 * p * fetched
                                              + out["ecss_gradient_return_buffers"]
                                              + out["activations"] * below // max(1, stage_layer_count))
        if tp == 1 and pp == 1:
            # Export: rank 0 assembles every dense fp32 master on the device (safe_get_full_fp32_param).
            phases["export_rank0"] = static + 4 * dense
        return {"stage": stage, "dense": dense, "experts_rank": experts_rank, "fetched": fetched,
                "union": union, "asked": asked,
                "fetched_per_layer": fetched_per_layer, "sparse_layers": stage_sparse,
                "breakdown": out, "phases": phases, "gpu_bytes": max(phases.values())}

    stages = [device_for_stage(i) for i in range(pp)]
    worst = max(stages, key=lambda st: st["gpu_bytes"])
    dense, experts_rank, fetched = worst["dense"], worst["experts_rank"], worst["fetched"]
    union, asked = worst["union"], worst["asked"]

    # ---- host, per GPU ------------------------------------------------------------------------
    host: dict[str, int] = {}
    # With sharded host state a rank keeps its block (the largest: ceil(S / R) experts per layer) and
    # uploads and steps the union U of what its replicas asked of it; without, its shard and the fetched set.
    sparse_here = worst["sparse_layers"]
    if shard_states and routing is not None:
        host_experts = routing.owned * layout.per_expert * sparse_here
    else:
        host_experts = experts_rank if ecss else 0
    owned_fetched = union  # parameters that cross PCIe each way and that CPU Adam updates, per GPU
    # Bytes per parameter the gradients come back in (ExpertOffload._return_dtype): the compute dtype
    # where no replica adds to them, fp32 sums otherwise
    grad_back = p if ecss and not shard_states and dp // ep == 1 else 4
    delayed = ecss and bool(getattr(train_config, "ecss_delayed_update", False))
    sparse_layers = max(1, worst["sparse_layers"])
    largest_module = max(layout.word_embedding, h * model.d_ff + model.d_ff,
                         0 if ecss else experts_rank // sparse_layers)

    def host_of(kept: int, stepped: int) -> tuple[dict[str, int], dict[str, int], int]:
        """Host bytes of a GPU that keeps `kept` expert parameters and steps `stepped` a step: its items,
        its phases and what stays resident."""
        items: dict[str, int] = {}
        if ecss:
            items["ecss_fp32_masters"] = 4 * kept
            if p < 4:  # under fp32 the masters are the shadows
                items["ecss_compute_dtype_shadows"] = p * kept
            items["ecss_adam_moments"] = 8 * kept
            # pinned, kept from step to step; a delayed update reads one while the next step lands in another
            items["ecss_gradient_landing"] = grad_back * stepped * (2 if delayed else 1)
            if grad_back < 4:  # compute-dtype gradients widened into their own fp32 copy (fp32 sums: in place)
                items["ecss_step_fp32_gradients"] = 4 * stepped
            items["ecss_checkpoint_moment_copies"] = 8 * kept
            items["ecss_resume_loaded_state"] = 12 * kept
        if offload:
            opt_elems = math.ceil(dense / dense_shard) + (0 if ecss else math.ceil(experts_rank / expert_shard))
            items["offload_optimizer_states"] = (state_bytes + 4) * opt_elems  # + the fp32 gradient partition
        # build_model (pangu_model.materialize): one module at a time in fp32 on the host, then on its
        # device; with ECSS the experts are built on the host. Without sharded state the rank's whole shard
        # stays there until ExpertOffload copies it into pinned masters, layer by layer, dropping each
        # layer's bank. With sharded state each layer's shard is cut to the rank's block as soon as it is
        # made (`keep_block`): one layer's shard beside the blocks made so far, then ExpertOffload's masters
        # beside the blocks.
        build = 4 * largest_module
        if ecss and worst["sparse_layers"] and shard_states:
            build += max(4 * kept + 4 * experts_rank // sparse_layers, 8 * kept)
        elif ecss and worst["sparse_layers"]:
            build += 4 * experts_rank + 4 * kept // sparse_layers
        items["startup_model_build"] = build
        shadows = items.get("ecss_compute_dtype_shadows", 0)
        held = items.get("ecss_fp32_masters", 0) + shadows + items.get("ecss_adam_moments", 0) + items.get(
            "ecss_gradient_landing", 0) + items.get("offload_optimizer_states", 0)
        phases = {"startup": build, "step": held + items.get("ecss_step_fp32_gradients", 0)}
        if ecss:
            phases["checkpoint_save"] = held + items["ecss_checkpoint_moment_copies"]
            phases["resume"] = 4 * kept + shadows + items["ecss_resume_loaded_state"] + 8 * kept \
                + items.get("offload_optimizer_states", 0)
        return items, phases, held

    host, host_phases, resident = host_of(host_experts, owned_fetched)
    # A node: its GPUs' sums. With sharded state they own blocks of different sizes (ecss.owned_block
    # rotates the blocks so that each node owns about the same number); the worst GPU above is the largest.
    if shard_states and routing is not None and routing.node_blocks:
        per_block = layout.per_expert * sparse_here
        gpu_kinds = [host_of(size * per_block, size * per_block) for size in routing.node_blocks]
        node_union = sum(routing.node_blocks) * per_block  # the node's owners' uploads and updates
    else:
        gpu_kinds = [(host, host_phases, resident)] * gpn
        node_union = gpn * owned_fetched
    host_phases_per_node = {k: sum(kind[1][k] for kind in gpu_kinds) for k in host_phases}
    host_phases_per_node["resident"] = sum(kind[2] for kind in gpu_kinds)
    host_bytes_per_node = max(host_phases_per_node.values())

    # ---- transfers and time per step ---------------------------------------------------------
    peak = hw.peak_flops(train_config.precision)
    rate = peak * hw.compute_efficiency
    model_flops = flops_per_token(model, s) * tokens_per_step / world
    sparse_total = model.moe_layers if model.router != "dense" else 0
    expert_flops = (6.0 * 2 * h * model.expert_width * active * sparse_total * tokens_per_step / world
                    if sparse_total else 0.0)
    factor = 4.0 / 3.0 if recompute else 1.0
    t_dense = factor * (model_flops - expert_flops) / rate
    # the experts' weights that the step's GEMMs read: fetched (ECSS) or those the tokens reach
    expert_weights_used = worst["fetched_per_layer"] * layout.per_expert * worst["sparse_layers"]
    t_expert_flops = factor * expert_flops / rate
    t_expert_hbm = 3 * p * expert_weights_used * gas / hw.hbm_bytes_per_s
    t_expert = max(t_expert_flops, t_expert_hbm)
    bubble = (gas + pp - 1) / gas
    compute = (t_dense + t_expert) * bubble

    dp_bw = _group_bandwidth(groups["data"], gpn, hw)
    grad_bytes = p * dense
    exp_dp = max(1, dp // ep)
    exp_bw = _group_bandwidth(groups["expert_data"], gpn, hw) if ep > 1 else dp_bw
    device_experts = 0 if ecss else experts_rank
    times: dict[str, float] = {"compute_dense": t_dense, "compute_experts": t_expert}
    if pp > 1:
        times["pipeline_bubble"] = compute - (t_dense + t_expert)
    if zero == 0:
        reduce_t = (_ring("all_reduce", dp) * grad_bytes / dp_bw
                    + _ring("all_reduce", exp_dp) * p * device_experts / exp_bw)
        gather_t = 0.0
    else:
        reduce_t = (_ring("reduce_scatter", dp) * grad_bytes / dp_bw
                    + _ring("reduce_scatter", exp_dp) * p * device_experts / exp_bw) * (gas if zero >= 2 else 1)
        gather_t = (_ring("all_gather", dp) * p * dense / dp_bw
                    + _ring("all_gather", exp_dp) * p * device_experts / exp_bw)
    if zero >= 3:
        # parameters gathered for the forward and again for the backward of every micro-batch, prefetched
        reduce_t += 2 * gas * (_ring("all_gather", dp) * p * dense / dp_bw)
    backward = (2.0 / 3.0) * compute
    times["gradient_reduction_exposed"] = max(0.0, reduce_t - backward)
    times["parameter_all_gather"] = gather_t
    sbh = s * b * h
    times["tensor_parallel"] = (4 + (2 if recompute else 0)) * layers_per_stage * gas * _ring(
        "all_reduce", tp) * p * sbh / hw.nvlink_bytes_per_s
    if ep > 1 and worst["sparse_layers"]:
        ep_bw = _group_bandwidth(groups["expert"], gpn, hw)
        times["expert_all_to_all"] = 4 * worst["sparse_layers"] * gas * (ep - 1) / ep * p * sbh * active / ep_bw
    if pp > 1:
        pp_bw = _group_bandwidth(groups["pipeline"], gpn, hw)
        times["pipeline_send_receive"] = 2 * gas * p * math.ceil(sbh / tp) / pp_bw
    transfers: dict[str, int] = {"h2d": 0, "d2h": 0}
    if ecss:
        # Each rank (with sharded state: each owner, for the union of what its replicas asked of its block)
        # copies the compute-dtype shadows host→device. With sharded state the rows then reach the replicas
        # that asked for them by one all-to-all in the compute dtype, and the gradients return to their
        # owners by an all-to-all per sparse layer, in the compute dtype too; an all-to-all lasts as long as
        # its busiest rank's larger direction: the owner of the largest block sends Q rows, every rank
        # receives its A rows.
        replica_bw = _group_bandwidth(groups["expert_data"], gpn, hw) if ep > 1 else dp_bw
        transfers["ecss_fetch_h2d"] = p * owned_fetched
        transfers["ecss_gradients_d2h"] = grad_back * owned_fetched
        fetch_dram = p * node_union / hw.host_dram_bytes_per_s
        times["ecss_fetch_h2d"] = max(p * owned_fetched / hw.pcie_h2d_bytes_per_s, fetch_dram)
        times["ecss_gradients_d2h"] = max(grad_back * owned_fetched / hw.pcie_d2h_bytes_per_s,
                                          grad_back * node_union / hw.host_dram_bytes_per_s)
        if shard_states and routing is not None:
            sparse_here = worst["sparse_layers"]
            replicas = routing.replicas
            # plan(): int32 routed masks all-reduced (MAX) over the expert-parallel group; _exchange_plan():
            # int32 active masks of the shard all-gathered over the replica group
            plan_masks = _ring("all_reduce", ep) * 4 * sparse_here * layout.experts_per_layer
            exchange_masks = (replicas - 1) * 4 * sparse_here * routing.shard
            transfers["ecss_routing_masks"] = int(plan_masks + exchange_masks)
            ep_bw = _group_bandwidth(groups["expert"], gpn, hw) if ep > 1 else hw.nvlink_bytes_per_s
            times["ecss_routing_masks"] = plan_masks / ep_bw + exchange_masks / replica_bw
            transfers["ecss_owner_all_to_all_sent"] = p * asked
            transfers["ecss_owner_all_to_all_received"] = p * fetched
            transfers["ecss_gradient_all_to_all_sent"] = p * fetched  # in the compute dtype
            transfers["ecss_gradient_all_to_all_received"] = p * asked
            times["ecss_owner_all_to_all"] = p * max(asked, fetched) / replica_bw
            times["ecss_gradient_all_to_all"] = p * max(asked, fetched) / replica_bw
            # The owners' copies (copy stream) and the all-to-all (asynchronous) run while the layers below
            # the first expert layer compute their forward; that layer waits. Only the rest shows.
            first_sparse = next((i for i, e in enumerate(layout.block_experts) if e), len(layout.block_experts))
            window = t_dense / 3 * first_sparse / max(1, len(layout.block_experts))  # forward: 1/3 of the FLOPs
            h2d, a2a = times["ecss_fetch_h2d"], times["ecss_owner_all_to_all"]
            times["ecss_fetch_h2d"] = max(0.0, h2d - window)
            times["ecss_owner_all_to_all"] = max(0.0, h2d + a2a - window) - times["ecss_fetch_h2d"]
            if not cpu_processes:  # a time from the table's GPU speeds
                notes.append(f"ECSS fetch: the owners' copies and the all-to-all ({_fmt_time(h2d + a2a)}) overlap "
                             f"the forward of the {first_sparse} layers below the first expert layer "
                             f"({_fmt_time(window)}); {_fmt_time(max(0.0, h2d + a2a - window))} shows")
        else:
            transfers["ecss_gradient_all_reduce"] = int(_ring("all_reduce", exp_dp) * 4 * fetched)
            times["ecss_gradient_all_reduce"] = transfers["ecss_gradient_all_reduce"] / replica_bw
        # Gradients back: each sparse layer's exchange and copy start from its hooks in the last
        # micro-batch's backward; only what ends after that backward shows, charged to the exchange first.
        exchange = "ecss_gradient_all_to_all" if "ecss_gradient_all_to_all" in times else "ecss_gradient_all_reduce"
        back = times[exchange] + times["ecss_gradients_d2h"]
        last_backward = (2.0 / 3.0) * (t_dense + t_expert) / gas
        shown = _shown_after_backward(back, layout.block_experts, last_backward)
        times[exchange] = min(times[exchange], shown)
        times["ecss_gradients_d2h"] = shown - times[exchange]
        if not cpu_processes:  # a time from the table's GPU speeds
            notes.append(f"ECSS gradients back: each expert layer's exchange and copy to the host "
                         f"({_fmt_time(back)} in all) start from its hooks in the last backward "
                         f"({_fmt_time(last_backward)}), beside the backward of the layers below it; "
                         f"{_fmt_time(shown)} shows")
        # The stepped rows' shadows follow their masters (read the master, write the shadow); separate
        # shadows exist under bf16/fp16, and under fp32 too when the update is delayed.
        refresh = (4 + p) if p < 4 or delayed else 0
        adam = ADAM_BYTES_TOUCHED * node_union / hw.host_dram_bytes_per_s
        shadow = refresh * node_union / hw.host_dram_bytes_per_s
        # The gradients' multiply (unscale, average, clip) reads what landed and writes fp32: one pass.
        scale = (grad_back + 4) * node_union / hw.host_dram_bytes_per_s
        if delayed:
            # The multiply, Adam and then the shadow refresh run on a worker thread beside the next step:
            # only what outlasts the rest of that step shows.
            rest = sum(times.values())
            host_work = scale + adam + shadow
            times["ecss_cpu_adam"] = max(0.0, host_work - rest)
            if not cpu_processes:  # a time from the table's GPU speeds
                notes.append(f"ECSS delayed host update: the gradients' multiply, CPU Adam and the shadow refresh "
                             f"({_fmt_time(host_work)}) run beside the next step ({_fmt_time(rest)} without them); "
                             f"{_fmt_time(times['ecss_cpu_adam'])} of it shows. A step computes with the masters "
                             f"after the update two steps back")
        else:
            times["ecss_gradient_scale"] = scale
            times["ecss_cpu_adam"] = adam
            times["ecss_shadow_refresh"] = shadow
        transfers["h2d"] += transfers["ecss_fetch_h2d"]
        transfers["d2h"] += transfers["ecss_gradients_d2h"]
    if offload:
        opt_elems = math.ceil(dense / dense_shard) + (0 if ecss else math.ceil(experts_rank / expert_shard))
        transfers["offload_gradients_d2h"] = p * opt_elems
        transfers["offload_parameters_h2d"] = p * opt_elems
        transfers["h2d"] += p * opt_elems
        transfers["d2h"] += p * opt_elems
        times["offload_copies"] = 2 * p * opt_elems / hw.pcie_h2d_bytes_per_s
        times["offload_cpu_adam"] = gpn * ADAM_BYTES_TOUCHED * opt_elems / hw.host_dram_bytes_per_s
    step_time = sum(times.values())  # compute, bubble, and every term that is not overlapped
    times["compute"] = compute  # with the bubble; not a term of its own
    mfu = model_flops / (step_time * peak) if step_time > 0 else 0.0

    # ---- fits --------------------------------------------------------------------------------
    capacity = int(gpu_memory_bytes) if gpu_memory_bytes else hw.memory_bytes
    usable = int(capacity * (1 - GPU_RESERVE_FRACTION))
    gpu_bytes = worst["gpu_bytes"]
    if gpu_bytes > usable:
        phase = max(worst["phases"], key=worst["phases"].get)
        where = f", pipeline stage {worst['stage']}" if pp > 1 else ""
        reasons.append(
            f"GPU memory: {fmt_bytes(gpu_bytes)} per GPU at its peak ({phase.replace('_', ' ')}{where}) > "
            f"{fmt_bytes(usable)} usable of {fmt_bytes(capacity)} ({hw.name}, {GPU_RESERVE_FRACTION:.0%} reserve); "
            "largest items " + _largest_items(worst["breakdown"])[1]
        )
    host_capacity: int | None
    if host_ram_bytes:
        host_capacity = int(host_ram_bytes)
    elif host_ram_gb:
        host_capacity = int(host_ram_gb * 1e9)
    else:
        host_capacity = hw.host_ram_bytes if check_host else None
    host_usable = int(host_capacity * (1 - HOST_RESERVE_FRACTION)) if host_capacity else None
    if host_usable is not None and host_bytes_per_node > host_usable:
        phase = max(host_phases_per_node, key=host_phases_per_node.get)
        resident_items = " + ".join(
            f"{k.replace('_', ' ')} {fmt_bytes(host[k] * gpn)}"
            for k in ("ecss_fp32_masters", "ecss_compute_dtype_shadows", "ecss_adam_moments",
                      "offload_optimizer_states") if host.get(k))
        others = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in host_phases_per_node.items()
                           if v and k not in (phase, "resident"))
        reasons.append(
            f"host memory: {fmt_bytes(host_bytes_per_node)} per node at its peak ({phase.replace('_', ' ')}) > "
            f"{fmt_bytes(host_usable)} usable of {fmt_bytes(host_capacity)} ({HOST_RESERVE_FRACTION:.0%} reserve); "
            f"resident {fmt_bytes(host_phases_per_node['resident'])}"
            + (f" ({resident_items})" if resident_items else "") + (f"; other phases: {others}" if others else "")
        )
    if offload and zero == 0:
        reasons.append("offload_optimizer needs ZeRO stage 1, 2 or 3 (DeepSpeed refuses stage 0)")

    # ---- checkpoint: what node 0 writes (the model states of data-parallel rank 0, the optimizer
    # partitions of its GPUs, and the ECSS shard files: one per expert shard, from the first replica) -----
    optimizer_per_gpu = state_bytes * (math.ceil(dense / dense_shard) if zero >= 1 else dense)
    checkpoint_bytes = p * dense + min(gpn, world if zero >= 1 else 1) * optimizer_per_gpu
    if ecss:
        checkpoint_bytes += (gpn if shard_states else min(gpn, ep)) * 12 * host_experts
    elif experts_rank:
        checkpoint_bytes += min(gpn, ep) * (p * experts_rank + state_bytes * math.ceil(experts_rank / expert_shard))
    checkpoint_s = checkpoint_bytes / CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE

    # ---- notes -------------------------------------------------------------------------------
    if pp > 1:
        notes.append(f"pipeline: {describe_split(model.num_layers, pp)}")
        if model.router not in PIPELINE_ROUTERS or ecss or ep > 1:  # TrainConfig._check_pipeline_parallel
            notes.append(f"pangu_model.train runs pipeline {pp} for dense PanGu-α and for RRE PanGu-Σ with ep 1 "
                         f"and no ECSS (it refuses this layout); the stages are planned as its split would place "
                         f"them")
    if pp > 1 and gas < 4 * pp:
        notes.append(f"pipeline bubble: {gas} micro-batch(es) per step over {pp} stages leave "
                     f"{(pp - 1) / (gas + pp - 1):.0%} of the step idle; raise gradient_accumulation_steps "
                     f"(--set gradient_accumulation_steps=N)")
    if ecss and fetched and routing is not None:
        all_fetched = worst["fetched_per_layer"] == layout.experts_per_layer // ep
        notes.append(
            f"ECSS: each rank fetches {worst['fetched_per_layer']} of its shard's {routing.shard} experts per "
            f"sparse layer per step: {routing.why}"
            + ("; every expert of the shard crosses PCIe each step, so ECSS saves no transfer at this batch"
               if all_fetched and not shard_states else "")
        )
        if shard_states:
            notes.append(
                f"ECSS sharded host state: the {routing.replicas} replicas of a shard own blocks of at most "
                f"{routing.owned} expert(s) per layer; the owner of the largest uploads and steps U = {routing.union} "
                f"per layer (the whole block: a bound; expected {routing.union_expected:.2f}) and its replicas ask "
                f"Q = {routing.asked} rows of it per layer (expected {routing.asked_expected:.2f}); mixture "
                f"{routing.mixture}")
    if ecss:
        ecss_terms = sum(v for k, v in times.items() if k.startswith("ecss_"))
        if not cpu_processes:  # a time from the table's GPU speeds
            notes.append(f"ECSS adds {_fmt_time(ecss_terms)} to the step beside {_fmt_time(times['compute'])} of "
                         f"compute: what its transfers and host update do not overlap")
    if recompute:
        notes.append("gradient checkpointing: activations are recomputed (hardware FLOPs × 4/3)")

    plan = Plan(
        preset=train_config.name,
        model=model.name,
        gpu=hw.key,
        gpu_name=hw.name,
        cluster={"nodes": cluster.nodes, "gpus_per_node": gpn, "world_size": world},
        parallel={"tensor": tp, "pipeline": pp, "expert": ep, "data": dp},
        training={
            "precision": train_config.precision, "zero_stage": zero, "offload_optimizer": offload,
            "ecss": ecss, "micro_batch_size": b, "gradient_accumulation_steps": gas, "seq_len": s,
            "gradient_checkpointing": recompute, "reduce_bucket_size": int(train_config.reduce_bucket_size),
        },
        parameters={
            "total": layout.total,
            "routed_experts": sum(layout.block_experts),
            "per_expert": layout.per_expert,
            "dense_per_gpu": dense,
            "experts_per_gpu": experts_rank,
            "experts_on_device_per_gpu": 0 if ecss else experts_rank,
            "experts_on_host_per_gpu": host_experts,
            "fetched_per_gpu_per_step": fetched,
            "owner_uploaded_per_gpu_per_step": owned_fetched if ecss else 0,
            "worst_stage": worst["stage"],
        },
        gpu_breakdown=worst["breakdown"],
        gpu_phases=worst["phases"],
        host_breakdown=host,
        host_breakdown_per_node={k: sum(kind[0].get(k, 0) for kind in gpu_kinds) for k in host},
        host_phases_per_gpu={**host_phases, "resident": resident},
        host_phases_per_node=host_phases_per_node,
        transfers=transfers,
        times=times,
        fits=not reasons,
        gpu_bytes_per_gpu=gpu_bytes,
        gpu_capacity_bytes=capacity,
        gpu_usable_bytes=usable,
        host_bytes_per_node=host_bytes_per_node,
        host_capacity_bytes=host_capacity,
        host_usable_bytes=host_usable,
        h2d_bytes_per_gpu_per_step=transfers["h2d"],
        step_time_s=step_time,
        mfu=mfu,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step_time if step_time > 0 else 0.0,
        checkpoint_bytes_per_node=checkpoint_bytes,
        checkpoint_s=checkpoint_s,
        d2h_bytes_per_gpu_per_step=transfers["d2h"],
        h2d_link_bytes_in_dense_compute=int(hw.pcie_h2d_bytes_per_s * times["compute_dense"]),
        d2h_link_bytes_in_dense_compute=int(hw.pcie_d2h_bytes_per_s * times["compute_dense"]),
        ecss=({"sharded": routing.sharded, "domain_affine": routing.domain_affine, "mixture": routing.mixture,
               "experts_per_rank_per_layer": routing.shard, "replicas": routing.replicas,
               "owned_per_layer": routing.owned, "fetched_per_layer": worst["fetched_per_layer"],
               "owner_union_per_layer": routing.union, "owner_union_expected_per_layer": routing.union_expected,
               "asked_of_block_per_layer": routing.asked, "asked_expected_per_layer": routing.asked_expected,
               "sparse_layers": worst["sparse_layers"], "node_blocks": routing.node_blocks,
               "why": routing.why} if routing is not None else {}),
        reasons=reasons,
        notes=notes,
        hardware={k: v for k, v in asdict(hw).items() if k != "sources"} | {
            "peak_flops": peak, "gpu_reserve_fraction": GPU_RESERVE_FRACTION,
            "host_reserve_fraction": HOST_RESERVE_FRACTION},
    )
    counterpart = dense_counterpart_config(train_config) if dense_counterpart else None
    if counterpart is not None:
        dense_plan = plan_training(
            counterpart, cluster, ParallelPlan(tensor=tp, pipeline=pp, expert=1), gpu=gpu, host_ram_gb=host_ram_gb,
            gpu_memory_bytes=gpu_memory_bytes, host_ram_bytes=host_ram_bytes, check_host=check_host,
            dense_counterpart=False)
        plan.dense_counterpart = {
            "model": dense_plan.model, "parameters": dense_plan.parameters["total"],
            "step_time_s": dense_plan.step_time_s, "mfu": dense_plan.mfu, "tokens_per_s": dense_plan.tokens_per_s,
            "fits": dense_plan.fits, "gpu_bytes_per_gpu": dense_plan.gpu_bytes_per_gpu,
            "host_bytes_per_node": dense_plan.host_bytes_per_node, "times": dense_plan.times,
            "step_time_ratio": step_time / dense_plan.step_time_s if dense_plan.step_time_s > 0 else 0.0,
        }
    return plan


def dense_counterpart_config(train_config: "TrainConfig") -> "TrainConfig | None":
    """A sparse model's run with its dense base shape instead: the same TrainConfig (precision, ZeRO,
    batch, sequence) with the router dense and no sparse layers (each FFN back to the shared d_ff one:
    sigma-1t → the 13b shape, 12.8B), ECSS off and no expert parallelism. None for a dense model. The
    model is named after the dense preset of that shape when there is one."""
    from .train import TrainConfig

    model = train_config.pangu_config()
    if model.router == "dense":
        return None
    name = next((n for n, c in PRESETS.items()
                 if c.router == "dense" and all(getattr(c, f) == getattr(model, f) for f in SHAPE_FIELDS)), None)
    overrides = {**train_config.model_overrides, "router": "dense", "moe_layers": 0,
                 "name": name or f"{model.name}-dense"}
    data = train_config.model_dump() | {
        "name": f"{train_config.name} (dense counterpart)", "model_overrides": overrides, "ecss": False,
        "ecss_shard_states": False, "expert_parallel": 1, "topology": None}
    return TrainConfig.model_validate(data)


def _checked_parallel(parallel: ParallelPlan, model: "PanguConfig", cluster: ClusterSpec) -> ParallelPlan:
    """`parallel` checked against the model (layers per stage, experts per rank) and resolved on `cluster`;
    ValueError with one line naming every problem."""
    fields = parallel.model_dump(exclude={"num_layers", "num_experts"})
    try:
        checked = ParallelPlan(**fields, num_layers=model.num_layers, num_experts=model.total_experts or None)
        return checked.resolve(cluster)
    except (TopologyError, ValueError) as exc:
        raise ValueError(one_line(exc)) from None


# --------------------------------------------------------------------------------------------
# Convenience: presets, topologies, the trainer's check
# --------------------------------------------------------------------------------------------
def resolve_train_config(preset_or_config: "str | os.PathLike[str] | TrainConfig",
                         overrides: list[str] | dict[str, Any] | None = None) -> "TrainConfig":
    """A pretrain preset name or YAML path, a TrainConfig, or a bare model preset (`200b`) with
    :data:`BARE_MODEL_DEFAULTS` (seq_len capped at the model's max_seq_len). Pretrain presets win."""
    from .train import PRESET_DIR, TrainConfig, load_train_config

    if isinstance(preset_or_config, TrainConfig):
        return preset_or_config
    name = str(preset_or_config)
    if not _is_bare_model(name):
        if names_a_file(name) or (PRESET_DIR / f"{name}.yaml").exists():
            return load_train_config(name, overrides)
    else:
        model = PRESETS[name.lower()]
        data: dict[str, Any] = {**BARE_MODEL_DEFAULTS, "name": name, "model": name.lower(),
                                "seq_len": min(BARE_MODEL_DEFAULTS["seq_len"], model.max_seq_len)}
        from cleaning.yamlfile import apply_overrides  # the `--set key=value` rule of load_train_config

        return TrainConfig.model_validate(apply_overrides(data, overrides))
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ValueError(f"unknown preset {name!r}: neither a pretrain preset ({', '.join(known)}), a YAML path, "
                     f"nor a model preset ({', '.join(PRESETS)})")


def _is_bare_model(preset_or_config: object) -> bool:
    """A model preset name that is not also a pretrain preset or a YAML path."""
    from .train import PRESET_DIR

    if not isinstance(preset_or_config, str) or names_a_file(preset_or_config):
        return False
    return preset_or_config.lower() in PRESETS and not (PRESET_DIR / f"{preset_or_config}.yaml").exists()


def plan_for(
    preset_or_config: "str | os.PathLike[str] | TrainConfig",
    topology: str | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu: str = "h100",
    host_ram_gb: float | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Plan:
    """Plan a preset on a topology preset (a config that leaves tensor or pipeline parallelism at 1 takes the
    topology's degree; another degree is refused), on `nodes × gpus_per_node` (default 8; tensor, pipeline
    and expert from the config: the trainer's own layout), or on the config's own topology (else one node of
    8). `gpu` "cpu" plans `nodes × gpus_per_node` CPU processes (default 1) as the trainer's check on a
    machine without a GPU does: memory only, against this machine's RAM unless `host_ram_gb`."""
    config = resolve_train_config(preset_or_config, overrides)
    if topology is not None and nodes is not None:
        raise ValueError("give --topology or --nodes, not both")
    cpu = gpu == CPU
    if cpu and topology is not None:
        raise ValueError(f"--gpu cpu plans CPU processes (--nodes, --gpus-per-node); topology {topology} is GPU "
                         f"servers: plan it with --gpu h100 or h200")
    gpus_per_node = gpus_per_node or (1 if cpu else 8)
    if cpu:  # the trainer's own check on a machine without a GPU
        host_ram = int(host_ram_gb * 1e9) if host_ram_gb is not None else this_machine_ram()
        plan = plan_training(config, ClusterSpec(nodes=nodes or 1, gpus_per_node=gpus_per_node),
                             ParallelPlan(tensor=config.tensor_parallel, pipeline=config.pipeline_parallel,
                                          expert=config.expert_parallel),
                             host_ram_bytes=host_ram, check_host=host_ram is not None, dense_counterpart=False,
                             cpu_processes=True)
        _as_cpu_processes(plan)
        if host_ram_gb is None:
            plan.notes.insert(0, f"host RAM: this machine's {fmt_bytes(host_ram)}" if host_ram else
                              "host RAM: this machine does not say how much it has; not checked (--host-ram-gb)")
        return _noted_if_bare(plan, preset_or_config, config)
    topology = topology if nodes is not None or topology is not None else config.topology
    model = config.pangu_config()
    if topology is not None:
        try:
            preset = load_topology(topology)
        except (TopologyError, ValueError) as exc:
            raise ValueError(f"topology {topology!r}: {one_line(exc)}") from None
        cluster, parallel = preset.cluster, preset.plan
        if parallel.expert > 1 and model.router == "dense":
            raise ValueError(f"topology {preset.name} has expert parallel {parallel.expert}, "
                             f"but model {model.name} has no experts")
        # The trainer runs a topology's layout only where the config says the same degrees. A config that
        # leaves tensor or pipeline at 1 is planned with the topology's (what this preset would be on it);
        # one that sets another degree is refused, as the trainer would refuse it.
        adopted = {}
        for field, degree in (("tensor_parallel", parallel.tensor), ("pipeline_parallel", parallel.pipeline)):
            given = getattr(config, field)
            if given != degree:
                if given != 1:
                    what = field.replace("_parallel", "")
                    raise ValueError(f"topology {preset.name} has {what} parallel {degree}, "
                                     f"the preset says {field} {given}")
                adopted[field] = degree
        if adopted:
            config = config.model_copy(update=adopted)  # the topology's layout
        if parallel.expert != config.expert_parallel:
            if config.expert_parallel == 1 and model.router == "rre" and _is_bare_model(preset_or_config):
                config = config.model_copy(update={"expert_parallel": parallel.expert})  # bare model preset
            else:
                raise ValueError(f"topology {preset.name} has expert parallel {parallel.expert}, "
                                 f"the preset says expert_parallel {config.expert_parallel}")
    else:
        cluster = ClusterSpec(nodes=nodes or 1, gpus_per_node=gpus_per_node)
        parallel = ParallelPlan(tensor=config.tensor_parallel, pipeline=config.pipeline_parallel,
                                expert=config.expert_parallel)
    plan = plan_training(config, cluster, parallel, gpu=gpu, host_ram_gb=host_ram_gb)
    if any(reason.startswith("GPU memory") for reason in plan.reasons):
        # Topology presets name no GPU, so the default kind may be the wrong one for a preset (sigma-1t is
        # planned for H200): say which other kind the same run fits on, rather than only that it does not.
        for other in HARDWARE.values():
            if other.key != hardware(gpu).key:
                alternative = plan_training(config, cluster, parallel, gpu=other.key, host_ram_gb=host_ram_gb,
                                            dense_counterpart=False)
                if alternative.fits:
                    plan.notes.insert(0, f"fits on {other.name} (--gpu {other.key}): step "
                                         f"{_fmt_time(alternative.step_time_s)}, MFU {alternative.mfu:.1%}")
    return _noted_if_bare(plan, preset_or_config, config)


def _noted_if_bare(plan: Plan, preset_or_config: object, config: "TrainConfig") -> Plan:
    """`plan`, whose notes say first what a bare model preset was planned with."""
    if _is_bare_model(preset_or_config):
        plan.notes.insert(0, f"bare model preset {preset_or_config}: planned with "
                             + ", ".join(f"{k} {getattr(config, k)}" for k in BARE_MODEL_DEFAULTS))
    return plan


def _as_cpu_processes(plan: Plan) -> None:
    """A plan whose ranks compute on the CPU (made with `cpu_processes`): each process's "device" bytes are host
    bytes, beside what the plan puts on the host, and the hardware table's speeds (a GPU's) say nothing of it."""
    processes = plan.cluster["gpus_per_node"]
    plan.reasons = [r for r in plan.reasons if not r.startswith("GPU memory")]
    needed = plan.gpu_bytes_per_gpu * processes + plan.host_bytes_per_node
    over = plan.host_usable_bytes is not None and needed > plan.host_usable_bytes
    if over and not any(r.startswith("host memory") for r in plan.reasons):  # the processes make it too much
        largest, items = _largest_items(plan.gpu_breakdown)
        smaller = largest in ("activations", "logits")
        hint = "; a smaller micro_batch_size or seq_len (--set), or a GPU" if smaller else ""
        plan.reasons.append(
            f"host memory: {fmt_bytes(needed)} per node at its peak = {processes} CPU "
            f"process{'es' if processes > 1 else ''} × {fmt_bytes(plan.gpu_bytes_per_gpu)} (largest items "
            f"{items}) + {fmt_bytes(plan.host_bytes_per_node)} host-side > {fmt_bytes(plan.host_usable_bytes)} "
            f"usable of {fmt_bytes(plan.host_capacity_bytes)} ({HOST_RESERVE_FRACTION:.0%} reserve){hint}")
    plan.host_bytes_per_node = needed
    plan.fits = not plan.reasons
    plan.gpu, plan.gpu_name = CPU, "CPU processes"
    plan.times, plan.step_time_s, plan.mfu, plan.tokens_per_s = {}, None, None, None
    plan.hardware = {}


def this_machine_ram() -> int | None:
    """Physical memory of this machine in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_plan(
    train_config: "TrainConfig",
    world_size: int,
    local_world_size: int,
    gpu_name: str | None,
    gpu_memory_bytes: int | None,
    host_ram_bytes: int | None,
) -> Plan:
    """The training program's check at start: the plan of this run on `world_size` ranks,
    `local_world_size` per node, with the trainer's layout (tensor and expert from the config,
    pipeline 1). `gpu_name` (e.g. ``torch.cuda.get_device_name()``) picks the speeds (H100 figures for an
    unknown GPU); `gpu_memory_bytes` (``total_memory``) and `host_ram_bytes` replace the table's
    capacities; either None skips that check (a CPU run has no GPU to check). Raises
    :class:`PlanDoesNotFit` with the numbers, else returns the plan."""
    if world_size % local_world_size:
        raise ValueError(f"world size {world_size} is not a multiple of {local_world_size} ranks per node")
    cluster = ClusterSpec(nodes=world_size // local_world_size, gpus_per_node=local_world_size)
    parallel = ParallelPlan(tensor=train_config.tensor_parallel, pipeline=train_config.pipeline_parallel,
                            expert=train_config.expert_parallel)
    try:
        gpu = hardware(gpu_name).key if gpu_name else "h100"
    except ValueError:
        gpu = "h100"
    cpu = gpu_name is None and gpu_memory_bytes is None
    plan = plan_training(train_config, cluster, parallel, gpu=gpu, host_ram_bytes=host_ram_bytes,
                         gpu_memory_bytes=gpu_memory_bytes, check_host=host_ram_bytes is not None,
                         dense_counterpart=False,  # the check needs no comparison
                         cpu_processes=cpu)
    if cpu:
        _as_cpu_processes(plan)
    elif gpu_name and gpu.lower() not in gpu_name.lower().replace(" ", ""):
        plan.notes.append(f"{gpu_name}: speeds planned with {HARDWARE[gpu].name} figures")
    if not plan.fits:
        raise PlanDoesNotFit(plan)
    return plan


# --------------------------------------------------------------------------------------------
# For humans
# --------------------------------------------------------------------------------------------
def fmt_bytes(count: float) -> str:
    """Binary units: 1.5 GiB, 11.72 TiB."""
    count = float(count)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} B"


def _largest_items(breakdown: dict[str, int], count: int = 3) -> tuple[str, str]:
    """The largest item of a byte breakdown, and the `count` largest as text: `activations 36.38 GiB, ...`."""
    top = sorted(((v, k) for k, v in breakdown.items() if v), reverse=True)[:count]
    return (top[0][1] if top else ""), ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for v, k in top)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def format_plan(plan: Plan) -> str:
    """A table per GPU and per node, then FITS / DOES NOT FIT with the reasons."""
    gpn = plan.cluster["gpus_per_node"]
    par, tr = plan.parallel, plan.training
    lines = [
        f"plan: {plan.preset} (model {plan.model}) on {plan.cluster['nodes']} node{'s' * (plan.cluster['nodes'] != 1)}"
        f" × {gpn} {plan.gpu_name}",
        f"  tensor {par['tensor']} × pipeline {par['pipeline']} × data {par['data']} (expert {par['expert']}); "
        f"{tr['precision']}, ZeRO-{tr['zero_stage']}{', optimizer offload' if tr['offload_optimizer'] else ''}"
        f"{', ECSS' if tr['ecss'] else ''}; micro-batch {tr['micro_batch_size']} × seq {tr['seq_len']} × "
        f"{tr['gradient_accumulation_steps']} accumulation = {plan.tokens_per_step:,} tokens per step",
        f"  parameters: {plan.parameters['total']:,} total; per {'process' if plan.gpu == CPU else 'GPU'} "
        f"{plan.parameters['dense_per_gpu']:,} dense, "
        f"{plan.parameters['experts_on_device_per_gpu']:,} experts on the device, "
        f"{plan.parameters['experts_on_host_per_gpu']:,} on the host, "
        f"{plan.parameters['fetched_per_gpu_per_step']:,} fetched per step"
        + (f" (pipeline stage {plan.parameters['worst_stage']}, the largest)" if par["pipeline"] > 1 else ""),
    ]
    if plan.ecss:
        e = plan.ecss
        lines.append(
            f"  ECSS{' (sharded host state)' if e['sharded'] else ''}: per rank and sparse layer "
            f"{e['fetched_per_layer']} of {e['experts_per_rank_per_layer']} experts fetched"
            f" ({'domain-affine' if e['domain_affine'] else 'independent rows'})"
            + (f", {e['owned_per_layer']} owned (largest block of {e['replicas']}), {e['owner_union_per_layer']} "
               f"uploaded and stepped by the owner, {e['asked_of_block_per_layer']} rows asked of it"
               if e["sharded"] else ""))
    lines.append("")
    cpu = plan.gpu == CPU
    rows: list[tuple[str, str, str]] = [("memory of a CPU process", "per process", "per node") if cpu else
                                        ("GPU memory", "per GPU", "per node")]
    for key, value in plan.gpu_breakdown.items():
        if value:
            rows.append((f"  {key.replace('_', ' ')}", fmt_bytes(value), fmt_bytes(value * gpn)))
    for key, value in plan.gpu_phases.items():
        rows.append((f"  peak: {key.replace('_', ' ')}", fmt_bytes(value), fmt_bytes(value * gpn)))
    if cpu:  # host memory, counted below
        rows.append(("  needed", fmt_bytes(plan.gpu_bytes_per_gpu), fmt_bytes(plan.gpu_bytes_per_gpu * gpn)))
    else:
        rows.append(("  needed / usable",
                     f"{fmt_bytes(plan.gpu_bytes_per_gpu)} / {fmt_bytes(plan.gpu_usable_bytes)}", ""))
    rows.append(("host memory", "", ""))
    if cpu:
        rows.append(("  the CPU processes' memory (above)", "", fmt_bytes(plan.gpu_bytes_per_gpu * gpn)))
    for key, value in plan.host_breakdown.items():
        if value:
            node = plan.host_breakdown_per_node.get(key, value * gpn)
            rows.append((f"  {key.replace('_', ' ')}", fmt_bytes(value), fmt_bytes(node)))
    for key, value in plan.host_phases_per_node.items():
        if value:
            busiest = plan.host_phases_per_gpu.get(key, value / gpn)
            rows.append((f"  peak: {key.replace('_', ' ')}", fmt_bytes(busiest), fmt_bytes(value)))
    usable = fmt_bytes(plan.host_usable_bytes) if plan.host_usable_bytes else "unknown"
    rows.append(("  needed / usable", "", f"{fmt_bytes(plan.host_bytes_per_node)} / {usable}"))
    rows.append(("transfers per step", "", ""))
    for key, value in plan.transfers.items():
        if value:
            rows.append((f"  {key.replace('_', ' ')}", fmt_bytes(value), fmt_bytes(value * gpn)))
    if not any(plan.transfers.values()):
        rows.append(("  none", "0 B", "0 B"))
    if (plan.h2d_bytes_per_gpu_per_step or plan.d2h_bytes_per_gpu_per_step) and plan.gpu != CPU:
        rows.append(("  PCIe h2d | d2h in the dense compute",
                     f"{fmt_bytes(plan.h2d_link_bytes_in_dense_compute)} | "
                     f"{fmt_bytes(plan.d2h_link_bytes_in_dense_compute)}", ""))
    rows.append(("time per step", "", ""))
    if cpu:
        rows.append(("  not planned: the hardware table has GPU speeds only", "", ""))
    for key, value in plan.times.items():
        if value and key != "compute":
            rows.append((f"  {key.replace('_', ' ')}", _fmt_time(value), ""))
    if not cpu:
        rows.append(("  step time", _fmt_time(plan.step_time_s), ""))
        rows.append(("  MFU", f"{plan.mfu:.1%}", ""))
        rows.append(("  tokens/s (whole cluster)", f"{plan.tokens_per_s:,.0f}", ""))
    if plan.dense_counterpart:
        dc = plan.dense_counterpart
        rows.append((f"  dense counterpart ({dc['model']}) step", _fmt_time(dc["step_time_s"]),
                     f"MFU {dc['mfu']:.1%}"))
        rows.append(("  step / dense counterpart step", f"{dc['step_time_ratio']:.2f}×", ""))
    rows.append((f"checkpoint (node 0, at {CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE / 1e9:g} GB/s)",
                 _fmt_time(plan.checkpoint_s), fmt_bytes(plan.checkpoint_bytes_per_node)))
    width = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines += [f"{a:<{width}}  {b_:>{w1}}  {c:>12}".rstrip() for a, b_, c in rows]
    lines.append("")
    if plan.fits:
        lines.append("FITS")
    else:
        lines.append("DOES NOT FIT")
        lines += [f"  - {reason}" for reason in plan.reasons]
    if plan.notes:
        lines.append("notes:")
        lines += [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


__all__ = ["BARE_MODEL_DEFAULTS", "CPU", "GPU_RESERVE_FRACTION", "HARDWARE", "HOST_RESERVE_FRACTION", "EcssRouting",
           "Hardware", "ParameterLayout", "Plan", "PlanDoesNotFit", "check_plan", "dense_counterpart_config",
           "fmt_bytes", "format_plan", "hardware", "parameter_layout", "plan_for", "plan_training",
           "resolve_train_config", "this_machine_ram"]
