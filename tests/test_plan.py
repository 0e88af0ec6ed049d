"""deploy.plan / `pangu plan`: the memory and time plans of sigma-1t on pangu-sigma and 200b on
pangu-alpha-200b, pinned against figures derived here from the models' shapes (not copied from the
planner), plus the trainer's check and the command line. Nothing is allocated: counts come from the meta
device."""
from __future__ import annotations

import json

import pytest

from deploy.plan import (
    GPU_RESERVE_FRACTION,
    HARDWARE,
    PlanDoesNotFit,
    check_plan,
    format_plan,
    plan_for,
    resolve_train_config,
)

GiB = 2**30
REQUIRED_KEYS = {"fits", "gpu_bytes_per_gpu", "host_bytes_per_node", "h2d_bytes_per_gpu_per_step", "step_time_s",
                 "mfu"}


# ---- the shapes, by hand -------------------------------------------------------------------------
def block_attention(d: int) -> int:
    """q, k, v, out projections with biases and two LayerNorms."""
    return 4 * (d * d + d) + 2 * 2 * d


def ffn(d: int, d_ff: int) -> int:
    return d * d_ff + d_ff + d_ff * d + d


# sigma-1t: 40 blocks (39 + the query layer, as released), d 5120, d_ff 20480, seq 1024, vocab 40000; the top 8 blocks
# hold 40 domains × 16 = 640 experts each instead of the FFN.
D, DFF, SEQ, VOCAB, LAYERS, SPARSE, EXPERTS = 5120, 20480, 1024, 40000, 40, 8, 640
SIGMA_EMBEDDINGS = VOCAB * D + SEQ * D + SEQ * D  # word, position, query tables
SIGMA_DENSE = SIGMA_EMBEDDINGS + LAYERS * block_attention(D) + (LAYERS - SPARSE) * ffn(D, DFF) + 2 * D
PER_EXPERT = ffn(D, DFF)
SIGMA_EXPERTS = SPARSE * EXPERTS * PER_EXPERT
EXPERTS_PER_RANK = SPARSE * (EXPERTS // 8) * PER_EXPERT  # ep 8: 80 experts of each sparse layer per GPU


@pytest.fixture(scope="module")
def sigma_h100():
    return plan_for("sigma-1t", topology="pangu-sigma", gpu="h100")


@pytest.fixture(scope="module")
def sigma_h200():
    return plan_for("sigma-1t", topology="pangu-sigma", gpu="h200")


@pytest.fixture(scope="module")
def alpha_200b():
    return plan_for("200b", topology="pangu-alpha-200b", gpu="h100")


def test_sigma_1t_parameters(sigma_h100):
    params = sigma_h100.parameters
    assert params["total"] == SIGMA_DENSE + SIGMA_EXPERTS == 1_084_995_840_000
    assert params["routed_experts"] == SIGMA_EXPERTS
    assert params["per_expert"] == PER_EXPERT == 209_740_800
    assert params["dense_per_gpu"] == SIGMA_DENSE == 11_122_944_000  # tp = pp = 1: the whole dense part
    assert params["experts_on_device_per_gpu"] == 0  # ECSS: on the host
    assert params["experts_on_host_per_gpu"] == EXPERTS_PER_RANK == 134_234_112_000
    # 512 ranks × 1024 tokens reach every one of the 80 experts a rank holds per layer
    assert params["fetched_per_gpu_per_step"] == EXPERTS_PER_RANK
    assert sigma_h100.parallel == {"tensor": 1, "pipeline": 1, "expert": 8, "data": 512}
    assert sigma_h100.tokens_per_step == 512 * 1024


def test_sigma_1t_gpu_bytes(sigma_h100):
    dp = 512
    static = 2 * SIGMA_DENSE + 2 * (SIGMA_DENSE // dp) + 12 * (SIGMA_DENSE // dp)  # bf16 params, ZeRO-2 grads, states
    assert SIGMA_DENSE % dp == 0
    # ECSS step: bf16 weights + bf16 grads of the fetched experts, their fp32 copies and the fp32 concatenation
    ecss_step = static + (2 + 2 + 4 + 4) * EXPERTS_PER_RANK
    assert sigma_h100.gpu_phases["ecss_step"] == ecss_step
    assert sigma_h100.gpu_bytes_per_gpu == ecss_step == 1_633_359_375_000  # ≈ 1.63 TB per GPU
    sbh = SEQ * 1 * D
    assert sigma_h100.gpu_breakdown["activations"] == 34 * sbh * LAYERS  # Korthikanti, bf16, no recompute
    assert sigma_h100.gpu_breakdown["zero_buckets"] == 2 * 500_000_000 * 2
    assert not sigma_h100.fits
    assert any(r.startswith("GPU memory") and "TiB" in r for r in sigma_h100.reasons)


def test_sigma_1t_host_bytes(sigma_h100):
    per_gpu = EXPERTS_PER_RANK
    phases = sigma_h100.host_phases_per_node
    assert phases["resident"] == 8 * 12 * per_gpu == 12_886_474_752_000  # fp32 masters + Adam m, v: 12.9 TB
    assert sigma_h100.host_breakdown["ecss_fetch_staging"] == 4 * 80 * D * DFF  # one layer's w_in, pageable fp32
    assert phases["step"] == 8 * 16 * per_gpu  # + the fp32 gradients brought back
    assert phases["checkpoint_save"] == 8 * 20 * per_gpu  # + m and v copies in ExpertOffload.state_dict
    assert phases["resume"] == 8 * 24 * per_gpu  # masters + the loaded file + the cloned moments
    assert sigma_h100.host_bytes_per_node == 8 * 24 * per_gpu
    assert any(r.startswith("host memory") for r in sigma_h100.reasons)


def test_sigma_1t_transfers_and_time(sigma_h100):
    hw = HARDWARE["h100"]
    fetched = EXPERTS_PER_RANK
    assert sigma_h100.h2d_bytes_per_gpu_per_step == 4 * fetched  # fp32 masters cross PCIe
    assert sigma_h100.transfers["ecss_gradients_d2h"] == 4 * fetched
    # the fetch is bound by the node's host DRAM (8 GPUs × 12 B per parameter), not by PCIe
    assert sigma_h100.times["ecss_fetch_h2d"] == pytest.approx(8 * 12 * fetched / hw.host_dram_bytes_per_s)
    assert sigma_h100.times["ecss_fetch_h2d"] > 4 * fetched / hw.pcie_h2d_bytes_per_s
    assert sigma_h100.times["ecss_cpu_adam"] == pytest.approx(8 * 28 * fetched / hw.host_dram_bytes_per_s)
    # expert gradients (fp32) all-reduced over the 64 holders of a shard, one per node: the network
    assert sigma_h100.times["ecss_gradient_all_reduce"] == pytest.approx(
        2 * 63 / 64 * 4 * fetched / hw.network_bytes_per_s)
    assert sigma_h100.step_time_s > 60  # host-bound: ECSS moves every expert every step at this batch
    assert 0 < sigma_h100.mfu < 0.01


def test_sigma_1t_on_h200_same_bytes_more_room(sigma_h100, sigma_h200):
    assert sigma_h200.gpu_bytes_per_gpu == sigma_h100.gpu_bytes_per_gpu
    assert sigma_h200.gpu_capacity_bytes == 141 * GiB
    assert sigma_h200.gpu_usable_bytes == int(141 * GiB * (1 - GPU_RESERVE_FRACTION))
    assert not sigma_h200.fits


# 200b: 64 layers, d 16384, d_ff 65536, vocab 40000, seq 1024; tp 8 × pp 16 × dp 16 on 256 × 8.
D2, DFF2, LAYERS2 = 16384, 65536, 64


def test_200b_parameters(alpha_200b):
    block = block_attention(D2) + ffn(D2, DFF2)
    total = LAYERS2 * block + VOCAB * D2 + 2 * SEQ * D2 + 2 * D2
    assert alpha_200b.parameters["total"] == total == 206_861_008_896
    # the last stage is the largest: 4 blocks, final LayerNorm, query table and the head's copy of the
    # word embedding; divided over tensor parallel 8
    last_stage = 4 * block + 2 * D2 + SEQ * D2 + VOCAB * D2
    assert alpha_200b.parameters["worst_stage"] == 15
    assert alpha_200b.parameters["dense_per_gpu"] == last_stage // 8 == 1_694_740_480
    assert alpha_200b.parallel == {"tensor": 8, "pipeline": 16, "expert": 1, "data": 16}


def test_200b_gpu_bytes(alpha_200b):
    psi = alpha_200b.parameters["dense_per_gpu"]
    sbh = SEQ * 1 * D2
    expected = {
        "parameters": 2 * psi,
        "gradients": 2 * psi,  # ZeRO-1 keeps full bf16 gradients
        "optimizer_states": 12 * (psi // 16),  # fp32 master + m + v over 16 data-parallel ranks
        "zero_buckets": 2 * 500_000_000 * 2,
        "activations": 4 * sbh * (10 + 24 // 8),  # 4 layers, Korthikanti with t = 8, one micro-batch in flight
        "logits": SEQ * VOCAB // 8 * 14,
    }
    assert psi % 16 == 0
    for key, value in expected.items():
        assert alpha_200b.gpu_breakdown[key] == value, key
    assert alpha_200b.gpu_bytes_per_gpu == sum(expected.values()) == 10_994_112_512  # ≈ 10.2 GiB
    assert alpha_200b.fits and not alpha_200b.reasons
    # Start-up builds one module at a time in fp32 on the host: the largest is an FFN's first linear
    # (d × 4d + 4d), larger than the word embedding (40,000 × d); 8 ranks per node.
    assert alpha_200b.host_bytes_per_node == 8 * 4 * (D2 * 4 * D2 + 4 * D2)
    assert alpha_200b.h2d_bytes_per_gpu_per_step == 0


def test_200b_time_has_the_pipeline_bubble(alpha_200b):
    from pangu_model.config import get_config
    from pangu_model.metrics import flops_per_token

    hw = HARDWARE["h100"]
    flops_per_gpu = flops_per_token(get_config("200b"), SEQ) * alpha_200b.tokens_per_step / 2048
    compute = flops_per_gpu / (989e12 * hw.compute_efficiency)
    assert alpha_200b.tokens_per_step == 16 * 1024
    assert alpha_200b.times["compute"] == pytest.approx(16 * compute)  # (m + pp - 1) / m with m = 1
    assert alpha_200b.step_time_s >= 16 * compute
    assert alpha_200b.mfu == pytest.approx(flops_per_gpu / (alpha_200b.step_time_s * 989e12))
    assert alpha_200b.mfu < hw.compute_efficiency / 16
    assert any("bubble" in note for note in alpha_200b.notes)
    more = plan_for("200b", topology="pangu-alpha-200b", overrides=["gradient_accumulation_steps=64"])
    assert more.mfu > 5 * alpha_200b.mfu


def test_planner_counts_match_model_info():
    from pangu_model.info import describe

    for preset in ("sigma-tiny", "200b"):
        plan = plan_for(preset, nodes=1, gpus_per_node=1)
        info = describe(preset)["parameters"]
        assert plan.parameters["total"] == info["total"]
        assert plan.parameters["routed_experts"] == info["routed_experts"]
        assert plan.parameters["per_expert"] == info["per_expert"]


def test_bare_model_defaults():
    config = resolve_train_config("200b")
    assert (config.precision, config.zero_stage, config.micro_batch_size, config.row_length) == ("bf16", 1, 1, 1024)
    assert resolve_train_config("tiny").row_length == 128  # capped at the model's max_seq_len
    assert resolve_train_config("sigma-1t").ecss  # a pretrain preset wins over the model preset
    assert plan_for("13b", nodes=1).notes[0].startswith("bare model preset 13b: planned with precision bf16")


def test_tiny_fits_on_one_gpu():
    plan = plan_for("tiny", nodes=1, gpus_per_node=1)
    assert plan.fits and plan.gpu_bytes_per_gpu < GiB * 3
    assert "FITS" in format_plan(plan)
    plan = plan_for("sigma-tiny", nodes=1, gpus_per_node=1)
    assert plan.fits and plan.parameters["experts_on_host_per_gpu"] > 0


def test_check_plan_refuses_with_numbers():
    config = resolve_train_config("alpha-tiny")
    with pytest.raises(PlanDoesNotFit) as caught:
        check_plan(config, world_size=1, local_world_size=1, gpu_name="NVIDIA H100 80GB HBM3",
                   gpu_memory_bytes=GiB, host_ram_bytes=None)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "GPU memory" in message and "921.60 MiB usable of 1.00 GiB" in message
    assert caught.value.plan.gpu_bytes_per_gpu > GiB
    # the same run on a real H200 fits; on a CPU (no GPU to check) the host check alone decides
    assert check_plan(config, 1, 1, "NVIDIA H200", 150 * 10**9, 64 * 10**9).fits
    assert check_plan(config, 2, 2, None, None, None).fits
    sigma = resolve_train_config("sigma-1t")
    with pytest.raises(PlanDoesNotFit, match=r"host memory: .*TiB per node"):
        check_plan(sigma, 512, 8, "NVIDIA H200", 150 * 10**9, 2 * 10**12)


def test_cli_json(capsys):
    from flows.cli import main

    assert main(["plan", "--preset", "200b", "--topology", "pangu-alpha-200b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert REQUIRED_KEYS <= set(data)
    assert data["fits"] is True and data["gpu_bytes_per_gpu"] == 10_994_112_512
    assert main(["plan", "--preset", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_cli_table_says_does_not_fit(capsys):
    from flows.cli import main

    assert main(["plan", "--preset", "sigma-1t", "--gpu", "h200"]) == 0  # a report, even when it cannot fit
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "per node" in out and "host memory" in out and "MFU" in out


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "--preset", "no-such-preset"], "unknown preset"),
    (["plan", "--preset", "200b", "--topology", "no-such-topology"], "no-such-topology"),
    (["plan", "--preset", "sigma-1t", "--nodes", "1", "--gpus-per-node", "4"], "expert parallel 8"),
    (["plan", "--preset", "200b", "--topology", "pangu-sigma"], "no experts"),
])
def test_cli_user_errors(capsys, argv, fragment):
    from flows.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pangu plan: error: ") and fragment in err
    assert len(err.splitlines()) == 1


def test_sigma_1t_with_sharded_ecss_state_holds_a_64th_of_the_host_bytes():
    """`ecss_shard_states`: each of the 64 replicas of an expert shard (one per node) owns 1/64 of it: host
    state per node falls from 12.9 TB to 201 GB; the fetched experts reach the replicas by an all-gather
    (bf16) and their gradients return to the owners by a reduce-scatter (fp32), over the network."""
    hw = HARDWARE["h100"]
    plan = plan_for("sigma-1t", topology="pangu-sigma", gpu="h100", overrides=["ecss_shard_states=true"])
    owned = EXPERTS_PER_RANK // 64
    assert EXPERTS_PER_RANK % 64 == 0
    assert plan.parameters["experts_on_host_per_gpu"] == owned
    assert plan.host_phases_per_node["resident"] == 8 * 12 * owned == 201_351_168_000
    assert plan.h2d_bytes_per_gpu_per_step == 4 * owned
    fetched = EXPERTS_PER_RANK
    assert plan.transfers["ecss_owner_all_gather"] == int(63 / 64 * 2 * fetched)
    assert plan.transfers["ecss_gradient_reduce_scatter"] == int(63 / 64 * 4 * fetched)
    assert "ecss_gradient_all_reduce" not in plan.times
    assert plan.times["ecss_cpu_adam"] == pytest.approx(8 * 28 * owned / hw.host_dram_bytes_per_s)
    assert not any(r.startswith("host memory") for r in plan.reasons)  # the host fits now; the GPU does not
    assert any(r.startswith("GPU memory") for r in plan.reasons)
