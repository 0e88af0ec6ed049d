"""pangu_model.topology: cluster → hostfile, rank layout, process groups; checked against DeepSpeed's rules."""
from __future__ import annotations

import logging
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from pangu_model.topology import (
    ClusterSpec,
    Layout,
    ParallelPlan,
    TopologyError,
    hostfile,
    launcher_args,
    load_topology,
    parse_hostfile,
    preset_names,
    write_hostfile,
)

KINDS = ("tensor", "pipeline", "data", "expert", "expert_data")


def _sizes(layout: Layout) -> dict[str, int]:
    p = layout.plan
    return {"tensor": p.tp, "pipeline": p.pp, "data": p.dp, "expert": p.ep, "expert_data": p.dp // p.ep}


def check_invariants(layout: Layout) -> None:
    """Group sizes, a partition of the world per kind, and the placement rules."""
    c, world = layout.cluster, layout.cluster.world_size
    for kind, groups in layout.groups().items():
        size = _sizes(layout)[kind]
        assert all(len(g) == size for g in groups), kind
        assert len(groups) == world // size, kind
        counts = Counter(r for g in groups for r in g)
        assert sorted(counts) == list(range(world)) and set(counts.values()) == {1}, kind
    node = {r.rank: r.node for r in layout.ranks}
    for g in layout.tensor_groups + layout.expert_parallel_groups:
        assert len({node[r] for r in g}) == 1, f"group {g[:4]}… crosses a node"
    for g in layout.pipeline_groups:
        assert len({c.rack_of(node[r]) for r in g}) == 1, "a pipeline crosses a rack"
        nodes = [node[r] for r in g]
        assert nodes == sorted(nodes) and nodes[-1] - nodes[0] < max(1, c.nodes_per_rack)
    for info in layout.ranks:  # coordinates agree with the groups
        assert layout.rank_of(info.stage, info.dp_rank, info.tp_rank) == info.rank
        assert layout.pipeline_groups[info.dp_rank * layout.plan.tp + info.tp_rank][info.stage] == info.rank
        assert layout.data_parallel_groups[info.stage * layout.plan.tp + info.tp_rank][info.dp_rank] == info.rank


# ------------------------------------------------------------------------------- the three clusters
def test_single_node_layout() -> None:
    cluster = ClusterSpec(nodes=1)
    layout = Layout.build(cluster, ParallelPlan(tensor=2, expert=4))
    check_invariants(layout)
    assert layout.plan.dp == 4
    assert layout.tensor_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.data_parallel_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.expert_parallel_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.expert_data_parallel_groups == [[0], [2], [4], [6], [1], [3], [5], [7]]
    assert {r.node for r in layout.ranks} == {0}
    # pipeline inside one server: two stages of four ranks
    layout = Layout.build(cluster, ParallelPlan(tensor=4, pipeline=2))
    check_invariants(layout)
    assert layout.pipeline_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_pangu_sigma_512_devices() -> None:
    topo = load_topology("pangu-sigma")
    layout = topo.layout()
    check_invariants(layout)
    p = layout.plan
    assert (topo.cluster.nodes, topo.cluster.world_size, topo.cluster.racks) == (64, 512, 4)
    assert (p.tp, p.pp, p.ep, p.dp) == (1, 1, 8, 512)
    assert p.experts_per_rank == 80 and p.num_experts == 640
    # one expert group per server, the expert-data groups stride across all servers
    assert layout.expert_parallel_groups == [list(range(8 * n, 8 * n + 8)) for n in range(64)]
    assert layout.expert_data_parallel_groups == [list(range(i, 512, 8)) for i in range(8)]
    # a non-trivial Σ variant: pp 4 keeps ep groups inside a server and pipelines inside a rack
    layout = Layout.build(topo.cluster, ParallelPlan(pipeline=4, expert=8, num_layers=40, num_experts=640))
    check_invariants(layout)
    assert layout.plan.dp == 128
    for g in layout.pipeline_groups:
        assert len({layout.ranks[r].node for r in g}) == 4  # distinct, consecutive servers
    assert layout.ranks[8].stage == 1 and layout.ranks[8].dp_rank == 0


def test_pangu_alpha_200b_2048_devices() -> None:
    topo = load_topology("pangu-alpha-200b")
    layout = topo.layout()
    check_invariants(layout)
    p, c = layout.plan, layout.cluster
    assert (c.nodes, c.world_size, c.racks) == (256, 2048, 16)
    assert (p.pp, p.tp, p.dp) == (16, 8, 16) and p.layers_per_stage == 4
    assert p.pp * p.tp * p.dp == 2048
    for g in layout.pipeline_groups:  # 16 stages on 16 distinct servers of one rack
        nodes = [layout.ranks[r].node for r in g]
        assert len(set(nodes)) == 16 and len({c.rack_of(n) for n in nodes}) == 1
    for g in layout.data_parallel_groups:  # the 16 replicas on 16 different racks
        assert sorted(layout.ranks[r].rack for r in g) == list(range(16))
    for g in layout.tensor_groups:  # 8-way op-level slicing = one whole server
        assert len(g) == 8 and g[0] % 8 == 0
    last = layout.ranks[-1]
    assert (last.node, last.rack, last.stage, last.dp_rank, last.tp_rank) == (255, 15, 15, 15, 7)


def test_data_is_derived_and_checked() -> None:
    cluster = ClusterSpec(nodes=256)
    assert ParallelPlan(tensor=8, pipeline=16).resolve(cluster).data == 16
    assert ParallelPlan(tensor=8, pipeline=16, data=16).resolve(cluster).data == 16
    with pytest.raises(TopologyError, match="call plan.resolve"):
        ParallelPlan().dp


# ------------------------------------------------------------------------------- invalid plans
@pytest.mark.parametrize(
    ("nodes", "plan", "pattern"),
    [
        (64, dict(expert=16), r"expert parallel 16 > 8 accelerators per node"),
        (1, dict(tensor=3), r"tensor parallel 3 must divide the 8 accelerators"),
        (1, dict(tensor=16), r"tensor parallel 16 must divide the 8 accelerators"),
        (256, dict(tensor=8, pipeline=16, data=8),
         r"tensor 8 × pipeline 16 × data 8 = 1024 ≠ world size 2048 \(256 nodes × 8\)"),
        (3, dict(tensor=8, pipeline=2), r"world size 24 .* not divisible by tensor 8 × pipeline 2 = 16"),
        (8, dict(tensor=2, expert=8), r"expert 8 × tensor 2 = 16 must divide the 8 accelerators"),
        (1, dict(tensor=1, pipeline=2, expert=8), r"expert parallel 8 does not divide data parallel 4"),
        (32, dict(tensor=8, pipeline=32), r"pipeline block .* = 256 ranks .* crosses a rack boundary"),
        (24, dict(tensor=8, pipeline=12), r"crosses a rack boundary"),
    ],
)
def test_invalid_plans_name_the_problem(nodes: int, plan: dict, pattern: str) -> None:
    with pytest.raises(TopologyError, match=pattern):
        ParallelPlan(**plan).resolve(ClusterSpec(nodes=nodes))


def test_model_divisibility_errors() -> None:
    with pytest.raises(ValueError, match=r"pipeline 41 is more stages than num_layers 40 \(every stage needs"):
        ParallelPlan(tensor=8, pipeline=41, num_layers=40)
    with pytest.raises(ValueError, match=r"num_experts 640 is not divisible by expert parallel 3"):
        ParallelPlan(expert=3, num_experts=640)


def test_layers_that_pipeline_stages_do_not_divide_are_split_unevenly() -> None:
    from pangu_model.topology import describe_split, stage_layers

    # The extra layers go to the stages just before the last (the first holds the most micro-batches in
    # flight under 1F1B, the last computes the head and the loss); every layer is placed once, in order.
    assert stage_layers(40, 16) == [2] * 7 + [3] * 8 + [2]
    assert stage_layers(41, 4) == [10, 10, 11, 10] and stage_layers(5, 2) == [3, 2] and stage_layers(64, 16) == [4] * 16
    plan = ParallelPlan(tensor=8, pipeline=16, num_layers=40)
    assert plan.stage_layer_counts == stage_layers(40, 16) and plan.layers_per_stage == 3
    assert describe_split(40, 16) == ("40 layers over 16 stages, uneven layers per stage: stages 0-6: 2, stages "
                                      "7-14: 3, stage 15: 2 (embeddings on stage 0, query layer and tied head on "
                                      "stage 15)")
    with pytest.raises(ValueError, match="pipeline 5 needs between 1 and 4 stages"):
        stage_layers(4, 5)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(TopologyError) as err:
        ParallelPlan(tensor=3, expert=16).resolve(ClusterSpec(nodes=1))
    assert "tensor parallel 3" in str(err.value) and "expert parallel 16 > 8" in str(err.value)


def test_rack_rule_allows_small_and_tiling_blocks() -> None:
    # 2 nodes (one partial rack), pipeline across both servers
    check_invariants(Layout.build(ClusterSpec(nodes=2), ParallelPlan(tensor=8, pipeline=2)))
    # racks of 4 nodes: pipeline of 4 servers tiles them; dp replicas land on distinct racks
    layout = Layout.build(ClusterSpec(nodes=16, nodes_per_rack=4), ParallelPlan(tensor=8, pipeline=4))
    check_invariants(layout)
    assert [sorted(layout.ranks[r].rack for r in g) for g in layout.data_parallel_groups][0] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------- hostfile, launcher
def test_hostfile_format_and_round_trip(tmp_path) -> None:
    cluster = ClusterSpec(nodes=3)
    text = hostfile(cluster)
    assert text == "node-000 slots=8\nnode-001 slots=8\nnode-002 slots=8\n"
    path = write_hostfile(cluster, tmp_path / "deploy" / "hostfile")
    assert path.read_text() == text and not list(path.parent.glob(".*tmp*"))
    again = ClusterSpec.from_hostfile(path, nodes_per_rack=2)
    assert again.hosts == cluster.hosts and again.gpus_per_node == 8 and again.racks == 2
    named = ClusterSpec(nodes=2, gpus_per_node=4, hostnames=["a1", "b2"])
    assert hostfile(named) == "a1 slots=4\nb2 slots=4\n"
    assert ClusterSpec(nodes=2, hostname_pattern="worker-{i}").hosts == ["worker-0", "worker-1"]


def test_hostfile_errors() -> None:
    with pytest.raises(TopologyError, match="mixes slot counts"):
        ClusterSpec.from_hostfile("a slots=8\nb slots=4\n")
    with pytest.raises(TopologyError, match="bad line 'b'"):
        parse_hostfile("a slots=8\nb\n")


@pytest.mark.parametrize("text, problem", [
    ("", "no host in it (one `host slots=N` line per node)"), ("# a comment\n", "no host in it"),
    ("a slots=8\na slots=8\n", "host 'a' appears twice"), ("a slots=8\nb\n", "bad line 'b'"),
    ("a slots=8\nb slots=4\n", "mixes slot counts [4, 8]"),
])
def test_a_bad_hostfile_is_named_in_its_error(tmp_path, text, problem) -> None:
    """`pretrain --hostfile FILE` said "hostfile is empty" without saying which file."""
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(TopologyError, match=re.escape(f"hostfile {path}") + "[: ].*" + re.escape(problem)):
        ClusterSpec.from_hostfile(path)
    with pytest.raises(ValueError, match="3 hostnames given for 2 nodes"):
        ClusterSpec(nodes=2, hostnames=["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate hostnames"):
        ClusterSpec(nodes=2, hostnames=["a", "a"])
    with pytest.raises(ValueError, match="same name to every node"):
        ClusterSpec(nodes=2, hostname_pattern="node")


def test_hostfile_parses_with_deepspeed_runner() -> None:
    runner = pytest.importorskip("deepspeed.launcher.runner")
    cluster = ClusterSpec(nodes=64)
    pool = runner._parse_hostfile(hostfile(cluster).splitlines())
    assert list(pool) == cluster.hosts and set(pool.values()) == {8}
    args = runner.parse_args([*launcher_args(cluster, ParallelPlan(expert=8)), "train.py"])
    assert (args.hostfile, args.num_nodes, args.num_gpus) == ("hostfile", 64, 8)
    assert (args.master_addr, args.master_port, args.user_script) == ("node-000", 29500, "train.py")


def test_launcher_args() -> None:
    big = load_topology("pangu-alpha-200b")
    assert launcher_args(big.cluster, big.plan, hostfile_path="/run/hostfile") == [
        "--hostfile", "/run/hostfile", "--num_nodes", "256", "--num_gpus", "8",
        "--master_addr", "node-000", "--master_port", "29500",
    ]
    tiny = load_topology("cpu-tiny")
    assert launcher_args(tiny.cluster, tiny.plan) == ["--num_nodes", "1", "--num_gpus", "2", "--master_port", "29500"]
    with pytest.raises(TopologyError):
        launcher_args(tiny.cluster, ParallelPlan(expert=4))


# ------------------------------------------------------------------------------- presets, describe
def test_presets_load_and_fit() -> None:
    assert {"pangu-alpha-200b", "pangu-sigma", "single-node", "cpu-tiny"} <= set(preset_names())
    for name in preset_names():
        check_invariants(load_topology(name).layout())
    tiny = load_topology("cpu-tiny").layout()
    assert tiny.cluster.world_size == 2 and tiny.expert_parallel_groups == [[0, 1]]
    with pytest.raises(FileNotFoundError, match="known: .*pangu-sigma"):
        load_topology("nope")


def test_describe_is_short_for_256_nodes() -> None:
    text = load_topology("pangu-alpha-200b").describe()
    lines = text.splitlines()
    assert len(lines) < 20 and "246 more" in text
    assert "tensor 8 × pipeline 16 × data 16" in text and "64 layers → 4 per stage" in text
    assert any(line.startswith("255 ") and "node-255" in line and "2040-2047" in line for line in lines)
    sigma = load_topology("pangu-sigma").describe()
    assert "640 experts per MoE layer → 80 per rank" in sigma and "[0-7]" in sigma


# ------------------------------------------------------------------------------- DeepSpeed's groups
def _as_sets(groups) -> set[tuple[int, ...]]:
    return {tuple(g) for g in groups}


@pytest.fixture
def ds_groups(monkeypatch):
    """deepspeed.utils.groups with a fake, recording torch.distributed (nothing is initialised)."""
    groups = pytest.importorskip("deepspeed.utils.groups")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    created: list[list[int]] = []

    def fake(world: int):
        created.clear()
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                     "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
            monkeypatch.setattr(groups, name, {})
        monkeypatch.setattr(groups, "mpu", None)
        monkeypatch.setattr(groups, "dist", SimpleNamespace(
            is_initialized=lambda: True, get_world_size=lambda: world, get_rank=lambda: 0,
            new_group=lambda ranks: created.append(list(ranks)) or object(),
        ))
        return created

    return groups, fake


@pytest.mark.parametrize(("nodes", "ep"), [(1, 2), (1, 8), (64, 8), (4, 4)])
def test_expert_groups_equal_deepspeed_moe_layer_path(ds_groups, nodes: int, ep: int) -> None:
    """tp 1, pp 1: what deepspeed.moe.layer.MoE builds (`_create_expert_and_data_parallel(ep)`)."""
    groups, fake = ds_groups
    layout = Layout.build(ClusterSpec(nodes=nodes), ParallelPlan(expert=ep))
    assert layout.matches_deepspeed()
    created = fake(layout.cluster.world_size)
    groups._create_expert_and_data_parallel(ep)
    edp, epg = created[:ep], created[ep:]  # DeepSpeed creates the expert-data groups first
    assert edp == layout.expert_data_parallel_groups
    assert epg == layout.expert_parallel_groups


def test_expert_groups_equal_deepspeed_with_tensor_parallel(ds_groups) -> None:
    groups, fake = ds_groups
    layout = Layout.build(ClusterSpec(nodes=4), ParallelPlan(tensor=2, expert=4))
    world, p = layout.cluster.world_size, layout.plan
    ep_ds, edp_ds = groups._get_expert_parallel_ranks(world, p.tp, p.ep, 1)
    assert ep_ds == layout.expert_parallel_groups and edp_ds == layout.expert_data_parallel_groups
    # experts replicated over tp (mp_size path): same expert groups, expert-data groups = union over tp
    created = fake(world)
    groups._create_expert_and_data_parallel(p.ep, mp_size=p.tp, pp_size=1)
    assert _as_sets(created[: len(layout.expert_parallel_groups)]) == _as_sets(layout.expert_parallel_groups)
    union: dict[tuple[int, int], set[int]] = {}
    for g in layout.expert_data_parallel_groups:
        head = layout.ranks[g[0]]
        union.setdefault((head.stage, head.ep_rank), set()).update(g)
    assert {frozenset(g) for g in created[len(layout.expert_parallel_groups):]} == {
        frozenset(s) for s in union.values()}


@pytest.mark.parametrize(("nodes", "plan"), [
    (64, dict(pipeline=4, expert=8)),
    (16, dict(tensor=2, pipeline=4, expert=4)),
    (256, dict(tensor=8, pipeline=16)),
])
def test_expert_groups_equal_deepspeed_in_coordinates_with_pipeline(ds_groups, nodes: int, plan: dict) -> None:
    """pp > 1: DeepSpeed numbers ranks pipeline-outermost; mapped through coordinates the groups agree."""
    groups, _ = ds_groups
    layout = Layout.build(ClusterSpec(nodes=nodes), ParallelPlan(**plan))
    world, p = layout.cluster.world_size, layout.plan
    assert not layout.matches_deepspeed()
    ep_ds, edp_ds = groups._get_expert_parallel_ranks(world, p.tp, p.ep, p.pp)

    def ours(ds_rank: int) -> int:  # DeepSpeed's order: rank = (stage·dp + dp_rank)·tp + tp_rank
        q, t = divmod(ds_rank, p.tp)
        s, d = divmod(q, p.dp)
        return layout.rank_of(s, d, t)

    assert _as_sets([[ours(r) for r in g] for g in ep_ds]) == _as_sets(layout.expert_parallel_groups)
    assert _as_sets([[ours(r) for r in g] for g in edp_ds]) == _as_sets(layout.expert_data_parallel_groups)


def test_deepspeed_process_topology_has_our_order() -> None:
    pytest.importorskip("deepspeed.runtime.pipe.topology")
    layout = Layout.build(ClusterSpec(nodes=16, nodes_per_rack=4), ParallelPlan(tensor=8, pipeline=4))
    topo = layout.deepspeed_topology()
    for info in layout.ranks:
        assert topo.get_rank(data=info.dp_rank, pipe=info.stage, model=info.tp_rank) == info.rank
    assert _as_sets(topo.get_axis_comm_lists("pipe")) == _as_sets(layout.pipeline_groups)
    assert _as_sets(topo.get_axis_comm_lists("data")) == _as_sets(layout.data_parallel_groups)
    assert _as_sets(topo.get_axis_comm_lists("model")) == _as_sets(layout.tensor_groups)
    with pytest.raises(TopologyError, match="cannot express"):
        Layout.build(ClusterSpec(nodes=8), ParallelPlan(pipeline=2, expert=4)).deepspeed_topology()
