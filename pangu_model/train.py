"""The pretraining program: a `TrainConfig` preset → a DeepSpeed run of PanGu-α or PanGu-Σ.

    python -m pangu_model.train --config deploy/presets/pretrain/sigma-tiny.yaml [--set key=value ...]
    deepspeed --num_gpus 8 -m pangu_model.train --config sigma-1t          (or torchrun; same program)

With no launcher the process is a world of one (MASTER_ADDR/PORT defaults, gloo on CPU, NCCL on CUDA).

What one run does:

* builds the model from a `pangu_model.config` preset (optionally initialised from an exported
  checkpoint, dense → sparse inheritance included) and wraps it with `deepspeed.initialize`, using the
  DeepSpeed config generated from the preset (pangu_model/deepspeed_config.py), our parameter groups
  (optim.py: no decay on LayerNorm/biases, hybrid Adam ε) and our warmup + cosine schedule;
* tensor parallelism (`tensor_parallel` > 1, tensor_parallel.py): each tensor group of ranks inside a node
  splits every dense layer Megatron-style (PanGu-α's, and PanGu-Σ's dense part; the RRE layers' experts are
  replicated over the group, computed on the same tokens by each of its ranks) and reads the same rows;
  DeepSpeed gets the data-parallel group through an `mpu` (ZeRO partitions over it, clipping sums the norm
  over the tensor group, counting replicated parameters once, each tensor rank checkpoints its own slices);
  layouts this program cannot run are refused at start (`LayoutError`, one line naming what is not
  implemented), before anything is allocated;
* pipeline parallelism (`pipeline_parallel` > 1, pipeline_parallel.py): each rank builds its stage of a
  DeepSpeed `PipelineModule` (embeddings first, query layer and tied head last) and trains with DeepSpeed's
  1F1B schedule over the step's micro-batches; each stage checkpoints its own layers. With
  `tensor_parallel` > 1 too, every stage is made of the tensor-parallel layers over the topology's tensor
  group (DeepSpeed's grid is then the `mpu`), and each (stage, tensor rank) checkpoints its own slices.
  PanGu-Σ's stages hold their RRE layers' experts whole (replicated over a tensor group), and the token and
  domain ids they route by travel with the hidden state;
* PanGu-Σ experts: in the model's own `ExpertBank` (one rank's experts, ep = 1), through DeepSpeed's
  MoE layer with a fixed RRE gate (ep > 1, expert groups inside a node: pangu_model/topology.py), or
  host-resident with ECSS (ecss.py), sharded over the expert-parallel group when ep > 1 (with tensor
  parallelism, each tensor rank runs its own ECSS, the same on every rank of a tensor group);
* reads rows from a packed token directory (`tokenizer.dataset.PackedRowDataset`, resumable);
* checkpoints every N steps and on SIGTERM: DeepSpeed's `save_checkpoint` plus our own per-rank
  trainer state (step, data position) and ECSS host experts with their Adam states (one file per expert
  shard), then an atomic `latest` pointer,
  so a `kill -9` at any moment resumes from the last complete checkpoint with the same data, the
  same dropout masks (seeded per step) and the same losses;
* exports `model.safetensors` + `config.json` (pangu_model.checkpoint) with every expert included,
  the fp32 optimizer masters under bf16/fp16, each expert shard writing its own rows (no gather);
* logs metrics (metrics.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cleaning.writers import atomic_file, read_json, write_bytes_atomic, write_json_atomic
from cleaning.yamlfile import apply_overrides, names_a_file, read_mapping

from .config import PIPELINE_ROUTERS, SHAPE_FIELDS, PanguConfig, get_config
from .deepspeed_config import deepspeed_config
from .expert_parallel import gather_expert_state, local_expert_rows, to_deepspeed_moe, without_moe_keys
from .materialize import on_meta
from .model import PanguModel
from .moe import RandomRoutedExperts
from .ops import compile_muon_on_first_use, deepspeed_accelerator_follows_torch
from .optim import OptimConfig, build_scheduler, lr_at, parameter_groups
from .plan import PlanDoesNotFit, check_plan, this_machine_ram
from .run_lock import OutputInUse, claim_output
from .tensor_parallel import (
    ModelParallelUnit,
    TensorParallel,
    as_tensor_parallel,
    gather_state_dict,
    mark_split,
    row_blocks,
    shard_state_dict,
    split_dims,
)
from .topology import ClusterSpec, Layout, ParallelPlan, describe_split, load_topology, stage_layers

if TYPE_CHECKING:
    from tokenizer.pangu import PanguTokenizer

PRESET_DIR = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "pretrain"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
# In a checkpoint's directory, once the run's export holds its weights: what the export holds
EXPORTED_FILE = "exported.json"
EXPORT_TOKENIZER_DIR = "tokenizer"  # inside an export: the tokenizer the model was trained with
LATEST = "latest"  # same file name as DeepSpeed's own pointer, so its tools find our tags
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# `<output>/STOP`: a stop that reaches every rank on every node, whatever the launcher does with signals
# (the deepspeed launcher does not carry one to remote nodes). Rank 0 looks for it after each step.
STOP_FILE = "STOP"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
class TrainConfig(BaseModel):
    """One pretraining run. The same object is the Prefect flow parameter and the CLI's `--config`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = "pretrain"
    # model
    model: str = Field("tiny", description="pangu_model preset name (tiny, sigma-tiny, 350m, sigma-1t, ...)")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="PanguConfig fields to change")
    init_from: str | None = Field(
        None, description="exported checkpoint dir to start from; a dense one initialises a sparse model's experts"
    )
    # data
    data: str = Field("runs/tokens", description="packed token directory (tokenizer.pack output)")
    mixture: str | dict[str, float] | None = Field("natural", description="domain weights (tokenizer.dataset)")
    domain_affine: bool | None = Field(
        None, description="domain-affine steps: all rows of a node's ranks in a step come from one domain, so the "
                          "step routes to that domain's experts only; the mixture holds exactly over a window of "
                          "steps (tokenizer.dataset). None: on for RRE (PanGu-Σ) models, off otherwise")
    seq_len: int | None = Field(None, ge=1, description="row length; default: the model's max_seq_len")
    data_seed: int = 1234
    validation_fraction: float = Field(0.01, ge=0.0, lt=1.0,
                                       description="share of each domain's documents held out for validation")
    validation_every: int = Field(100, ge=0, description="steps between validation losses (and at the end); 0: never")
    validation_rows: int = Field(16, ge=1, description="validation rows per domain (seq_len each)")
    # run
    output: str = Field("runs/pretrain", description="run dir: checkpoints/, export/, metrics CSVs")
    seed: int = 1234
    train_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(4, ge=1, description="rows per rank per forward")
    gradient_accumulation_steps: int = Field(1, ge=1)
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(1, ge=0, le=3)
    offload_optimizer: bool = Field(False, description="engine-wide ZeRO-Offload (DeepSpeedCPUAdam) of all states")
    reduce_bucket_size: float = Field(5e8, gt=0)
    # experts
    ecss: bool = Field(False, description="PanGu-Σ ECSS: expert weights and Adam states in host memory")
    ecss_shard_states: bool = Field(False, description="ECSS: each replica of an expert shard keeps only its block "
                                                       "of the masters + Adam states (host bytes / (ep × dp))")
    ecss_host_threads: int | None = Field(None, ge=1, description="ECSS: CPU threads of the host optimizer per rank "
                                                               "(default: the node's cores / its ranks)")
    ecss_delayed_update: bool = Field(False, description="ECSS: the host optimizer runs one step behind, beside the "
                                                         "next step (a step fetches weights without the previous "
                                                         "step's update: ZeRO-Offload's delayed parameter update)")
    ecss_delayed_update_after: int = Field(0, ge=0, description="ECSS with ecss_delayed_update: the host updates of "
                                                                "the first N steps run in line (a warm-up, as "
                                                                "ZeRO-Offload's: early gradients change fast)")
    expert_parallel: int = Field(1, ge=1, description="ranks that share one copy of the experts (inside a node)")
    tensor_parallel: int = Field(1, ge=1, description="ranks that split every dense layer (Megatron-style, inside "
                                                      "a node; PanGu-Σ's experts are replicated over them); ZeRO "
                                                      "runs over the data-parallel rest (world / tensor_parallel)")
    pipeline_parallel: int = Field(1, ge=1, description="pipeline stages (DeepSpeed's 1F1B pipeline, across nodes) "
                                                        "of a dense PanGu-α model (with tensor_parallel, stages of "
                                                        "tensor-parallel layers) or of PanGu-Σ with RRE experts "
                                                        "(each stage holds its blocks' experts whole: ep 1, no "
                                                        "ECSS); the micro-batches of a step are "
                                                        "its gradient_accumulation_steps; ZeRO 1 (0 with bf16/fp16 "
                                                        "or without clipping)")
    topology: str | None = Field(None, description="deploy/presets/topology name or YAML: checks ep against the cluster")
    # checkpoints and logs
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints; 0: only at the end / SIGTERM")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(True, description="continue from output/checkpoints/latest when it exists")
    export: bool = Field(True, description="write export/model.safetensors + config.json at the end")
    log_every: int = Field(1, ge=1, description="steps between loss-per-domain and expert-load rows")
    progress_bar: bool | None = Field(None, description="None: only on a terminal")
    tensorboard: bool = False
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU; None: known GPUs only")
    throttle_s: float = Field(0.0, ge=0.0, description="sleep per step (tests and demos of preemption)")
    # GPU speed (pangu_model/speed.py, masks.py)
    attention_backend: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="auto: FlexAttention with a document block mask when training on CUDA (no attention-"
                            "probability dropout), SDPA elsewhere; sdpa: PanGu-α's attention dropout, dense mask")
    compile: bool = Field(False, description="torch.compile each transformer block (CUDA; first steps compile)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        model = self.pangu_config()
        self._check_pipeline_parallel(model)  # first: with experts, a pipeline is refused whatever the tensor degree
        self._check_tensor_parallel(model)
        if model.router != "dense" and self.zero_stage == 3:
            raise ValueError("ZeRO-3 with experts: DeepSpeed's MoE refuses stage 3 (SPEC §5.2); use 0-2")
        if self.ecss and model.router != "rre":
            raise ValueError("ECSS needs RRE routing: experts must be known from the batch before the forward")
        if self.expert_parallel > 1 and model.router != "rre":
            raise ValueError("expert_parallel > 1 is implemented for RRE routing only")
        if self.expert_parallel > 1 and model.total_experts % self.expert_parallel:
            raise ValueError(f"{model.total_experts} experts do not split over expert_parallel {self.expert_parallel}")
        if self.row_length > model.max_seq_len:
            raise ValueError(f"seq_len {self.row_length} > the model's max_seq_len {model.max_seq_len}")
        return self

    def _check_tensor_parallel(self, model: PanguConfig) -> None:
        """What tensor parallelism needs of the model and the run (the layout is checked at start)."""
        tp = self.tensor_parallel
        if tp == 1:
            return
        if self.expert_parallel > 1 and not self.ecss and self.zero_stage == 0:
            # Without ZeRO, DeepSpeed's bf16/fp16 optimizers add the norm of the MoE experts over the tensor group
            # (they take them for tensor-parallel), which counts experts replicated over it once per rank.
            raise LayoutError(f"tensor_parallel {tp} with expert_parallel {self.expert_parallel} and ZeRO stage 0: "
                              f"DeepSpeed's gradient clipping without ZeRO is not implemented for experts replicated "
                              f"over a tensor group; set zero_stage: 1 or 2")
        if self.zero_stage == 3:
            raise ValueError(f"tensor_parallel {tp} with ZeRO-3 is not implemented; use zero_stage 0-2")
        for name in ("num_heads", "d_ff", "vocab_size"):
            if getattr(model, name) % tp:
                raise ValueError(f"tensor_parallel {tp} does not divide {name} {getattr(model, name)}")

    def _check_pipeline_parallel(self, model: PanguConfig) -> None:
        """What pipeline parallelism needs of the model and the run (the world size is checked at start)."""
        pp = self.pipeline_parallel
        if pp == 1:
            return
        if self.ecss or self.expert_parallel > 1 or model.router not in PIPELINE_ROUTERS:
            given = "ECSS" if self.ecss else "expert_parallel" if self.expert_parallel > 1 else f"router {model.router}"
            raise LayoutError(f"pipeline_parallel {pp} with {given}: pipeline parallelism is implemented for dense "
                              f"PanGu-α and for PanGu-Σ with RRE experts held whole by each stage (no expert "
                              f"parallelism, no ECSS); set pipeline_parallel: 1")
        if self.zero_stage > 1:
            raise LayoutError(f"pipeline_parallel {pp} with ZeRO stage {self.zero_stage}: DeepSpeed's pipeline engine "
                              f"runs ZeRO stage 0 or 1 only (gradients are reduced once per step, after the "
                              f"last micro-batch); set zero_stage: 1")
        if self.zero_stage == 0 and self.precision == "fp32" and self.optimizer.grad_clip > 0:
            # DeepSpeed clips fp32 without ZeRO in `runtime.utils.clip_grad_norm_`, which takes the pipeline grid's
            # rank in its stages × tensor group for the tensor rank: parameters that are not tensor-parallel count
            # on the first stage only, and with tensor parallelism the last stage's copy of the tied embedding
            # counts too (measured: the third step's loss of pipeline 2 differs from pipeline 1's by 6e-4). Its
            # ZeRO-1 and bf16/fp16 optimizers count each element once.
            raise LayoutError(f"pipeline_parallel {pp} with ZeRO stage 0 in fp32 and grad_clip "
                              f"{self.optimizer.grad_clip}: DeepSpeed's fp32 gradient clipping without ZeRO counts "
                              f"the gradient norm of a pipeline wrongly (the first stage's replicated parameters "
                              f"only); set zero_stage: 1")
        if pp > model.num_layers:
            raise LayoutError(f"pipeline_parallel {pp} is more stages than the model's {model.num_layers} layers "
                              f"(blocks and the query layer): every stage needs one at least")
        if model.moe_layers:
            # The experts are a parameter group of their own (their Adam ε), and DeepSpeed's ZeRO optimizer
            # all-reduces a gradient norm per group over the stages: a stage without an expert layer issues one
            # collective fewer, and the others wait for it forever (measured: sigma-tiny, 4 layers, RRE in the
            # top 2, on 2 stages of 2 + 2 layers).
            first = 0
            for stage, count in enumerate(stage_layers(model.num_layers, pp)):
                if not any(model.is_sparse_layer(i) for i in range(first, first + count)):
                    raise LayoutError(
                        f"pipeline_parallel {pp} with experts in the top {model.moe_layers} of {model.num_layers} "
                        f"layers: stage {stage} (layers {first}-{first + count - 1}) would hold no expert layer, "
                        f"which DeepSpeed's ZeRO optimizer cannot step beside stages that do; use fewer stages or "
                        f"more moe_layers")
                first += count

    def pangu_config(self) -> PanguConfig:
        return get_config(self.model, **self.model_overrides)

    @property
    def row_length(self) -> int:
        return self.seq_len or get_config(self.model, **self.model_overrides).max_seq_len

    def resume_fields(self) -> dict[str, Any]:
        """What must not change across a resume (paths, step counts and logging may)."""
        keep = self.model_dump(include={"model", "model_overrides", "data_seed", "seed", "micro_batch_size",
                                        "gradient_accumulation_steps", "seq_len", "mixture", "ecss",
                                        "validation_fraction"})
        if self.domain_affine is not None:  # only when set: runs that leave it alone keep their fingerprint
            keep["domain_affine"] = self.domain_affine
        return keep

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.resume_fields(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """The whole request, every field: a finished run is taken as done (not launched again) only for the
        very config that finished it."""
        whole = self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_train_config(name_or_path: str | os.PathLike[str], overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A preset from deploy/presets/pretrain/ or a YAML path, with `a.b=value` overrides (YAML values)."""
    path = Path(name_or_path)
    if not names_a_file(path):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"pretrain preset {str(name_or_path)!r} not found (known: {known})")
    data = read_mapping(path)
    if not data:  # an empty or cut-off file, not a wish for every default (a 'tiny' model)
        raise ValueError(f"{path} holds no settings: a pretrain config names at least its `model` (see "
                         f"{PRESET_DIR / 'alpha-tiny.yaml'})")
    data.setdefault("name", path.stem)
    return TrainConfig.model_validate(apply_overrides(data, overrides))


VOCAB_MULTIPLE = 64  # embedding rows are padded to this multiple (40,000 and 8,000 need no padding)


class DataMismatch(ValueError):
    """The packed data and the model cannot go together; the message says how to fix it."""


class NothingToExport(ValueError):
    """`--export-only` on an output that holds no checkpoint (an export would be the untrained model)."""


def latest_checkpoint_tag(output: str | os.PathLike[str]) -> str | None:
    """The tag the run's `latest` pointer names (a checkpoint written whole), None before the first one."""
    pointer = Path(output) / CHECKPOINT_DIR / LATEST
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def export_record(output: str | os.PathLike[str], tag: str | None) -> dict[str, Any] | None:
    """What checkpoint `tag`'s `exported.json` says the run's export holds (its step, files and config
    digest), when the export still holds those files; None when there is no such record (the export must be
    written again)."""
    if tag is None:
        return None
    try:
        record = read_json(str(Path(output) / CHECKPOINT_DIR / tag / EXPORTED_FILE))
    except (OSError, ValueError):  # none yet, or damaged
        return None
    files = record.get("files") if isinstance(record, dict) else None
    export = Path(output) / EXPORT_DIR
    if not files or not all((export / str(name)).exists() for name in files):
        return None
    return record


def finished_run(output: str | os.PathLike[str], config: TrainConfig) -> int | None:
    """The step of a finished run of this very `config` in `output` whose export holds its last checkpoint,
    else None. Launching the trainer for it would load that checkpoint (a model's worth of reads, on the
    cluster) to find no step left and the export current. A config with `resume: false` asks for a new run
    each time: never finished."""
    if not config.resume:
        return None
    record = export_record(output, latest_checkpoint_tag(output))
    if record is None or record.get("step") != config.train_steps or record.get("config") != config.digest():
        return None
    return int(record["step"])


class ResumeMismatch(ValueError):
    """The output's last checkpoint was written by a run with another model, data or batch config (its
    fingerprint): found before anything loads it."""


TRAIN_CONFIG_FILE = "train_config.json"  # checkpoints/: the config of the run that wrote the last checkpoint


def check_resumable(output: str | os.PathLike[str], config: TrainConfig, rank: int = 0) -> None:
    """Raises ResumeMismatch, naming the fields that differ, when `config` would resume `output`'s last
    checkpoint but is not the config that wrote it (the flow asks before launching; each rank before loading)."""
    tag = latest_checkpoint_tag(output)
    if tag is None or not config.resume:
        return
    from tokenizer.pack import packed_with

    directory = Path(output) / CHECKPOINT_DIR / tag
    state = torch.load(directory / f"trainer_rank{rank:05d}.pt", weights_only=True)
    refuse_another_run(directory, state, config, packed_with(read_data_contract(config.data)))


def refuse_another_run(directory: Path, state: dict[str, Any], config: TrainConfig, packed: str | None) -> None:
    """`check_resumable` on a checkpoint's trainer `state` already read, and the fingerprint of the tokenizer
    that packed this run's data (`packed`)."""
    trained = state.get("tokenizer_sha256")
    if trained and packed and trained != packed:  # not recorded before checkpoints did: not checked
        raise ResumeMismatch(f"{directory} was trained on ids of tokenizer sha256 {trained[:12]}…, this run's data "
                             f"({config.data}) is packed with {packed[:12]}…: resume on data of that tokenizer, or "
                             f"train into another output")
    if state["fingerprint"] == config.fingerprint():
        return
    differences = ""
    try:
        written = TrainConfig.model_validate_json((directory.parent / TRAIN_CONFIG_FILE).read_text())
    except (OSError, ValueError):  # an older run's, or damaged: the fingerprint alone says that they differ
        written = None
    if written is not None and written.fingerprint() == state["fingerprint"]:
        before, now = _flat(written.resume_fields()), _flat(config.resume_fields())
        changed = [f"{key} {before.get(key, '(unset)')} → {now.get(key, '(unset)')}"
                   for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
        differences = f" ({', '.join(changed)})" if changed else ""
    raise ResumeMismatch(f"{directory} was written by a run with another model/data/batch config{differences}: "
                         f"resume it with that config, or train into another output (init_from its export "
                         f"starts a new run from its weights)")


def _flat(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model_overrides": {"vocab_size": 4032}} → {"model_overrides.vocab_size": 4032}, as `--set` names them."""
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class LayoutError(ValueError):
    """A parallel layout this program cannot run, found at start before the model is built, or a checkpoint
    written with another layout, found before it is loaded."""


def check_layout(config: "TrainConfig", world_size: int, local: int) -> None:
    """The layout a run of `world_size` ranks, `local` a node, can take, checked before anything is allocated
    (by the trainer at start, and by the pretrain flow before it launches): `LayoutError` with the reason. A
    topology preset must be the run's own layout (its groups are the ones the trainer builds)."""
    ep, tp, pp = config.expert_parallel, config.tensor_parallel, config.pipeline_parallel
    if config.topology:
        topology = load_topology(config.topology)
        plan = topology.plan
        if plan.pipeline != pp:
            raise LayoutError(f"topology {topology.name} has pipeline {plan.pipeline}, config says "
                              f"pipeline_parallel {pp}")
        if plan.tensor != tp:
            raise LayoutError(f"topology {topology.name} has tensor {plan.tensor}, config says "
                              f"tensor_parallel {tp}")
        if plan.expert != ep:
            raise LayoutError(f"topology {topology.name} has expert {plan.expert}, config says {ep}")
        if topology.cluster.world_size != world_size:
            raise LayoutError(f"topology {topology.name} has {topology.cluster.world_size} ranks, "
                              f"this run {world_size}")
        if topology.cluster.gpus_per_node != local:
            raise LayoutError(f"topology {topology.name} has {topology.cluster.gpus_per_node} ranks per node, "
                              f"this run {local}")
    if world_size % tp:
        raise LayoutError(f"tensor_parallel {tp} does not divide the world size {world_size}")
    if world_size % (tp * pp):
        raise LayoutError(f"pipeline_parallel {pp} does not divide the world size {world_size}"
                          + (f" (with tensor_parallel {tp})" if tp > 1 else ""))
    if local % tp:
        raise LayoutError(f"tensor_parallel {tp} does not divide the {local} ranks of a node (a tensor group "
                          f"stays inside one node)")
    if world_size % ep:
        raise LayoutError(f"expert_parallel {ep} does not divide the world size {world_size}")
    if ep > 1 and local % (ep * tp):  # ep ranks at stride tp (pangu_model/topology.py): ep·tp inside a node
        raise LayoutError(f"expert group of {ep} ranks" + (f" at stride tensor_parallel {tp}" if tp > 1 else "")
                          + f" would leave a node of {local} ranks")


def fewest_ranks(config: "TrainConfig") -> int:
    """The smallest world `config`'s layout runs on: a tensor group per pipeline stage, times the expert
    group (expert parallelism and pipelines do not mix)."""
    return config.tensor_parallel * config.pipeline_parallel * config.expert_parallel


def read_data_contract(data: str | os.PathLike[str]) -> dict[str, Any]:
    """The packed token directory's `domains.json`: tokenizer (path, sha256, pieces) and domains."""
    from tokenizer.pack import DOMAINS_FILE

    path = Path(data) / DOMAINS_FILE
    if not path.is_file():
        raise DataMismatch(f"{data} is not a packed token directory: {DOMAINS_FILE} is missing "
                           "(`pangu tokenizer pack` or `pangu tokenizer run` writes one)")
    contract = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = contract.get("tokenizer") or {}
    if not tokenizer.get("pieces"):
        raise DataMismatch(f"{path} does not record its tokenizer (packed by an older version): run "
                           "`pangu tokenizer pack` again on the same corpus and tokenizer (packed shards are kept)")
    return contract


def data_tokenizer(contract: dict[str, Any]) -> "PanguTokenizer | None":
    """The tokenizer that packed the data, checked against its fingerprint; None when the data names no
    path (synthetic data)."""
    from tokenizer.pangu import PanguTokenizer, TokenizerLoadError

    record = contract["tokenizer"]
    if not record.get("path"):
        return None
    try:
        tokenizer = PanguTokenizer.load(record["path"])
    except TokenizerLoadError as exc:
        raise DataMismatch(f"the tokenizer that packed this data is not readable any more: {exc}") from exc
    if record.get("sha256") and tokenizer.fingerprint != record["sha256"]:
        raise DataMismatch(f"the tokenizer at {record['path']} changed after it packed this data "
                           f"(sha256 {tokenizer.fingerprint[:12]}…, packed with {record['sha256'][:12]}…): pack again")
    return tokenizer


def padded_vocab(pieces: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-pieces // multiple) * multiple


def fit_to_data(config: TrainConfig) -> TrainConfig:
    """The run's model shaped by its data (SPEC §2.1 contract), unless the user set the field himself.

    * vocabulary: the tokenizer's piece count, padded to a multiple of 64; the padded ids are masked
      out of the output distribution (`PanguConfig.tokenizer_pieces`);
    * PanGu-Σ (RRE): one expert group per domain of the data (the preset gives experts per domain).

    A user's value that cannot work (a vocabulary smaller than the tokenizer, fewer domains than the
    data has) raises `DataMismatch` with what to change, before anything is allocated."""
    contract = read_data_contract(config.data)
    data_tokenizer(contract)  # a moved or changed tokenizer fails here, not at export time
    pieces = int(contract["tokenizer"]["pieces"])
    names = {int(i): name for i, name in contract.get("id_to_name", {}).items()}
    chosen = dict(config.model_overrides)
    derived: dict[str, Any] = {"tokenizer_pieces": pieces}
    if config.init_from is not None:
        from .checkpoint import load_config

        source = load_config(config.init_from)
        _check_same_tokenizer(config.init_from, contract)
        if source.vocab_size < pieces:
            raise DataMismatch(f"init_from {config.init_from} has {source.vocab_size} embeddings but the data's "
                               f"tokenizer has {pieces} pieces: pack the corpus with that model's tokenizer")
        derived["vocab_size"] = source.vocab_size
    else:
        derived["vocab_size"] = padded_vocab(pieces)
    if "vocab_size" in chosen and int(chosen["vocab_size"]) < pieces:
        raise DataMismatch(f"model_overrides.vocab_size={chosen['vocab_size']} is smaller than the data's tokenizer "
                           f"({pieces} pieces, {contract['tokenizer'].get('path')}): drop the override (the vocabulary "
                           f"is derived from the data) or give at least {pieces}")
    base = config.pangu_config()
    if base.router == "rre" and names:
        needed = max(names) + 1
        offset = int(chosen.get("domain_id_offset", base.domain_id_offset))
        derived["num_domains"] = needed - offset
        given = chosen.get("num_domains")
        if given is not None and (offset > min(names) or offset + int(given) < needed):
            listing = ", ".join(f"{i} {n}" for i, n in sorted(names.items()))
            raise DataMismatch(f"model_overrides.num_domains={given} (ids from {offset}) cannot route the data's "
                               f"{len(names)} domains ({listing}): a PanGu-Σ model needs one expert group per "
                               f"domain; drop the override (derived from the data) or give at least {needed - offset}")
    overrides = {**derived, **chosen}
    fitted = config if overrides == config.model_overrides else \
        TrainConfig.model_validate({**config.model_dump(), "model_overrides": overrides})
    if config.init_from is not None:
        check_init_from(config.init_from, fitted.pangu_config())
    return fitted


def _check_same_tokenizer(export: str, contract: dict[str, Any]) -> None:
    """An export to start from was trained on ids of one tokenizer: data packed by another of the same size
    gives its embeddings other text (the run trained on, and its export bundled a tokenizer the start never
    knew). An export that records none (an imported release) is taken as it is."""
    from tokenizer.pack import DOMAINS_FILE, packed_with

    path = Path(export) / DOMAINS_FILE
    trained = packed_with(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
    packed = packed_with(contract)
    if trained and packed and trained != packed:
        raise DataMismatch(f"init_from {export} was trained on ids of tokenizer sha256 {trained[:12]}…, the data is "
                           f"packed with {packed[:12]}…: pack the corpus with that model's tokenizer "
                           f"({Path(export) / 'tokenizer'})")


def check_init_from(export: str, target: PanguConfig) -> None:
    """Raises `DataMismatch` unless the model in `export` can start this run's model (`target`): the same
    tensors, or a dense model whose shape a PanGu-Σ model inherits (`inherit.sigma_from_dense`). Found at
    launch, not when every rank loads it and the shapes differ."""
    from .checkpoint import load_config

    source = load_config(export)
    kind = {"dense": "dense (PanGu-α)", "rre": "PanGu-Σ (RRE)"}
    if source.router == "dense" and target.router != "dense":  # dense → sparse inheritance
        differ = [f"{field} {getattr(source, field)} vs {getattr(target, field)}" for field in SHAPE_FIELDS
                  if getattr(source, field) != getattr(target, field)]
        if target.expert_width != target.d_ff:
            differ.append(f"expert_d_ff {target.expert_width} vs d_ff {target.d_ff}")
        if differ:
            raise DataMismatch(f"init_from {export}: a dense model can start a sparse one of its own shape only "
                               f"({'; '.join(differ)}): use a preset of that shape, or override those fields")
        return
    with on_meta():
        source_shapes = {name: tuple(t.shape) for name, t in PanguModel(source).state_dict().items()}
        target_shapes = {name: tuple(t.shape) for name, t in PanguModel(target).state_dict().items()}
    differ = sorted(name for name in set(source_shapes) | set(target_shapes)
                    if source_shapes.get(name) != target_shapes.get(name))
    if differ:
        what = (f"a {kind.get(source.router, source.router)} model" if source.router != target.router else
                f"another shape ({differ[0]}: {source_shapes.get(differ[0], 'absent')} there, "
                f"{target_shapes.get(differ[0], 'absent')} here{f', and {len(differ) - 1} more' if len(differ) > 1 else ''})")
        raise DataMismatch(f"init_from {export} is {what}, not this run's {kind.get(target.router, target.router)} "
                           f"model {target.name!r}: start from an export of the same preset (its config.json says "
                           f"{source.name!r})")


# ---------------------------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, without a launcher, create) the process group; return rank, world size, device."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def local_world_size(world_size: int, env: dict[str, str] | None = None) -> int:
    """Ranks on this node, from whichever variable the launcher sets: torchrun's LOCAL_WORLD_SIZE,
    the deepspeed launcher's LOCAL_SIZE (or its CROSS_SIZE nodes), else one node holds them all."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(name):
            return int(env[name])
    if env.get("CROSS_SIZE"):
        return world_size // int(env["CROSS_SIZE"])
    return world_size


def _compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_model(
    config: TrainConfig, expert_shard: tuple[int, int] | None = None, device: torch.device | str = "cpu",
    owned_block: tuple[int, int] | None = None, tp: TensorParallel | None = None,
    keep_modules: Callable[[str], bool] | None = None,
) -> PanguModel:
    """The initial model, identical on every rank (seeded; DeepSpeed broadcasts it again anyway).

    With `expert_shard` (ep rank, ep size) the RRE layers hold only this rank's experts, so no rank
    ever holds all experts of a model like sigma-1t (1.07T expert parameters). A new model is built on
    `device` one module at a time (`pangu_model.materialize`): the host never holds the whole model,
    and with ECSS the experts are made in host memory, where they stay. With `owned_block` (block,
    replicas: ECSS sharded host state) each layer's expert shard is cut to the rank's owned block as soon
    as it is made, so start-up holds one layer's shard, not all of them. With `tp` (tensor parallelism)
    each rank keeps its slices of the dense model's weights, so every tensor-parallel size starts from
    the same weights. With `keep_modules` (a pipeline stage's modules, by
    qualified name) a new model gives weights to those only; the rest stays on the meta device."""
    pangu = config.pangu_config()
    if config.init_from is None:
        from .materialize import build_model_on
        from .moe import ExpertBank

        host = (ExpertBank,) if config.ecss else ()
        trim = None
        if config.ecss and owned_block is not None and owned_block[1] > 1:
            from .ecss import keep_block

            trim = lambda bank: keep_block(bank, *owned_block)  # noqa: E731
        return build_model_on(pangu, device, config.seed, expert_shard, host, trim, tp=tp,
                              keep_modules=keep_modules).train()
    torch.manual_seed(config.seed)
    from .checkpoint import load_checkpoint, load_config, read_parts
    from .inherit import sigma_from_dense

    inherited = None
    if load_config(config.init_from).router == "dense" and pangu.router != "dense":
        inherited = sigma_from_dense(load_checkpoint(config.init_from), pangu, expert_shard)
        if as_tensor_parallel(tp) is None:
            return inherited.train()
    # Only this rank's part is read: its expert shard, its tensor slices, its pipeline stage's modules (the
    # others stay on the meta device, as for a new model). A sparse model inherited from a dense one is made
    # whole on the host first (its experts are copies of the dense FFNs), then cut to this rank's slices.
    with on_meta():
        model = PanguModel(pangu, expert_shard, tp=tp)
    split = split_dims(model)
    if inherited is None:
        state = read_parts(config.init_from, model, keep=keep_modules)
    else:
        state = shard_state_dict(inherited.state_dict(), split, tp)
    model.load_state_dict(state, strict=keep_modules is None, assign=True)
    mark_split(model, split)  # the assigned Parameters are new ones
    return model.train()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """One DeepSpeed engine, its data and its checkpoints. `run()` trains; `export()` writes safetensors."""

    def __init__(self, config: TrainConfig, device: torch.device | str | None = None) -> None:
        """`device`: where this rank computes and where its collectives' tensors live (default: its CUDA
        device, else the CPU). Tests set it to tell compute tensors from host ones on a CPU machine."""
        deepspeed_accelerator_follows_torch()
        import deepspeed

        from tokenizer.dataset import PackedRowDataset

        compile_muon_on_first_use()
        config = fit_to_data(config)
        self.config = config
        from tokenizer.pack import packed_with

        self.packed_with = packed_with(read_data_contract(config.data))  # recorded in every checkpoint
        self.output = Path(config.output)
        self.stop_requested = False
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.rank, self.world_size, self.device = init_distributed()
        if device is not None:
            self.device = torch.device(device)
        self.pangu = config.pangu_config()
        self.total_steps = config.train_steps
        # Refused before the output is made: a run that cannot start leaves nothing behind
        self._check_topology()
        self.plan = self._check_plan()
        # Rank 0 claims the output for the run (run_lock.py): a second run into it is refused, not interleaved
        self._claim = claim_output(self.output) if self.rank == 0 else None
        if self.device.type == "cuda":
            from .speed import configure_cuda_matmul

            configure_cuda_matmul()  # fp32 matmuls on TF32 tensor cores (the fp32 MFU peak assumes it)
        # Data-parallel coordinates (the rows a rank reads, its dropout seed): the global ones without tensor
        # or pipeline parallelism; with them, every rank of a tensor group and every stage of a pipeline reads
        # the same rows (the first stage feeds the inputs, the last the labels).
        info = self._layout().info(self.rank)
        self.dp_rank = info.dp_rank
        self.dp_size = self.world_size // (config.tensor_parallel * config.pipeline_parallel)
        self.stage = info.stage
        self.tp, self.mpu = self._tensor_parallel_groups()  # with pipeline stages: the stage's, below

        ep = config.expert_parallel
        ecss_groups = self._ecss_groups() if config.ecss else (None, None, None)
        # With pipeline stages: the loss of the last stage, which also sums the per-domain losses it sees.
        self.pipeline_loss = None
        if config.pipeline_parallel > 1:
            model = self._pipeline_stage()
            self.tp = model.tp
        else:
            model = build_model(config, (self._ep_rank(), ep) if ep > 1 else None, self.device,
                                self._owned_block(ecss_groups[2]), tp=self.tp)
        self.expert_layers: list[str] = [n for n, m in model.named_modules() if isinstance(m, RandomRoutedExperts)]
        self._routing_tables: dict[str, torch.Tensor] = {}
        if self.pipeline_loss is not None and self.pangu.router == "rre":
            self.expert_layers, self._routing_tables = self._pipeline_routing_tables(model)
        self.sparse_layers = list(model.sparse_layers()) if self.pipeline_loss is None else []
        if config.expert_parallel > 1 and not config.ecss:
            to_deepspeed_moe(model, config.expert_parallel, self._ep_rank())
        self.ecss = None
        if config.ecss:
            from .ecss import ExpertOffload

            data_group, ep_group, replica_group = ecss_groups
            self.ecss = ExpertOffload(
                model, config.optimizer, self.device, _compute_dtype(config.precision), group=data_group,
                ep_group=ep_group, replica_group=replica_group, shard_states=config.ecss_shard_states,
                host_threads=config.ecss_host_threads, delayed_update=config.ecss_delayed_update,
                delay_after=config.ecss_delayed_update_after,
            )
        from .speed import maybe_compile

        model.set_attention_backend(config.attention_backend)
        maybe_compile(model, config.compile)
        groups = parameter_groups(model, config.optimizer)
        self.ds_config = deepspeed_config(config, self.world_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=self.ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, config.optimizer, self.total_steps),
            dist_init_required=False,
            mpu=self.mpu,
        )
        self.model: PanguModel = self.engine.module
        if config.expert_parallel > 1 and not config.ecss:
            self._check_expert_groups()
        if self.pipeline_loss is not None:
            self._check_pipeline_groups()
        elif self.tp is not None:
            self._check_tensor_groups()

        # Domain-affine steps: one domain per node and step (a node holds whole expert-parallel groups, so
        # their steps touch one domain's experts; the rows do not depend on ep). The dataset's state
        # records the grouping: a resume with another sampler is refused.
        affine = config.domain_affine if config.domain_affine is not None else self.pangu.router == "rre"
        node_groups = None
        if affine:  # the data-parallel ranks of each node (the global ranks without tensor parallelism)
            ranks = self._layout().ranks
            node_groups = [sorted({i.dp_rank for i in ranks if i.node == n}) for n in sorted({i.node for i in ranks})]
        self.dataset = PackedRowDataset(
            config.data, seq_len=config.row_length, weights=config.mixture, seed=config.data_seed,
            rank=self.dp_rank, world_size=self.dp_size, validation_fraction=config.validation_fraction,
            domain_groups=node_groups, rows_per_step=config.micro_batch_size * config.gradient_accumulation_steps,
        )
        self.validation = []
        if config.validation_every and config.validation_fraction > 0:
            from tokenizer.dataset import validation_examples

            self.validation = validation_examples(config.data, config.row_length, config.validation_fraction,
                                                  config.validation_rows)
        self.domain_names = dict(self.dataset.shards.domain_names)
        self.num_domains = max(self.domain_names, default=-1) + 1
        if self.validation and self.rank == 0:
            self._say_unvalidated_domains()
        if self.pipeline_loss is not None:
            self.pipeline_loss.num_domains = max(1, self.num_domains)
        self._check_domains()
        self.step = 0
        if config.resume:
            self.resume()
        self._rows = iter(self.dataset)

    # ---- checks ---------------------------------------------------------------------------------
    def _check_topology(self) -> None:
        check_layout(self.config, self.world_size, local_world_size(self.world_size))

    def _check_plan(self) -> Any:
        """The planner's verdict on this run with this machine's GPU and host memory (pangu_model/plan.py):
        a run that cannot fit is refused, with the numbers, before anything is allocated."""
        cuda = self.device.type == "cuda"
        gpu_name = torch.cuda.get_device_name(self.device) if cuda else None
        gpu_memory = torch.cuda.get_device_properties(self.device).total_memory if cuda else None
        return check_plan(self.config, self.world_size, local_world_size(self.world_size), gpu_name, gpu_memory,
                          this_machine_ram())

    def _layout(self) -> Any:
        """The run's rank layout and process groups (pangu_model/topology.py)."""
        local = local_world_size(self.world_size)
        cluster = ClusterSpec(nodes=self.world_size // local, gpus_per_node=local)
        return Layout.build(cluster, ParallelPlan(tensor=self.config.tensor_parallel,
                                                  pipeline=self.config.pipeline_parallel,
                                                  expert=self.config.expert_parallel))

    def _tensor_parallel_groups(self) -> tuple[TensorParallel | None, ModelParallelUnit | None]:
        """This rank's tensor group and the `mpu` DeepSpeed gets (its data-parallel group), both from the
        topology's layout; (None, None) without tensor parallelism, and with pipeline stages, where DeepSpeed
        takes no `mpu` (its grid is one) and the stage's layers split over the grid's tensor group."""
        if self.config.tensor_parallel == 1 or self.config.pipeline_parallel > 1:
            return None, None
        groups = self._layout().groups()
        found: dict[str, tuple[Any, list[int]]] = {}
        for kind in ("tensor", "data"):  # every rank creates every group, in the same order
            for ranks in groups[kind]:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    found[kind] = (group, ranks)
        tp = TensorParallel.of(found["tensor"][0])
        return tp, ModelParallelUnit(tp, *found["data"])

    def _pipeline_stage(self) -> Any:
        """This rank's pipeline stage (pipeline_parallel.py) holding its part of the model's initial
        weights: the other stages' modules are never made here (they stay on the meta device while the
        initial weights are drawn), so every pipeline size starts from the weights of pipeline 1. With tensor
        parallelism the stage's layers are tensor-parallel over the group DeepSpeed's grid makes for the
        topology's tensor ranks, and hold this rank's slices of those weights."""
        from .pipeline_parallel import PanguPipeline, PipelineLoss, stage_module_names

        pp = self.config.pipeline_parallel
        counts = stage_layers(self.pangu.num_layers, pp)  # the planner's rule
        if self.rank == 0:
            print(f"pangu_model.train: pipeline {describe_split(self.pangu.num_layers, pp)}", flush=True)
        self.pipeline_loss = PipelineLoss(1, self.pangu.pad_token_id)  # domains: set once the data is read
        stage = PanguPipeline(self.pangu, self._layout().deepspeed_topology(), self.pipeline_loss, counts)
        weights = build_model(self.config, device=self.device, tp=stage.tp,
                              keep_modules=stage_module_names(self.pangu, self.stage, counts))
        stage.load_pangu_state_dict(weights.state_dict())
        return stage.train()

    def _check_pipeline_groups(self) -> None:
        """DeepSpeed's pipeline grid (built from the topology's ProcessTopology) has the topology's groups: data,
        pipeline, tensor (the one the stage's layers split over) and, on the first and last stage, the tied
        embedding's group (this tensor rank's slice on both stages of this rank's pipeline)."""
        grid = self.engine.grid
        layout = self._layout()
        data, pipe = grid.get_data_parallel_group_ranks(), grid.pp_group
        if data not in layout.data_parallel_groups or pipe not in layout.pipeline_groups or grid.stage_id != self.stage:
            raise RuntimeError(f"DeepSpeed's data group {data} / pipeline group {pipe} (stage {grid.stage_id}) are "
                               f"not the topology's ({layout.data_parallel_groups}, {layout.pipeline_groups})")
        if self.tp is not None:
            tensor = dist.get_process_group_ranks(self.tp.group)
            if tensor != grid.slice_group or tensor not in layout.tensor_groups:
                raise RuntimeError(f"the stage's tensor group {tensor} is not DeepSpeed's ({grid.slice_group}) or "
                                   f"not the topology's ({layout.tensor_groups})")
        tied = self.engine.module.tied_comms
        if tied:
            info, last = layout.info(self.rank), self.config.pipeline_parallel - 1
            ranks = [layout.rank_of(stage, info.dp_rank, info.tp_rank) for stage in (0, last)]
            if [comm["ranks"] for comm in tied.values()] != [ranks]:
                raise RuntimeError(f"DeepSpeed ties the word embedding over {[c['ranks'] for c in tied.values()]}, "
                                   f"not over this tensor rank's first and last stage {ranks}")

    def _check_tensor_groups(self) -> None:
        """The groups DeepSpeed partitions and reduces over are the topology's data-parallel groups."""
        from deepspeed.utils import groups

        layout = self._layout()
        data = dist.get_process_group_ranks(groups._get_data_parallel_group())
        tensor = dist.get_process_group_ranks(self.tp.group)
        if data not in layout.data_parallel_groups or tensor not in layout.tensor_groups:
            raise RuntimeError(f"DeepSpeed's data group {data} / tensor group {tensor} are not the topology's "
                               f"({layout.data_parallel_groups}, {layout.tensor_groups})")

    def _ep_rank(self) -> int:
        return self._layout().info(self.rank).ep_rank

    def _owned_block(self, replica_group: Any) -> tuple[int, int] | None:
        """(block, replicas) of this rank's ECSS block with sharded host state, else None: the replica group
        is the expert-data-parallel one, or every rank without expert parallelism."""
        if not (self.config.ecss and self.config.ecss_shard_states) or self.dp_size == 1:
            return None
        from .ecss import owned_block

        if self.config.expert_parallel == 1:
            return owned_block(self.dp_rank, 0, self.dp_size), self.dp_size
        replicas = dist.get_world_size(replica_group)
        return owned_block(dist.get_rank(replica_group), self._ep_rank(), replicas), replicas

    def _ecss_groups(self) -> tuple[Any, Any, Any]:
        """ECSS's groups for this rank, from the topology's rank layout: the data-parallel group (routed sets are
        united and gradients averaged over it; None in a world of one), the expert-parallel group and the
        expert-data-parallel (replica) group (None, None without expert parallelism).

        With tensor parallelism every group lies inside one tensor rank, so each tensor rank runs an ECSS of
        its own, and the ranks of a tensor group run the same one: they compute the same experts on the same
        tokens, so their expert gradients, norms and host updates are equal, step for step. That is the
        simplest correct layout (no exchange between them; `_writes_experts` has tensor rank 0 write the host
        state), at the cost of a copy of the host state per tensor rank. The data-parallel groups are new ones
        (ECSS issues its gradient collectives during the backward, beside DeepSpeed's reductions over the mpu's
        data-parallel groups)."""
        layout = self._layout()
        kinds = ("data",) if self.tp is not None else ()
        kinds += ("expert", "expert_data") if self.config.expert_parallel > 1 else ()
        found: dict[str, Any] = {}
        # Every rank must create every group, in the same order (torch.distributed.new_group).
        for kind in kinds:
            for ranks in layout.groups()[kind]:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    found[kind] = group
        data = found.get("data", dist.group.WORLD) if self.dp_size > 1 else None
        return data, found.get("expert"), found.get("expert_data")

    def _check_expert_groups(self) -> None:
        """DeepSpeed built its expert and expert-data-parallel groups itself: they must be the topology's (an
        expert group inside a node; with tensor parallelism, among the ranks of one tensor rank, so that the
        ranks of a tensor group hold the same expert shard)."""
        from deepspeed.utils import groups

        layout = self._layout()
        name = f"ep_size_{self.config.expert_parallel}"
        for what, group, ours in (("expert", groups._get_expert_parallel_group(name), layout.expert_parallel_groups),
                                  ("expert-data", groups._get_expert_data_parallel_group(name),
                                   layout.expert_data_parallel_groups)):
            theirs = dist.get_process_group_ranks(group)
            if theirs not in ours:
                raise RuntimeError(f"DeepSpeed {what} group {theirs} is not one of the topology's {ours}")

    def _say_unvalidated_domains(self) -> None:
        """A domain of fewer than two documents has none to hold out (tokenizer.dataset.held_out): its
        validation loss is missing from every report, which the log says once rather than leave silent."""
        import numpy as np

        validated = {int(example["domain_ids"][0]) for example in self.validation}
        trained = {int(d) for d in np.unique(self.dataset.shards.doc_domains)}
        missing = sorted(trained - validated)
        if missing:
            names = ", ".join(str(self.domain_names.get(d, d)) for d in missing[:5]) + (", ..." if len(missing) > 5 else "")
            print(f"pangu_model.train: no validation loss for {len(missing)} domain(s), {names}: too few documents "
                  f"(or tokens) to hold any out", flush=True)

    def _check_domains(self) -> None:
        if self.pangu.router != "rre":
            return
        low = self.pangu.domain_id_offset
        high = low + self.pangu.num_domains - 1
        bad = [f"{i} ({name})" for i, name in self.domain_names.items() if not low <= i <= high and i in self.dataset.domains]
        if bad:
            raise ValueError(f"data domains {bad} outside the model's domain ids [{low}, {high}]")

    # ---- signals --------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only a flag: the step in flight finishes, then every rank checkpoints at the same step.
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        """After every step, on every rank: stop when any rank got SIGTERM or the stop file exists."""
        if self.rank == 0 and not self.stop_requested and (self.output / STOP_FILE).exists():
            self.stop_requested = True
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- data -----------------------------------------------------------------------------------
    def _micro_batch(self) -> dict[str, torch.Tensor]:
        return self._stacked([next(self._rows) for _ in range(self.config.micro_batch_size)])

    def _stacked(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rows as one batch on the compute device."""
        keys = ("input_ids", "labels", "position_ids", "domain_ids")
        return {k: torch.stack([r[k] for r in rows]).to(self.device, non_blocking=True) for k in keys}

    def _seed(self, step: int, micro: int) -> None:
        torch.manual_seed(self._dropout_seed(step, micro))

    def _dropout_seed(self, step: int, micro: int) -> int:
        # Dropout masks are a function of (seed, step, micro-batch, data-parallel rank): a resumed run draws
        # the same masks as an uninterrupted one without saving any RNG state, and the ranks of a tensor
        # group draw the same ones (the model forks a stream per rank for its split heads); each pipeline
        # stage seeds itself with it before its part of a micro-batch.
        gas = self.config.gradient_accumulation_steps
        return self.config.seed * 1_000_003 + (step * gas + micro) * self.dp_size + self.dp_rank

    # ---- training -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from .metrics import MetricsLogger, domain_loss_sums, flops_per_token, peak_flops

        config = self.config
        num_experts = self.pangu.total_experts
        metrics = MetricsLogger(
            self.output, self.total_steps, self.step, self.domain_names, self.num_domains,
            self.expert_layers, num_experts, rank=self.rank, log_every=config.log_every,
            progress=config.progress_bar, tensorboard=config.tensorboard,
            flops_per_token=flops_per_token(self.pangu, config.row_length),
            peak_flops=peak_flops(config.precision, config.peak_tflops), world_size=self.world_size,
            device=self.device,
        )
        status = "completed"
        self.engine.train()
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                row = self._train_step(metrics, domain_loss_sums)
                if config.throttle_s:
                    time.sleep(config.throttle_s)
                self.step += 1
                metrics.step(self.step, row, row.pop("_tokens"), time.perf_counter() - started)
                last = self.step == self.total_steps
                if self.validation and (last or self.step % config.validation_every == 0):
                    metrics.validation(self.step, self.validate())
                stop = self._agree_to_stop()
                if stop or (config.checkpoint_every and self.step % config.checkpoint_every == 0):
                    self.save_checkpoint()
                if stop:
                    status = "preempted"
                    if self.rank == 0:
                        (self.output / STOP_FILE).unlink(missing_ok=True)  # consumed: a rerun resumes
                    break
            if status == "completed":
                if not self._latest_tag() == self._tag(self.step):
                    self.save_checkpoint()
                if config.export and self._export_is_current():
                    if self.rank == 0:
                        print(f"pangu_model.train: {self.output / EXPORT_DIR} holds step {self.step} already: kept",
                              flush=True)
                elif config.export:
                    self.export(self.output / EXPORT_DIR)
        finally:
            metrics.close()
        return {
            "status": status,
            "step": self.step,
            "output": str(self.output),
            "losses": [r["loss"] for r in metrics.history],
            "export": str(self.output / EXPORT_DIR) if status == "completed" and config.export else None,
        }

    def _train_step(self, metrics: Any, domain_loss_sums: Any) -> dict[str, float]:
        config = self.config
        gas = config.gradient_accumulation_steps
        batches = [self._micro_batch() for _ in range(gas)]
        if self.pipeline_loss is not None:
            return self._pipeline_train_step(metrics, batches)
        if self.ecss is not None:
            # Known before the forward pass: the experts these rows route to (SPEC §5.2).
            self.ecss.fetch(self.ecss.plan(batches))
        # Sums stay on the device until the step ends: no device→host sync per micro-batch.
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, lm loss, aux loss, tokens
        for micro, batch in enumerate(batches):
            self._seed(self.step, micro)
            out = self.engine(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                domain_ids=batch["domain_ids"], labels=batch["labels"],
            )
            if self.ecss is not None and micro == gas - 1:
                # The expert gradients of this backward are final: each layer's return to the host starts
                # from its gradient hooks, beside the backward of the layers below it.
                self.ecss.last_micro_batch()
            self.engine.backward(out.loss)
            grad_scale = float(getattr(self.engine.optimizer, "cur_scale", 1.0) or 1.0) \
                if config.precision == "fp16" else 1.0
            self.engine.step()
            sums += torch.stack([out.loss.detach().double() / gas, out.lm_loss.detach().double() / gas,
                                 out.aux_loss.detach().to(self.device, torch.float64) / gas,
                                 (batch["labels"] != -100).sum().double()])
            domain_sums = domain_loss_sums(out.token_loss, batch["labels"], batch["domain_ids"],
                                           max(1, self.num_domains), self.pangu.pad_token_id)
            if self._counts_rows():
                metrics.add_domain_losses(domain_sums)
            if self.expert_layers and self._counts_rows():  # a tensor group routes its rows once
                metrics.add_expert_load(self._expert_load(batch))
        lr = lr_at(self.step, config.optimizer, self.total_steps)
        loss, lm_loss, aux_loss, tokens = sums.tolist()  # the step's one sync
        row: dict[str, float] = {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "lr": lr,
                                 "_tokens": int(tokens) if self._counts_rows() else 0}
        if self.ecss is not None:
            stats = self.ecss.step(lr, grad_scale=grad_scale, skip=not self.engine.was_step_applied(),
                                   step=self.step + 1)
            row["experts_updated"] = float(stats["experts_updated"])
        norm = self.engine.get_global_grad_norm()
        row["grad_norm"] = float(norm) if norm is not None else float("nan")
        return row

    def _pipeline_train_step(self, metrics: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One step through the pipeline: DeepSpeed's 1F1B schedule over the step's micro-batches (the
        gradient accumulation steps), the tied embedding's gradient summed over the first and last stage,
        then the optimizer step. Every stage gets the loss (averaged over the data-parallel replicas); the
        last stage has the per-domain sums."""
        from .pipeline_parallel import micro_batches

        step = self.step
        self.model.start_step(lambda micro: self._dropout_seed(step, micro))
        loss = float(self.engine.train_batch(micro_batches(batches, routing=bool(self.expert_layers))))
        domain_sums = self.pipeline_loss.drain(self.device)
        tokens = int(sum((batch["labels"] != -100).sum() for batch in batches))
        if self._counts_rows():
            metrics.add_domain_losses(domain_sums)
            for batch in batches if self.expert_layers else ():
                metrics.add_expert_load(self._expert_load(batch))
        norm = self.engine.get_global_grad_norm()
        return {"loss": loss, "lm_loss": loss, "aux_loss": 0.0, "lr": lr_at(step, self.config.optimizer, self.total_steps),
                "_tokens": tokens if self._counts_rows() else 0,
                "grad_norm": float(norm) if norm is not None else float("nan")}

    def _counts_rows(self) -> bool:
        """Whether this rank's rows count in the logs: the ranks of a tensor group share theirs (rank 0 of
        the group counts them), and the stages of a pipeline too (the last one, which sees the losses)."""
        last_stage = self.pipeline_loss is None or self.stage == self.config.pipeline_parallel - 1
        return last_stage and (self.tp is None or self.tp.rank == 0)

    @torch.no_grad()
    def validate(self) -> torch.Tensor:
        """[domains, 2]: summed token loss and token count of the held-out rows, over all ranks.

        Collective: the rows are dealt round-robin over the ranks, and every rank runs the same number
        of micro-batches (short ones padded with rows that score nothing), since expert parallelism
        exchanges tokens in every forward."""
        from .metrics import domain_loss_sums

        rows = self.validation[self.dp_rank::self.dp_size]
        size = self.config.micro_batch_size
        batches = -(-len(self.validation) // (size * self.dp_size))
        blank = {**self.validation[0], "labels": torch.full_like(self.validation[0]["labels"], -100)}
        rows = rows + [blank] * (batches * size - len(rows))
        sums = torch.zeros(max(1, self.num_domains), 2, dtype=torch.float64, device=self.device)
        if self.pipeline_loss is not None:
            return self._pipeline_validate(rows, batches, sums)
        self.engine.eval()
        try:
            for b in range(batches):
                batch = self._stacked(rows[b * size:(b + 1) * size])
                if self.ecss is not None:
                    self.ecss.fetch(self.ecss.plan([batch]), training=False)
                out = self.engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  domain_ids=batch["domain_ids"], labels=batch["labels"])
                sums += domain_loss_sums(out.token_loss, batch["labels"], batch["domain_ids"], sums.shape[0],
                                         self.pangu.pad_token_id)
                if self.ecss is not None:
                    self.ecss.release()
        finally:
            self.engine.train()
        if self.world_size > 1:  # over the data-parallel ranks (a tensor group holds one copy of its rows)
            dist.all_reduce(sums, group=None if self.mpu is None else self.mpu.get_data_parallel_group())
        return sums.cpu()

    def _pipeline_validate(self, rows: list[dict[str, torch.Tensor]], batches: int, sums: torch.Tensor
                           ) -> torch.Tensor:
        """`validate` through the pipeline: the last stage's loss function sums the held-out rows' losses per
        domain; the other stages add zeros."""
        from .pipeline_parallel import micro_batches

        size = self.config.micro_batch_size
        chunks = [self._stacked(rows[b * size:(b + 1) * size]) for b in range(batches)]
        self.pipeline_loss.drain(self.device)  # nothing of training is pending; start from zero
        self.engine.eval_batch(micro_batches(chunks, routing=bool(self.expert_layers)), compute_loss=True, bcast_loss=False,
                               num_micro_batches=batches)
        drained = self.pipeline_loss.drain(self.device)
        if self._counts_rows():  # the ranks of the last stage's tensor group hold the same sums
            sums += drained
        self.engine.train()
        if self.world_size > 1:
            dist.all_reduce(sums)
        return sums.cpu()

    @torch.no_grad()
    def _expert_load(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[RRE layers, experts] tokens per expert, from the routing table (same on every backend)."""
        from .moe import expert_counts, rre_route

        loads = []
        for name in self.expert_layers:
            if self._routing_tables:  # a pipeline stage: the tables of every stage's layers
                ids = rre_route(self.pangu, self._routing_tables[name], batch["input_ids"], batch["domain_ids"])
            else:
                ids = self.model.get_submodule(name).route(batch["input_ids"], batch["domain_ids"])
            loads.append(expert_counts(ids.reshape(-1), self.pangu.total_experts))  # on the device, no sync
        return torch.stack(loads)

    def _pipeline_routing_tables(self, stage: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The RRE layers of the whole model in PanguModel's names, and their routing tables, gathered from the
        stages that hold them (the tables a stage loaded, an `init_from` model's included): the last stage logs
        the expert load of every layer, as a run without a pipeline does."""
        own = self._pangu_names({name: module.token_to_expert.detach().cpu() for name, module in stage.named_modules()
                                 if isinstance(module, RandomRoutedExperts)})
        stages: list[Any] = [None] * self.world_size
        dist.all_gather_object(stages, own)
        tables = {name: table.to(self.device) for part in stages for name, table in part.items()}
        with on_meta():
            order = [n for n, m in PanguModel(self.pangu).named_modules() if isinstance(m, RandomRoutedExperts)]
        return order, {name: tables[name] for name in order}

    # ---- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def _tag(step: int) -> str:
        return f"step{step:08d}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / CHECKPOINT_DIR

    def _latest_tag(self) -> str | None:
        return latest_checkpoint_tag(self.output)

    def save_checkpoint(self) -> Path:
        """DeepSpeed state, then ours, then the `latest` pointer (so a partial save is never picked)."""
        tag = self._tag(self.step)
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        directory = self.checkpoint_dir / tag
        directory.mkdir(parents=True, exist_ok=True)
        trainer_state = {
            "step": self.step,
            "dataset": self.dataset.state_dict(),
            "fingerprint": self.config.fingerprint(),
            "tokenizer_sha256": self.packed_with,  # its ids: data of another tokenizer cannot resume it
            "world_size": self.world_size,
            "tensor_parallel": self.config.tensor_parallel,
            "pipeline_parallel": self.config.pipeline_parallel,
            "expert_parallel": self.config.expert_parallel,
        }
        _atomic_torch_save(trainer_state, directory / f"trainer_rank{self.rank:05d}.pt")
        if self.ecss is not None and self._writes_experts():
            # One file per expert shard: its masters and Adam states (replicas of a shard are equal);
            # with sharded host state, one per owner of a block of a shard.
            _atomic_torch_save(self.ecss.state_dict(), directory / self._ecss_path())
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            _atomic_write(self.checkpoint_dir / LATEST, tag)
            write_bytes_atomic(self.checkpoint_dir / TRAIN_CONFIG_FILE, self.config.model_dump_json(indent=2).encode())
            self._prune()
        if self.world_size > 1:
            dist.barrier()
        return directory

    def _ecss_path(self) -> str:
        """This rank's ECSS checkpoint file: one per expert shard, or per owner with sharded host state."""
        ep_rank, _ = self.ecss.shard
        return _ecss_file(ep_rank, self.ecss.owner[0] if self.ecss.sharded else None)

    def _writes_experts(self) -> bool:
        """True on the ranks that write the experts (their checkpoint file, their rows of the export): one rank
        per expert shard (rank 0 without expert parallelism, else the first rank of each expert-data-parallel
        group), each owner of a block of a shard with sharded ECSS host state; with tensor parallelism only
        tensor rank 0 of them (the ranks of a tensor group hold the same experts)."""
        if self.tp is not None and self.tp.rank != 0:
            return False
        if self.ecss is not None and self.ecss.sharded:
            return True
        if self.config.expert_parallel == 1:
            return self.rank == 0
        return any(ranks[0] == self.rank for ranks in self._layout().groups()["expert_data"])

    def _prune(self) -> None:
        tags = sorted(p for p in self.checkpoint_dir.glob("step*") if p.is_dir())
        for old in tags[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        tag = self._latest_tag()
        if tag is None:
            return False
        directory = self.checkpoint_dir / tag
        state = torch.load(directory / f"trainer_rank{self.rank:05d}.pt", weights_only=True)
        refuse_another_run(directory, state, self.config, self.packed_with)  # read once, checked as the flow checks
        held = {"tensor_parallel": "each tensor rank's checkpoint holds its own slices",
                "pipeline_parallel": "each stage's checkpoint holds its own layers",
                "expert_parallel": "each expert-parallel rank's checkpoint holds its own shard of the experts"}
        # Checkpoints from before tensor and pipeline parallelism were 1 × 1; one from before the expert
        # degree was recorded is not checked for it here (its shard files are, when they are loaded).
        written = {"tensor_parallel": 1, "pipeline_parallel": 1,
                   **{field: int(state[field]) for field in held if field in state}}
        changed = [field for field in held if field in written and written[field] != getattr(self.config, field)]
        if changed:  # every degree that differs, in one line (tp 2 × pp 2 onto tp 1 × pp 4 names both)
            raise LayoutError(f"{directory} was written with {' × '.join(f'{f} {written[f]}' for f in changed)} "
                              f"({state['world_size']} ranks), this run has "
                              f"{' × '.join(f'{f} {getattr(self.config, f)}' for f in changed)}: "
                              f"{'; '.join(held[f] for f in changed)}; resume with the same layout (or start a "
                              f"new run from its export with init_from)")
        if state["world_size"] != self.world_size:
            raise LayoutError(f"{directory} was written by {state['world_size']} ranks, this run has "
                              f"{self.world_size}: a checkpoint holds a file per rank and ZeRO's optimizer partitions "
                              f"follow the data-parallel ranks; "
                              f"resume with the same layout (or start a new run from its export with init_from)")
        if self.ecss is not None and not (directory / self._ecss_path()).is_file():
            other = "sharded (ecss_shard_states: true)" if not self.ecss.sharded else "unsharded (ecss_shard_states: false)"
            found = sorted(p.name for p in directory.glob("ecss_experts_ep*.pt"))
            raise ValueError(f"{directory} has no {self._ecss_path()} (found {found[:4]}): its ECSS host state "
                             f"was written {other}; resume with the same ecss_shard_states")
        path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {directory}")
        # The optimizer state brought back the lrs of the old schedule: this run's config decides them.
        self.scheduler.apply()
        if self.ecss is not None:
            self.ecss.load_state_dict(torch.load(directory / self._ecss_path(), weights_only=True))
        self.dataset.load_state_dict(state["dataset"])
        self.step = int(state["step"])
        return True

    # ---- export ---------------------------------------------------------------------------------
    def _export_is_current(self) -> bool:
        """Whether the export already holds the latest checkpoint's weights (a rerun of a finished run: writing
        them again cost a model's worth of writes, and gave the weights a new modification time, so whatever
        remembers their content hash by it hashed them again). Rank 0 decides for every rank (export is
        collective)."""
        current = 0.0
        if self.rank == 0:
            tag = self._latest_tag()
            record = export_record(self.output, tag)
            if record is not None and record.get("step") == self.step:
                current = 1.0
                if record.get("config") != self.config.digest():  # the next rerun of this config is not launched
                    self._record_export(tag, record["files"])
        flag = torch.tensor([current], device=self.device)
        if self.world_size > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _record_export(self, tag: str, files: list[str]) -> None:
        """Written last: the checkpoint's weights are all in the export, which this config made."""
        write_json_atomic(self.checkpoint_dir / tag / EXPORTED_FILE,
                          {"step": self.step, "files": sorted(files), "config": self.config.digest()})

    def _module_state(self, keep_all: bool = True) -> dict[str, torch.Tensor]:
        """The engine module's state with the optimizer's fp32 masters where the module holds bf16/fp16
        copies. Collective: every rank calls it. Without `keep_all`, only the DeepSpeed-MoE experts'
        masters are kept (the rest is the first data-parallel replica's to write)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        state = module.state_dict()
        masters: dict[int, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) not in masters:
                # ZeRO 1/2 and the bf16 optimizer keep fp32 masters in flat partitions: assembling one
                # is a collective over the data-parallel group, so every rank walks the same order.
                full = safe_get_full_fp32_param(param) if param.requires_grad else None
                masters[id(param)] = full if full is not None and (keep_all or ".moe." in name) else param.detach()
            state[name] = masters[id(param)]
        return state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight in PanguModel's names, fp32 on the CPU, experts gathered from their ranks or read
        from the host. Every rank ends up with the whole model: for tests and small models."""
        state = self._module_state()
        if self.ecss is not None:
            state.update(self.ecss.expert_state())
        elif self.config.expert_parallel > 1:
            state = gather_expert_state(self.engine.module, state)
        if self.tp is not None:
            state = gather_state_dict(state, split_dims(self.engine.module), self.tp)
        if self.pipeline_loss is not None:  # every stage's layers, in PanguModel's names
            stages: list[Any] = [None] * self.world_size
            dist.all_gather_object(stages, self._stage_state(state))
            state = {name: tensor for part in stages for name, tensor in part.items()}
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}

    def export(self, directory: str | os.PathLike[str]) -> Path | None:
        """`model.safetensors` + `config.json` that `pangu_model.load_checkpoint` reads back.

        Collective. Nobody gathers the experts: rank 0 lays the file out and writes the dense weights,
        and one rank per expert shard writes its experts' rows in place (`SafetensorsWriter`), so the
        export directory must be on a filesystem that those ranks share (as the checkpoints are). With
        tensor parallelism the ranks of the first data-parallel replica each write their block of rows of
        every split tensor (`tensor_parallel.row_blocks`) and rank 0 the replicated ones: the file is the
        one the same weights give without it.
        """
        from .checkpoint import WEIGHTS_NAME, SafetensorsWriter, TensorSpec, write_config

        directory = Path(directory)
        with on_meta():
            layout = PanguModel(self.pangu).state_dict()
        specs = {k: TensorSpec(torch.float32 if v.is_floating_point() else v.dtype, tuple(v.shape))
                 for k, v in layout.items()}
        state = self._module_state(keep_all=self.dp_rank == 0)
        pieces: list[tuple[str, torch.Tensor, int]] = []
        if self.ecss is not None:
            pieces = self.ecss.expert_rows()
        elif self.config.expert_parallel > 1:
            pieces = local_expert_rows(self.engine.module, state)
        if not self._writes_experts():
            pieces = []  # replicas of a shard hold the same experts: one of them writes (sharded: each its block)
        split = split_dims(self.engine.module) if self.tp is not None else {}
        if self.pipeline_loss is not None:
            # Each stage of the first replica writes its layers, in PanguModel's names (the last stage's copy
            # of the tied embedding is the first stage's: neither its rows nor the whole of it come from here).
            state, split = self._pangu_names(state), self._pangu_names(split)
            if self.stage > 0:
                state.pop("word_embedding.weight", None)
                split.pop("word_embedding.weight", None)
            first_of_group = self.tp is None or self.tp.rank == 0  # replicated tensors: one rank of the group
            dense = state if self.dp_rank == 0 and first_of_group else {}
        else:
            dense = without_moe_keys(self.engine.module, state) if self.rank == 0 else {}
        if self.tp is not None:
            if self.dp_rank == 0:  # the first replica's tensor groups (a collective among the ranks of each)
                pieces += row_blocks(state, split, self.tp)
            dense = {name: tensor for name, tensor in dense.items() if name not in split}
        writer = SafetensorsWriter(directory / f".{WEIGHTS_NAME}.tmp", specs)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            writer.create()
        self._barrier()
        try:
            for name, tensor in dense.items():
                writer.write(name, tensor)
            for name, rows, first in pieces:
                writer.write(name, rows, first)
        finally:
            writer.close()
        written = [(name, len(t) if t.dim() else 1, 0) for name, t in dense.items()]
        written += [(name, len(rows), first) for name, rows, first in pieces]
        everyone = [written]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, written)
        if self.rank == 0:
            missing = _uncovered_rows(specs, [piece for part in everyone for piece in part])
            if missing:
                writer.path.unlink(missing_ok=True)
                raise RuntimeError(f"export of {directory}: no rank wrote {missing[:5]}")
            os.replace(writer.path, directory / WEIGHTS_NAME)
            write_config(self.pangu, directory)
            self._bundle_data_contract(directory)
            tag = self._latest_tag()
            if directory == self.output / EXPORT_DIR and tag == self._tag(self.step):
                self._record_export(tag, [p.name for p in directory.iterdir()])  # a rerun need not write it
        self._barrier()
        return directory if self.rank == 0 else None

    def _stage_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pipeline stage's state (DeepSpeed's names) in PanguModel's names, on the CPU."""
        return {name: tensor.detach().cpu() for name, tensor in self._pangu_names(state).items()}

    def _pangu_names(self, by_name: dict[str, Any]) -> dict[str, Any]:
        """A pipeline stage's {DeepSpeed's name: value} in PanguModel's names."""
        from .pipeline_parallel import pangu_name

        return {pangu_name(name, self.pangu.num_layers): value for name, value in by_name.items()}

    def _bundle_data_contract(self, directory: Path) -> None:
        """What evaluation needs beside the weights: the tokenizer (`tokenizer/`) and the domain map with
        tokens per domain (`domains.json`), so that an export directory stands on its own."""
        from tokenizer.pack import DOMAINS_FILE

        contract = read_data_contract(self.config.data)
        tokenizer = data_tokenizer(contract)
        if tokenizer is not None:
            tokenizer.save(directory / EXPORT_TOKENIZER_DIR)
        write_json_atomic(directory / DOMAINS_FILE, contract)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if getattr(self, "ecss", None) is not None:
            self.ecss.close()  # a delayed host update still in flight
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
        if getattr(self, "_claim", None) is not None:
            os.close(self._claim)  # the output is free for the next run
            self._claim = None


def _uncovered_rows(specs: dict[str, Any], written: list[tuple[str, int, int]]) -> list[str]:
    """Tensors (or row ranges) of `specs` that the written pieces (name, rows, first row) leave out or
    write twice."""
    rows: dict[str, list[int]] = {name: [0] * (spec.shape[0] if spec.shape else 1) for name, spec in specs.items()}
    for name, count, first in written:
        if name not in rows:
            return [f"{name} (not in the model)"]
        for row in range(first, first + count):
            rows[name][row] += 1
    return [f"{name} rows {[i for i, c in enumerate(hits) if c != 1][:3]}"
            for name, hits in rows.items() if any(c != 1 for c in hits)]


def _ecss_file(ep_rank: int, owner: int | None = None) -> str:
    if owner is not None:  # sharded host state: one file per owner of a block of the shard
        return f"ecss_experts_ep{ep_rank:03d}_owner{owner:03d}.pt"
    return f"ecss_experts_ep{ep_rank:03d}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as fh:
        torch.save(obj, fh)


def _atomic_write(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def train(config: TrainConfig, export_only: bool = False) -> dict[str, Any]:
    """Run (or resume) training; with `export_only`, load the latest checkpoint and export it."""
    if export_only and (not config.resume or latest_checkpoint_tag(config.output) is None):
        raise NothingToExport(f"{Path(config.output) / CHECKPOINT_DIR}: no checkpoint to export (train into this "
                              f"output first, or give the output of a run that has checkpointed)")
    trainer = Trainer(config)
    try:
        if export_only:
            trainer.export(Path(config.output) / EXPORT_DIR)
            return {"status": "exported", "step": trainer.step, "output": config.output,
                    "export": str(Path(config.output) / EXPORT_DIR)}
        return trainer.run()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain a PanGu-α / PanGu-Σ model with DeepSpeed.")
    parser.add_argument("--config", required=True, help="pretrain preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys, YAML values), e.g. optimizer.lr=3e-4")
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    # A user error (the preset, an override, data the model cannot fit): one message, no traceback.
    try:
        config = load_train_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as exc:
        from cleaning.errors import one_line

        print(f"pangu_model.train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        result = train(config, export_only=args.export_only)  # the Trainer fits the model to the data first
    except (DataMismatch, LayoutError, ResumeMismatch, NothingToExport, PlanDoesNotFit, OutputInUse) as exc:
        print(f"pangu_model.train: error: {exc}", file=sys.stderr)
        return 2
    if dist.is_initialized() and dist.get_rank() == 0 or not dist.is_initialized():
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return SIGTERM_EXIT_CODE if result["status"] == "preempted" else 0


if __name__ == "__main__":
    # The work is done and flushed: skip interpreter teardown, where a communication thread destroyed
    # while joinable has aborted a finished rank (SIGABRT, "terminate called without an active
    # exception") in CI runs.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
