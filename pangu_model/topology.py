"""Cluster topology: nodes × accelerators → DeepSpeed hostfile, rank layout and process groups.

The layout follows the placement rule of PanGu-α (SPEC §5.1) on Ascend 910 servers of 8 chips:

* **tensor** (op-level) parallel inside a server: the highest-bandwidth links;
* **expert** parallel inside a server too: the all-to-all of a MoE layer is the heaviest collective,
  so an expert group never leaves a node (``ep ≤ 8``; with tensor parallel, ``tp·ep ≤ 8``);
* **pipeline** stages across the servers of one rack;
* **data** parallel across racks.

Rank order
----------
A global rank is the position of a process in the launcher's world: DeepSpeed's launcher numbers
the hosts of the hostfile in order, ``slots`` ranks each (``deepspeed/launcher/launch.py``
``global_rank_mapping``), so rank ``r`` lives on node ``r // gpus_per_node`` with local rank
``r % gpus_per_node``.  The hostfile must therefore list the servers rack by rack.

The data-parallel index ``dp`` is split as ``dp = replica · ep + ep_rank`` (``replica`` in
``[0, dp / ep)``) and the axes are nested, outermost first, as ``replica, stage, ep_rank, tp_rank``::

    rank = ((replica · pp + stage) · ep + ep_rank) · tp + tp_rank

With ``ep = 1`` this is exactly ``rank = (dp · pp + stage) · tp + tp_rank`` (the DeepSpeed
``ProcessTopology(axes=["data", "pipe", "model"])`` order).  Consequences:

* a tensor group is ``tp`` consecutive ranks, and since ``tp`` divides ``gpus_per_node`` it never
  crosses a node;
* an expert-parallel group is ``ep`` ranks at stride ``tp`` inside a block of ``ep·tp`` consecutive
  ranks; ``ep·tp`` divides ``gpus_per_node``, so it never crosses a node;
* one *pipeline block* (one replica: all stages of ``ep·tp`` pipelines) is ``pp·ep·tp``
  consecutive ranks, i.e. consecutive servers; when ``ep·tp == gpus_per_node`` (PanGu-α 200B:
  ``tp = 8``) every stage is a different server;
* replicas follow each other, so with blocks as large as a rack (200B: 16 stages × 8 = 128 ranks =
  16 servers) every data-parallel replica is a rack of its own.

Rack rule
---------
Racks are ``nodes_per_rack`` consecutive hostfile entries (the last one may be partial).  A
pipeline block must lie inside one rack: no pipeline ever crosses a rack boundary.  This is
checked block by block, so it also holds on clusters smaller than one rack.  It implies
``pp · ep · tp ≤ nodes_per_rack · gpus_per_node``, i.e. ``pp ≤ nodes_per_rack · gpus_per_node /
(tp·ep)``.

``nodes_per_rack`` defaults to 16.  This is **an assumption**, not a published figure: SPEC §5.1
gives 2048 chips = 256 servers with 16 pipeline stages (one server each at tp 8) laid out "across the
servers of a rack" and 16-way data parallel "across racks", which is consistent with 16 racks of 16
servers.  Set it to the real value of your cluster.

DeepSpeed's groups
------------------
Expert groups are built with DeepSpeed's rule (``deepspeed.utils.groups``, E + D ordering): the
data-parallel group of a ``(stage, tp_rank)`` is cut into chunks of ``ep`` consecutive data-parallel
ranks (the expert-parallel groups) and the ranks at the same position of every chunk form the
expert-data-parallel groups.  See :meth:`Layout.matches_deepspeed` for when the raw rank lists are
identical to what DeepSpeed builds.  With tensor parallelism the training program builds the tensor and
data-parallel groups from this layout itself and hands DeepSpeed the data-parallel ones (an ``mpu``,
``pangu_model/tensor_parallel.py``); it checks at start that DeepSpeed uses them. With pipeline stages it
hands DeepSpeed :meth:`Layout.deepspeed_topology` and checks that the pipeline engine's data-parallel,
pipeline and (with tensor parallelism) tensor groups are these, and that the tied word embedding is tied
between the same tensor rank of the first and last stage (``pangu_model/pipeline_parallel.py``).

No Prefect and no torch here: pure Python, so the pretrain flow, the CLI and tests can use it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cleaning.writers import write_bytes_atomic
from cleaning.yamlfile import names_a_file, read_mapping

ASCEND_910_PER_SERVER = 8
DEFAULT_NODES_PER_RACK = 16  # assumption, see the module docstring
DEFAULT_MASTER_PORT = 29500
PRESET_DIR = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "topology"

_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # the regex of deepspeed.launcher.runner


class TopologyError(ValueError):
    """A plan that does not fit the cluster; the message lists every problem with its numbers."""


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------
class ClusterSpec(BaseModel):
    """Homogeneous servers: ``nodes`` × ``gpus_per_node`` accelerators, grouped into racks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: int = Field(..., ge=1, description="Number of servers (hostfile lines).")
    gpus_per_node: int = Field(ASCEND_910_PER_SERVER, ge=1, description="Accelerators per server (`slots`).")
    nodes_per_rack: int = Field(
        DEFAULT_NODES_PER_RACK, ge=1,
        description="Servers per rack (assumed 16; consecutive hostfile entries form a rack).",
    )
    hostnames: list[str] | None = Field(None, description="Explicit hostnames in rank order, rack by rack.")
    hostname_pattern: str = Field("node-{i:03d}", description="Used when hostnames is None; `i` is the node index.")
    master_port: int = Field(DEFAULT_MASTER_PORT, ge=1, le=65535)

    @field_validator("hostname_pattern")
    @classmethod
    def _pattern_formats(cls, value: str) -> str:
        try:
            first, second = value.format(i=0), value.format(i=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"hostname_pattern {value!r} must format with one field named i: {exc}") from exc
        if first == second:
            raise ValueError(f"hostname_pattern {value!r} gives the same name to every node (use {{i}})")
        return value

    @model_validator(mode="after")
    def _hosts_consistent(self) -> "ClusterSpec":
        if self.hostnames is not None:
            if len(self.hostnames) != self.nodes:
                raise ValueError(f"{len(self.hostnames)} hostnames given for {self.nodes} nodes")
            bad = [h for h in self.hostnames if not h or any(c.isspace() for c in h) or h.startswith("#")]
            if bad:
                raise ValueError(f"hostnames must be non-empty, without spaces or a leading '#': {bad[:3]}")
            seen: set[str] = set()
            dupes = [h for h in self.hostnames if h in seen or seen.add(h)]
            if dupes:
                raise ValueError(f"duplicate hostnames (a host must appear once in a hostfile): {dupes[:3]}")
        return self

    @property
    def slots(self) -> int:
        """DeepSpeed's word for processes per host."""
        return self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def racks(self) -> int:
        return -(-self.nodes // self.nodes_per_rack)

    @cached_property
    def hosts(self) -> list[str]:
        if self.hostnames is not None:
            return list(self.hostnames)
        names = [self.hostname_pattern.format(i=i) for i in range(self.nodes)]
        if len(set(names)) != len(names):
            raise ValueError(f"hostname_pattern {self.hostname_pattern!r} repeats names over {self.nodes} nodes")
        return names

    def rack_of(self, node: int) -> int:
        return node // self.nodes_per_rack

    @classmethod
    def from_hostfile(cls, source: str | os.PathLike[str], **overrides: Any) -> "ClusterSpec":
        """Read a DeepSpeed hostfile (a path, or the text itself if it contains ``slots=``).

        Every host must have the same number of slots; ``overrides`` set the other fields
        (e.g. ``nodes_per_rack``).
        """
        text = str(source)
        if "slots=" not in text:
            if not Path(source).is_file():
                raise FileNotFoundError(f"hostfile {source}: no such file (one `host slots=N` line per node)")
            text = Path(source).read_text(encoding="utf-8")
        where = "the hostfile" if "slots=" in str(source) else f"hostfile {source}"
        try:
            hosts, slots = parse_hostfile(text)
        except TopologyError as exc:  # which file, when it is one
            raise TopologyError(f"{where}: {exc}") from None
        distinct = sorted(set(slots))
        if len(distinct) != 1:
            raise TopologyError(f"{where} mixes slot counts {distinct}; this layout needs the same slots on every host")
        return cls(nodes=len(hosts), gpus_per_node=distinct[0], hostnames=hosts, **overrides)


def parse_hostfile(text: str) -> tuple[list[str], list[int]]:
    """Hosts and slots of a DeepSpeed hostfile, with the launcher's own rules."""
    hosts: list[str] = []
    slots: list[int] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOSTFILE_LINE.search(line)
        if not match:
            raise TopologyError(f"bad line {line!r} (expected 'host slots=N')")
        if match.group(1) in hosts:
            raise TopologyError(f"host {match.group(1)!r} appears twice")
        hosts.append(match.group(1))
        slots.append(int(match.group(2)))
    if not hosts:
        raise TopologyError("no host in it (one `host slots=N` line per node)")
    return hosts, slots


# --------------------------------------------------------------------------------------------
# Layers over pipeline stages
# --------------------------------------------------------------------------------------------
def stage_layers(num_layers: int, stages: int) -> list[int]:
    """Transformer layers (blocks and the query layer, bottom-up) of each pipeline stage, as the training
    program splits them (it hands these counts to ``pangu_model/pipeline_parallel.py``):
    ``num_layers // stages`` each, and one more on the ``num_layers % stages`` stages just before the last. The first stage keeps the most micro-batches in
    flight under 1F1B (``stages`` of them) and the last computes the head and the loss, so the extra layers
    go to neither where there is a choice."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"pipeline {stages} needs between 1 and {num_layers} stages (one layer at least each)")
    base, extra = divmod(num_layers, stages)
    heavier = range(stages - 1 - extra, stages - 1)
    return [base + (stage in heavier) for stage in range(stages)]


def describe_split(num_layers: int, stages: int) -> str:
    """One line: how many layers each stage holds (what the trainer logs and ``pangu plan`` prints)."""
    counts = stage_layers(num_layers, stages)
    ends = f"embeddings on stage 0, query layer and tied head on stage {stages - 1}"
    if len(set(counts)) == 1:
        return f"{num_layers} layers over {stages} stages: {counts[0]} each ({ends})"
    runs: list[list[int]] = []  # [first stage, last stage, layers] of equal neighbours
    for stage, count in enumerate(counts):
        if runs and runs[-1][2] == count:
            runs[-1][1] = stage
        else:
            runs.append([stage, stage, count])
    parts = [f"stage{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {count}" for a, b, count in runs]
    return f"{num_layers} layers over {stages} stages, uneven layers per stage: " + ", ".join(parts) + f" ({ends})"


# --------------------------------------------------------------------------------------------
# Parallel plan
# --------------------------------------------------------------------------------------------
class ParallelPlan(BaseModel):
    """Degrees of parallelism; ``data`` is derived (world / (tp·pp)) when omitted.

    Checks that need no cluster (layers per stage, experts per rank) run at construction;
    :meth:`resolve` checks the plan against a cluster and fills in ``data``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: int = Field(1, ge=1, description="Op-level (tensor) parallel degree, inside a server.")
    pipeline: int = Field(1, ge=1, description="Pipeline stages, across the servers of a rack.")
    expert: int = Field(1, ge=1, description="Expert-parallel degree, inside a server; carved out of data parallel.")
    data: int | None = Field(None, ge=1, description="Data-parallel degree; world / (tensor·pipeline) if omitted.")
    num_layers: int | None = Field(None, ge=1, description="Transformer layers, to check layers per stage.")
    num_experts: int | None = Field(None, ge=1, description="Experts per MoE layer, to check experts per rank.")

    @model_validator(mode="after")
    def _model_divisibility(self) -> "ParallelPlan":
        problems = []
        if self.num_layers is not None and self.pipeline > self.num_layers:
            problems.append(
                f"pipeline {self.pipeline} is more stages than num_layers {self.num_layers} "
                f"(every stage needs one layer at least)"
            )
        if self.num_experts is not None and self.num_experts % self.expert:
            problems.append(
                f"num_experts {self.num_experts} is not divisible by expert parallel {self.expert} "
                f"({self.num_experts}/{self.expert} = {self.num_experts / self.expert:g} experts per rank)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tp(self) -> int:
        return self.tensor

    @property
    def pp(self) -> int:
        return self.pipeline

    @property
    def ep(self) -> int:
        return self.expert

    @property
    def dp(self) -> int:
        if self.data is None:
            raise TopologyError("data parallel degree unknown: call plan.resolve(cluster) first")
        return self.data

    @property
    def stage_layer_counts(self) -> list[int] | None:
        """Layers of each stage (``stage_layers``: uneven where ``pipeline`` does not divide them)."""
        return None if self.num_layers is None else stage_layers(self.num_layers, self.pipeline)

    @property
    def layers_per_stage(self) -> int | None:
        """The most layers a stage holds (the slowest stage sets the pace of a pipeline)."""
        return None if self.num_layers is None else max(stage_layers(self.num_layers, self.pipeline))

    @property
    def experts_per_rank(self) -> int | None:
        return None if self.num_experts is None else self.num_experts // self.expert

    def problems(self, cluster: ClusterSpec) -> list[str]:
        """Every rule the plan breaks on ``cluster``, each sentence naming its numbers."""
        tp, pp, ep, gpn, world = self.tensor, self.pipeline, self.expert, cluster.gpus_per_node, cluster.world_size
        out: list[str] = []
        if tp > gpn or gpn % tp:
            out.append(
                f"tensor parallel {tp} must divide the {gpn} accelerators of a node "
                f"(op-level slicing stays inside one server)"
            )
        if ep > gpn:
            out.append(
                f"expert parallel {ep} > {gpn} accelerators per node "
                f"(expert groups must stay inside one server: ep ≤ {gpn})"
            )
        elif gpn % ep:
            out.append(f"expert parallel {ep} must divide the {gpn} accelerators of a node")
        elif tp <= gpn and gpn % tp == 0 and (tp * ep > gpn or gpn % (tp * ep)):
            out.append(
                f"expert {ep} × tensor {tp} = {tp * ep} must divide the {gpn} accelerators of a node "
                f"(an expert group spans ep ranks at stride tp and must stay inside one server)"
            )
        if world % (tp * pp):
            out.append(
                f"world size {world} ({cluster.nodes} nodes × {gpn}) is not divisible by "
                f"tensor {tp} × pipeline {pp} = {tp * pp}"
            )
            return out
        dp = world // (tp * pp)
        if self.data is not None and self.data != dp:
            out.append(
                f"tensor {tp} × pipeline {pp} × data {self.data} = {tp * pp * self.data} "
                f"≠ world size {world} ({cluster.nodes} nodes × {gpn}); data would be {dp}"
            )
            return out
        if dp % ep:
            out.append(
                f"expert parallel {ep} does not divide data parallel {dp} "
                f"(DeepSpeed carves expert groups out of the data-parallel group)"
            )
        if out:
            return out
        block = pp * ep * tp
        rack_ranks = cluster.nodes_per_rack * gpn
        for replica in range(dp // ep):
            first, last = replica * block // gpn, ((replica + 1) * block - 1) // gpn
            if cluster.rack_of(first) != cluster.rack_of(last):
                out.append(
                    f"pipeline block of pipeline {pp} × expert {ep} × tensor {tp} = {block} ranks "
                    f"(replica {replica}: nodes {first}-{last}) crosses a rack boundary "
                    f"(racks of {cluster.nodes_per_rack} nodes × {gpn} = {rack_ranks} ranks); "
                    f"pipeline stages must stay inside one rack, so pp·ep·tp must fit and tile the racks"
                )
                break
        return out

    def resolve(self, cluster: ClusterSpec) -> "ParallelPlan":
        """This plan with ``data`` filled in, or :class:`TopologyError` listing every problem."""
        problems = self.problems(cluster)
        if problems:
            raise TopologyError(
                f"parallel plan tp={self.tensor} pp={self.pipeline} ep={self.expert} "
                f"dp={self.data if self.data is not None else 'auto'} does not fit "
                f"{cluster.nodes} nodes × {cluster.gpus_per_node}:\n  - " + "\n  - ".join(problems)
            )
        return self.model_copy(update={"data": cluster.world_size // (self.tensor * self.pipeline)})


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
class RankInfo(NamedTuple):
    rank: int
    node: int
    local_rank: int
    host: str
    rack: int
    tp_rank: int
    stage: int
    dp_rank: int
    ep_rank: int
    replica: int  # dp_rank // ep: index of the pipeline block (and of the expert-data-parallel rank)


@dataclass(frozen=True)
class Layout:
    """Every rank's coordinates and every process group, as lists of global ranks."""

    cluster: ClusterSpec
    plan: ParallelPlan  # resolved: data is set

    @classmethod
    def build(cls, cluster: ClusterSpec, plan: ParallelPlan) -> "Layout":
        return cls(cluster=cluster, plan=plan.resolve(cluster))

    # ---- coordinates -----------------------------------------------------------------------
    def rank_of(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        ep, pp, tp = self.plan.ep, self.plan.pp, self.plan.tp
        replica, ep_rank = divmod(dp_rank, ep)
        return ((replica * pp + stage) * ep + ep_rank) * tp + tp_rank

    def info(self, rank: int) -> RankInfo:
        ep, pp, tp, gpn = self.plan.ep, self.plan.pp, self.plan.tp, self.cluster.gpus_per_node
        if not 0 <= rank < self.cluster.world_size:
            raise IndexError(f"rank {rank} outside world size {self.cluster.world_size}")
        q, tp_rank = divmod(rank, tp)
        q, ep_rank = divmod(q, ep)
        replica, stage = divmod(q, pp)
        node, local = divmod(rank, gpn)
        return RankInfo(rank, node, local, self.cluster.hosts[node], self.cluster.rack_of(node),
                        tp_rank, stage, replica * ep + ep_rank, ep_rank, replica)

    @cached_property
    def ranks(self) -> list[RankInfo]:
        return [self.info(r) for r in range(self.cluster.world_size)]

    # ---- process groups --------------------------------------------------------------------
    @cached_property
    def tensor_groups(self) -> list[list[int]]:
        tp = self.plan.tp
        return [list(range(start, start + tp)) for start in range(0, self.cluster.world_size, tp)]

    @cached_property
    def pipeline_groups(self) -> list[list[int]]:
        """One per (dp_rank, tp_rank), stages in order."""
        p = self.plan
        return [[self.rank_of(s, d, t) for s in range(p.pp)] for d in range(p.dp) for t in range(p.tp)]

    @cached_property
    def data_parallel_groups(self) -> list[list[int]]:
        """One per (stage, tp_rank), data-parallel ranks in order (ascending global ranks too)."""
        p = self.plan
        return [[self.rank_of(s, d, t) for d in range(p.dp)] for s in range(p.pp) for t in range(p.tp)]

    @cached_property
    def expert_parallel_groups(self) -> list[list[int]]:
        """Consecutive chunks of ``ep`` data-parallel ranks of each data-parallel group (DeepSpeed's rule)."""
        ep = self.plan.ep
        return [g[i:i + ep] for g in self.data_parallel_groups for i in range(0, len(g), ep)]

    @cached_property
    def expert_data_parallel_groups(self) -> list[list[int]]:
        """Same position in every expert chunk of a data-parallel group: they hold the same experts."""
        ep = self.plan.ep
        out = []
        for g in self.data_parallel_groups:
            chunks = [g[i:i + ep] for i in range(0, len(g), ep)]
            out.extend([list(x) for x in zip(*chunks)])
        return out

    def groups(self) -> dict[str, list[list[int]]]:
        return {
            "tensor": self.tensor_groups,
            "pipeline": self.pipeline_groups,
            "data": self.data_parallel_groups,
            "expert": self.expert_parallel_groups,
            "expert_data": self.expert_data_parallel_groups,
        }

    # ---- DeepSpeed ---------------------------------------------------------------------------
    def matches_deepspeed(self) -> bool:
        """Whether DeepSpeed, left to itself, would build exactly these rank lists.

        * ``pp == 1``: yes.  With ``tp == 1`` our expert / expert-data groups are those of
          ``groups._create_expert_and_data_parallel(ep)`` (what ``deepspeed.moe.layer.MoE`` calls
          without an mpu: expert groups ``[0..ep-1], [ep..2ep-1], …``, expert-data groups at stride
          ``ep``); with ``tp > 1`` they are those of ``groups._get_expert_parallel_ranks(world, tp,
          ep, 1)`` (the mpu path, expert tensor parallelism on).  The ``mp_size > 1`` path of
          ``_create_expert_and_data_parallel`` (experts replicated over tp) builds the same expert
          groups; its expert-data groups are the unions of ours over the tp ranks of a stage.
        * ``pp > 1`` and ``ep == 1``: DeepSpeed's default pipeline topology
          (``PipeDataParallelTopology``/``PipeModelDataParallelTopology``, axes pipe, data, model)
          numbers ranks pipeline-outermost, which puts a stage in a rack and data parallel *inside* the
          rack, the opposite of PanGu's rule.  Pass :meth:`deepspeed_topology` to ``PipelineModule``
          and DeepSpeed builds exactly our groups.
        * ``pp > 1`` and ``ep > 1``: DeepSpeed's MoE groups with pipeline assume stage blocks of
          ``world / pp`` consecutive ranks; ours are the same groups in coordinates (a DeepSpeed rank
          with coordinates (stage, dp, tp) maps to ``rank_of(stage, dp, tp)``) but not as raw rank
          lists: hand ours to DeepSpeed instead of letting it derive them.
        """
        return self.plan.pp == 1

    def deepspeed_topology(self) -> Any:
        """A ``deepspeed.runtime.pipe.ProcessTopology`` with our rank order (imports DeepSpeed lazily).

        Possible when ``ep == 1`` or ``pp == 1`` (axes data, pipe, model); with both > 1 the data axis
        is split around the pipeline axis, which ``PipelineParallelGrid`` cannot express.
        """
        p = self.plan
        if p.ep > 1 and p.pp > 1:
            raise TopologyError(
                f"expert {p.ep} > 1 with pipeline {p.pp} > 1: data parallel is split around the pipeline "
                f"axis, which a DeepSpeed ProcessTopology(data, pipe, model) cannot express"
            )
        from deepspeed.runtime.pipe.topology import ProcessTopology

        return ProcessTopology(axes=["data", "pipe", "model"], dims=[p.dp, p.pp, p.tp])

    # ---- for humans ----------------------------------------------------------------------------
    def summary(self) -> str:
        c, p = self.cluster, self.plan
        lines = [
            f"{c.nodes} node{'s' * (c.nodes != 1)} × {c.gpus_per_node} = {c.world_size} ranks; "
            f"{c.racks} rack{'s' * (c.racks != 1)} of {c.nodes_per_rack} nodes",
            f"tensor {p.tp} × pipeline {p.pp} × data {p.dp} (expert {p.ep} inside data: "
            f"{p.dp // p.ep} pipeline block{'s' * (p.dp // p.ep != 1)} × {p.ep})",
        ]
        extra = []
        if p.num_layers is not None:
            extra.append(describe_split(p.num_layers, p.pp))
        if p.experts_per_rank is not None:
            extra.append(f"{p.num_experts} experts per MoE layer → {p.experts_per_rank} per rank")
        block = p.pp * p.ep * p.tp
        extra.append(f"pipeline block = pp·ep·tp = {block} ranks = {block / c.gpus_per_node:g} node(s)")
        lines.append("; ".join(extra))
        lines.append("rank = ((replica·pp + stage)·ep + ep_rank)·tp + tp_rank, dp_rank = replica·ep + ep_rank")
        return "\n".join(lines)

    def describe(self, max_nodes: int = 10) -> str:
        """A short per-node table; beyond ``max_nodes`` only the first and last nodes are shown."""
        c = self.cluster
        node_ranks = {n: self.ranks[n * c.gpus_per_node:(n + 1) * c.gpus_per_node] for n in range(c.nodes)}
        tp_of = {r: g for g in self.tensor_groups for r in g}
        ep_of = {r: g for g in self.expert_parallel_groups for r in g}

        def groups_cell(members: list[RankInfo], lookup: dict[int, list[int]]) -> str:
            seen: list[list[int]] = []
            for info in members:
                if lookup[info.rank] not in seen:
                    seen.append(lookup[info.rank])
            if all(len(g) == 1 for g in seen):
                return "-"
            if len(seen) > 4:
                return f"{len(seen)}×{len(seen[0])}"
            return " ".join(f"[{_span(g)}]" for g in seen)

        header = ["node", "host", "rack", "ranks", "stage", "dp", "tp groups", "ep groups"]
        rows = []
        shown = list(range(c.nodes))
        if c.nodes > max_nodes:
            head = max(1, max_nodes - 2)
            shown = list(range(head)) + [-1] + list(range(c.nodes - 2, c.nodes))
        for n in shown:
            if n == -1:
                rows.append(["…", f"({c.nodes - max(1, max_nodes - 2) - 2} more)", "", "", "", "", "", ""])
                continue
            members = node_ranks[n]
            rows.append([
                str(n), members[0].host, str(members[0].rack), _span([m.rank for m in members]),
                _span(sorted({m.stage for m in members})), _span(sorted({m.dp_rank for m in members})),
                groups_cell(members, tp_of), groups_cell(members, ep_of),
            ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        table = [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
        return self.summary() + "\n" + "\n".join(table)


def _span(values: list[int]) -> str:
    """``0-7`` for a run of consecutive ints, else ``0,2,4`` (long lists shortened)."""
    if not values:
        return ""
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    if len(values) > 6:
        step = values[1] - values[0]
        if values == list(range(values[0], values[-1] + 1, step)):
            return f"{values[0]}-{values[-1]}/{step}"
        return ",".join(map(str, values[:3])) + f",…({len(values)})"
    return ",".join(map(str, values))


def layout(cluster: ClusterSpec, plan: ParallelPlan) -> Layout:
    return Layout.build(cluster, plan)


# --------------------------------------------------------------------------------------------
# Hostfile and launcher
# --------------------------------------------------------------------------------------------
def hostfile(cluster: ClusterSpec) -> str:
    """DeepSpeed hostfile text: ``host slots=N`` per line, in rank order (rack by rack)."""
    return "".join(f"{host} slots={cluster.slots}\n" for host in cluster.hosts)


def write_hostfile(cluster: ClusterSpec, path: str | os.PathLike[str]) -> Path:
    """Write :func:`hostfile` atomically."""
    write_bytes_atomic(path, hostfile(cluster).encode("utf-8"))
    return Path(path)


def launcher_args(
    cluster: ClusterSpec,
    plan: ParallelPlan,
    hostfile_path: str | os.PathLike[str] = "hostfile",
    master_addr: str | None = None,
) -> list[str]:
    """Arguments for the ``deepspeed`` launcher (before the training script), after checking the plan.

    More than one node: ``--hostfile --num_nodes --num_gpus --master_addr --master_port`` (master is
    the first host unless given).  One node: no ``--hostfile`` (a hostfile makes the runner ssh even to
    a single host) and no ``--master_addr`` (the runner uses 127.0.0.1).
    """
    plan.resolve(cluster)
    args = ["--num_nodes", str(cluster.nodes), "--num_gpus", str(cluster.gpus_per_node)]
    if cluster.nodes > 1:
        args = ["--hostfile", str(hostfile_path), *args, "--master_addr", master_addr or cluster.hosts[0]]
    return [*args, "--master_port", str(cluster.master_port)]


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
class Topology(BaseModel):
    """A named cluster + plan, as stored in ``deploy/presets/topology/*.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    cluster: ClusterSpec
    plan: ParallelPlan

    @model_validator(mode="after")
    def _fits(self) -> "Topology":
        self.plan.resolve(self.cluster)
        return self

    def layout(self) -> Layout:
        return Layout.build(self.cluster, self.plan)

    def describe(self, max_nodes: int = 10) -> str:
        return f"{self.name}: {self.description}\n{self.layout().describe(max_nodes)}".strip()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_topology(name_or_path: str | os.PathLike[str]) -> Topology:
    """A preset name from ``deploy/presets/topology/`` or a path to a YAML file."""
    path = Path(name_or_path)
    if not names_a_file(path):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"topology preset {str(name_or_path)!r} not found (known: {', '.join(preset_names())})")
    data = read_mapping(path)
    data.setdefault("name", path.stem)
    return Topology.model_validate(data)
