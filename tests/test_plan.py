"""pangu_model.plan / `pangu plan`: the memory and time plans of sigma-1t on pangu-sigma and 200b on
pangu-alpha-200b, pinned against figures derived here from the models' shapes (not copied from the
planner), plus the trainer's check and the command line. Nothing is allocated: counts come from the meta
device.

sigma-1t is planned twice: as the preset is (ECSS with sharded host state, domain-affine steps, micro-batch
4, on H200) and in the earlier layout (every replica keeps its whole shard, micro-batch 1), whose
world-wide union of routed sets the planner still models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pangu_model.plan import (
    GPU_RESERVE_FRACTION,
    HARDWARE,
    PlanDoesNotFit,
    check_plan,
    format_plan,
    plan_for,
    resolve_train_config,
)

GiB = 2**30
# What torch reports as an H200's total_memory (139.8 GiB; the datasheet's 141 GB is more than a process gets).
H200_MEMORY = int(139.8 * GiB)
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


# ECSS without sharded host state (the preset before it): every replica keeps and steps its whole shard
UNSHARDED = ["ecss_shard_states=false", "micro_batch_size=1", "ecss_delayed_update=false"]


@pytest.fixture(scope="module")
def sigma_h100():
    return plan_for("sigma-1t", topology="pangu-sigma", gpu="h100", overrides=UNSHARDED)


@pytest.fixture(scope="module")
def sigma_h200():
    return plan_for("sigma-1t", topology="pangu-sigma", gpu="h200", overrides=UNSHARDED)


@pytest.fixture(scope="module")
def sigma_preset():
    """The preset as it is, on the H200 nodes the issue plans it for."""
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
    sbh = SEQ * 1 * D
    # ECSS gradients back: bf16 weights + bf16 grads of the fetched experts and, from each expert layer's hooks
    # in the backward, the fp32 copies and their concatenation that the replicas all-reduce, every sparse
    # layer's (a bound: the link trails the backward), beside the ZeRO buckets and the activations of the 32
    # blocks below the expert layers
    returning = static + 2 * 500_000_000 * 2 + (2 + 2 + 4 + 4) * EXPERTS_PER_RANK + 34 * sbh * 32
    assert sigma_h100.gpu_phases["ecss_gradient_return"] == returning
    assert sigma_h100.gpu_bytes_per_gpu == returning == 1_641_063_628_440  # ≈ 1.64 TB per GPU
    assert sigma_h100.gpu_breakdown["activations"] == 34 * sbh * LAYERS  # Korthikanti, bf16, no recompute
    assert sigma_h100.gpu_breakdown["zero_buckets"] == 2 * 500_000_000 * 2
    assert not sigma_h100.fits
    assert any(r.startswith("GPU memory") and "TiB" in r for r in sigma_h100.reasons)


def test_sigma_1t_host_bytes(sigma_h100):
    per_gpu = EXPERTS_PER_RANK
    phases = sigma_h100.host_phases_per_node
    # fp32 masters + their bf16 shadows (the fetch's pinned source) + Adam m, v + the pinned buffer the
    # gradients land in (the replicas' fp32 sums): 19.3 TB
    assert phases["resident"] == 8 * 18 * per_gpu == 19_329_712_128_000
    assert sigma_h100.host_breakdown["ecss_compute_dtype_shadows"] == 2 * per_gpu
    assert sigma_h100.host_breakdown["ecss_gradient_landing"] == 4 * per_gpu
    assert "ecss_fetch_staging" not in sigma_h100.host_breakdown  # copies straight from the pinned shadows
    assert phases["step"] == 8 * 18 * per_gpu  # the fp32 sums are scaled where they landed: no copy
    assert "ecss_step_fp32_gradients" not in sigma_h100.host_breakdown
    assert phases["checkpoint_save"] == 8 * 26 * per_gpu  # + m and v copies in ExpertOffload.state_dict
    assert phases["resume"] == 8 * 26 * per_gpu  # masters, shadows + the loaded file + the cloned moments
    assert sigma_h100.host_bytes_per_node == 8 * 26 * per_gpu
    assert any(r.startswith("host memory") for r in sigma_h100.reasons)


def test_sigma_1t_transfers_and_time(sigma_h100):
    hw = HARDWARE["h100"]
    fetched = EXPERTS_PER_RANK
    assert sigma_h100.h2d_bytes_per_gpu_per_step == 2 * fetched  # bf16 shadows cross PCIe
    assert sigma_h100.transfers["ecss_gradients_d2h"] == 4 * fetched
    # the fetch's DMA reads the shadow once: PCIe (55 GB/s a GPU) and the node's DRAM (8 × 2 B per
    # parameter at 450 GB/s) take about as long
    assert sigma_h100.times["ecss_fetch_h2d"] == pytest.approx(
        max(2 * fetched / hw.pcie_h2d_bytes_per_s, 8 * 2 * fetched / hw.host_dram_bytes_per_s))
    # the gradients' multiply (read the fp32 sums, write them: 8 B), CPU Adam (28 B) and the shadow refresh
    # (read the master, write the shadow: 6 B), the node's 8 GPUs
    assert sigma_h100.times["ecss_gradient_scale"] == pytest.approx(8 * 8 * fetched / hw.host_dram_bytes_per_s)
    assert sigma_h100.times["ecss_cpu_adam"] == pytest.approx(8 * 28 * fetched / hw.host_dram_bytes_per_s)
    assert sigma_h100.times["ecss_shadow_refresh"] == pytest.approx(8 * 6 * fetched / hw.host_dram_bytes_per_s)
    # expert gradients (fp32) all-reduced over the 64 holders of a shard, one per node: the network
    assert sigma_h100.times["ecss_gradient_all_reduce"] == pytest.approx(
        2 * 63 / 64 * 4 * fetched / hw.network_bytes_per_s)
    assert sigma_h100.step_time_s > 60  # host-bound: ECSS moves every expert every step at this batch
    assert 0 < sigma_h100.mfu < 0.01


def test_sigma_1t_on_h200_same_bytes_more_room(sigma_h100, sigma_h200):
    assert sigma_h200.gpu_bytes_per_gpu == sigma_h100.gpu_bytes_per_gpu
    assert sigma_h200.gpu_capacity_bytes == H200_MEMORY
    assert sigma_h200.gpu_usable_bytes == int(H200_MEMORY * (1 - GPU_RESERVE_FRACTION))
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
    # The split the trainer makes (pangu_model.topology.stage_layers) is stated: 64 layers, 4 per stage.
    assert "pipeline: 64 layers over 16 stages: 4 each (embeddings on stage 0, query layer and tied head on " \
           "stage 15)" in alpha_200b.notes
    # The trainer runs tensor 8 × pipeline 16 for a dense model: the plan does not say it is refused.
    assert not any("refuses" in note for note in alpha_200b.notes), alpha_200b.notes


def test_uneven_pipeline_split_is_planned_stage_by_stage():
    from pangu_model.plan import plan_for

    # 13b: 40 layers over 16 stages, 2 or 3 a stage; the busiest stages hold 3 layers' activations.
    plan = plan_for("13b", nodes=16, overrides={"pipeline_parallel": 16})
    assert any("40 layers over 16 stages, uneven layers per stage: stages 0-6: 2, stages 7-14: 3" in note
               for note in plan.notes), plan.notes
    even = plan_for("13b", nodes=16, overrides={"pipeline_parallel": 8})
    assert any("40 layers over 8 stages: 5 each" in note for note in even.notes), even.notes


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


def test_a_preset_name_with_a_dot_is_a_name_not_a_path(tmp_path, monkeypatch, capsys):
    """`2.6b` (README's list of model presets) was taken for a file with the suffix `.6b`: `pangu plan --preset
    2.6b` said "pretrain preset '2.6b' not found" while 13b and 200b planned."""
    from flows.cli import main

    from cleaning.yamlfile import names_a_file

    assert resolve_train_config("2.6b").model == "2.6b"
    assert main(["plan", "--preset", "2.6b", "--nodes", "1"]) == 0
    assert "bare model preset 2.6b: planned with" in capsys.readouterr().out
    # what still names a file: a directory part, a YAML suffix, or a suffix and a file of that name
    assert not names_a_file("2.6b") and not names_a_file("sigma-tiny")
    assert names_a_file("my.yaml") and names_a_file("configs/run") and names_a_file("run.YML")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.cfg").write_text("model: tiny\n")
    assert names_a_file("run.cfg") and resolve_train_config("run.cfg").model == "tiny"


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
    assert check_plan(sigma, 512, 8, "NVIDIA H200", 150 * 10**9, 2 * 10**12).fits
    with pytest.raises(PlanDoesNotFit, match=r"host memory: .*GiB per node"):
        check_plan(sigma, 512, 8, "NVIDIA H200", 150 * 10**9, 5 * 10**11)


def test_a_cpu_run_counts_its_processes_memory_and_the_attention_matrix_as_host_memory():
    """alpha-350m (micro-batch 8 × seq 1024) on a 24 GB CPU machine passed the check (only the 156 MiB the plan
    puts on the host was counted) and was killed by the out-of-memory killer 60 s in. A CPU process's "device"
    bytes are host bytes, and the CPU's math attention kernel keeps the attention probabilities (measured:
    peak RSS 11.0 / 16.5 GiB at micro-batch 1 / 2)."""
    ram = 24 * GiB

    def check(micro_batch: int, processes: int = 1):
        config = resolve_train_config("alpha-350m", [f"micro_batch_size={micro_batch}",
                                                     "gradient_accumulation_steps=1"])
        return check_plan(config, processes, processes, None, None, ram)

    with pytest.raises(PlanDoesNotFit, match=r"host memory: .* = 1 CPU process × .*activations .* usable of 24.00 GiB"):
        check(8)
    one, two = check(1), check(2)
    assert 11.0 * GiB <= one.host_bytes_per_node <= 11.0 * 1.2 * GiB  # within 20 % above the measured peaks
    assert 16.5 * GiB <= two.host_bytes_per_node <= 16.5 * 1.2 * GiB
    with pytest.raises(PlanDoesNotFit, match=r"= 2 CPU processes × "):
        check(2, processes=2)  # each fits alone (16.5 GiB), two do not
    # on a GPU the flash kernels keep no attention matrix: the same run's device bytes are far smaller
    gpu = check_plan(resolve_train_config("alpha-350m", ["micro_batch_size=1", "gradient_accumulation_steps=1"]),
                     1, 1, "NVIDIA H100 80GB HBM3", 80 * GiB, ram)
    assert gpu.gpu_bytes_per_gpu < one.host_bytes_per_node - 3 * GiB
    # DeepSpeed allocates whole ZeRO buckets (a GPU holds them), but a CPU's pages cost memory once written, and a
    # bucket is written with the rank's gradients only: 8 CPU ranks of alpha-tiny fit (the plan had 3.7 GiB each)
    tiny = resolve_train_config("alpha-tiny", ["zero_stage=1"])
    on_cpu = check_plan(tiny, 8, 8, None, None, ram)
    assert on_cpu.gpu_breakdown["zero_buckets"] == 2 * on_cpu.gpu_breakdown["gradients"]
    on_gpu = check_plan(tiny, 8, 8, "NVIDIA H100 80GB HBM3", 80 * GiB, ram)
    assert on_gpu.gpu_breakdown["zero_buckets"] == 2 * tiny.reduce_bucket_size * 4  # fp32, double-buffered


def test_pangu_plan_gpu_cpu_makes_the_trainer_s_cpu_check_beforehand(capsys, monkeypatch):
    """`pangu plan --gpu cpu`: the plan the trainer checks on a machine without a GPU (its processes' bytes as
    host bytes, against this machine's RAM), made before a run; there was no way to ask it."""
    import pangu_model.plan
    from flows.cli import main

    monkeypatch.setattr(pangu_model.plan, "this_machine_ram", lambda: 24 * GiB)
    assert main(["plan", "--preset", "alpha-350m", "--gpu", "cpu", "--json"]) == 0
    refused = json.loads(capsys.readouterr().out)
    config = resolve_train_config("alpha-350m")
    with pytest.raises(PlanDoesNotFit) as caught:
        check_plan(config, 1, 1, None, None, 24 * GiB)
    assert not refused["fits"] and refused["reasons"] == caught.value.plan.reasons
    assert refused["host_bytes_per_node"] == caught.value.plan.host_bytes_per_node
    assert refused["step_time_s"] is None and refused["mfu"] is None and refused["gpu"] == "cpu"
    assert refused["notes"][0] == "host RAM: this machine's 24.00 GiB"

    assert main(["plan", "--preset", "alpha-350m", "--gpu", "cpu", "--set", "micro_batch_size=1"]) == 0
    text = capsys.readouterr().out
    assert "on 1 node × 1 CPU processes" in text and "memory of a CPU process" in text and "\nFITS" in text
    assert "not planned: the hardware table has GPU speeds only" in text and "MFU" not in text
    two = plan_for("alpha-350m", gpu="cpu", gpus_per_node=2, host_ram_gb=64, overrides=["micro_batch_size=2"])
    assert two.cluster["gpus_per_node"] == 2 and two.host_capacity_bytes == 64 * 10**9
    assert two.host_bytes_per_node == check_plan(resolve_train_config("alpha-350m", ["micro_batch_size=2"]), 2, 2,
                                                 None, None, 64 * 10**9).host_bytes_per_node
    timed = ("ECSS adds", "ECSS gradients back")  # times from the table's GPU speeds: none for CPU processes
    assert any(note.startswith(timed) for note in plan_for("sigma-tiny", nodes=1, gpus_per_node=1).notes)
    assert not any(note.startswith(timed) for note in plan_for("sigma-tiny", gpu="cpu").notes)
    with pytest.raises(ValueError, match="--gpu cpu plans CPU processes .* topology pangu-sigma is GPU servers"):
        plan_for("sigma-tiny", gpu="cpu", topology="pangu-sigma")


def test_cli_json(capsys):
    from flows.cli import main

    assert main(["plan", "--preset", "200b", "--topology", "pangu-alpha-200b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert REQUIRED_KEYS <= set(data)
    assert data["fits"] is True and data["gpu_bytes_per_gpu"] == 10_994_112_512
    assert main(["plan", "--preset", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_cli_json_of_a_pipeline_layout_is_json_alone():
    """A pipeline layout's plan once imported DeepSpeed, whose logger writes its accelerator warning to stdout,
    before the JSON. A fresh process, as a user's: in this one DeepSpeed's handler may be set up already."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "--preset", "200b", "--topology",
                           "pangu-alpha-200b", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["fits"] is True and "pipeline" in " ".join(data["notes"])


def test_cli_table_says_does_not_fit(capsys):
    from flows.cli import main

    assert main(["plan", "--preset", "sigma-1t", "--gpu", "h100"]) == 0  # a report, even when it cannot fit
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "per node" in out and "GPU memory" in out and "MFU" in out
    # the GPU kind it does fit on is named, with the flag that plans it (the default kind is H100)
    assert "fits on NVIDIA H200 SXM 141 GB (--gpu h200): step " in out
    assert main(["plan", "--preset", "sigma-1t"]) == 0
    assert "--gpu h200" in capsys.readouterr().out
    assert main(["plan", "--preset", "sigma-1t", "--gpu", "h200"]) == 0
    assert "FITS" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "--preset", "no-such-preset"], "unknown preset"),
    (["plan", "--preset", "200b", "--topology", "no-such-topology"], "no-such-topology"),
    (["plan", "--preset", "sigma-1t", "--nodes", "1", "--gpus-per-node", "4"], "expert parallel 8"),
    (["plan", "--preset", "200b", "--topology", "pangu-sigma"], "no experts"),
    # a degree the topology does not have is refused, as the trainer refuses it (not planned with the topology's)
    (["plan", "--preset", "sigma-1t", "--set", "tensor_parallel=2"],
     "topology pangu-sigma has tensor parallel 1, the preset says tensor_parallel 2"),
    (["plan", "--preset", "alpha-350m", "--topology", "pangu-alpha-200b", "--set", "pipeline_parallel=2"],
     "topology pangu-alpha-200b has pipeline parallel 16, the preset says pipeline_parallel 2"),
    # a config's validation error names the field, the rule and the value, in one line
    (["plan", "--preset", "sigma-1t", "--set", "zero_stage=9"],
     "invalid TrainConfig: zero_stage: Input should be less than or equal to 3 (got 9)"),
])
def test_cli_user_errors(capsys, argv, fragment):
    from flows.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pangu plan: error: ") and fragment in err
    assert len(err.splitlines()) == 1


def test_a_preset_or_topology_that_is_a_directory_or_an_empty_file(capsys, tmp_path):
    """A directory was `[Errno 21] Is a directory`; an empty file planned every default (a 'tiny' model)."""
    from flows.cli import main

    (tmp_path / "empty.yaml").write_text("")
    for argv, fragment in [
        (["plan", "--preset", str(tmp_path)], f"{tmp_path} is a directory, not a YAML config file"),
        (["plan", "--preset", "sigma-tiny", "--topology", str(tmp_path)], "is a directory, not a YAML config file"),
        (["plan", "--preset", str(tmp_path / "empty.yaml")], "empty.yaml holds no settings"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("pangu plan: error: ") and fragment in err and len(err.splitlines()) == 1, err


# ---- the preset: ECSS with sharded host state, rank-local fetch, domain-affine steps ---------------------
# 64 replicas of a shard (one per node) own blocks [j·80//64, (j+1)·80//64) of its 80 experts per layer: 1 or 2;
# the largest, 2 per layer, is what the busiest nodes keep, upload and step.
REPLICAS, SHARD, ROWS = 64, EXPERTS // 8, 4  # micro-batch 4, no accumulation
BLOCK = max((j + 1) * SHARD // REPLICAS - j * SHARD // REPLICAS for j in range(REPLICAS))
# Domain-affine: a node's rows are one domain; the interleaved layout puts 16 / 8 = 2 of its experts on each rank.
FETCHED = 2 * SPARSE * PER_EXPERT  # A: the experts a rank computes with
NODE_OWNED = 10  # 8 consecutive blocks of 80 / 64 experts: the experts of a layer one node owns
UPLOADED = BLOCK * SPARSE * PER_EXPERT  # U: the owner's whole block (every domain is in every step)
# Q: 64 nodes over 40 domains: a domain sits on at most ⌈64/40⌉ = 2 nodes of a step, so each of the block's
# 2 experts (2 domains) is asked by at most 2 replicas
ASKED = BLOCK * 2 * SPARSE * PER_EXPERT


def _static(rows: int, dense: int = SIGMA_DENSE, dp: int = 512) -> int:
    """bf16 parameters, ZeRO-2 bf16 gradient and fp32 master + Adam partitions."""
    assert dense % dp == 0
    return 2 * dense + 2 * (dense // dp) + 12 * (dense // dp)


def test_sigma_1t_preset_fetches_rank_locally(sigma_preset):
    """The fetch is rank-local: a rank gets its domain's 2 experts per layer from their owners by one
    all-to-all (bf16) over the replicas and returns the gradients by an all-to-all (bf16) per sparse layer
    from the last backward's hooks; the owner of the largest block uploads and steps that block."""
    hw = HARDWARE["h200"]
    plan = sigma_preset
    assert BLOCK == 2
    assert plan.training["micro_batch_size"] == ROWS and plan.training["gradient_accumulation_steps"] == 1
    assert plan.ecss["sharded"] and plan.ecss["domain_affine"]
    assert plan.ecss["fetched_per_layer"] == 2 and plan.ecss["owned_per_layer"] == BLOCK
    assert plan.ecss["owner_union_per_layer"] == BLOCK and plan.ecss["asked_of_block_per_layer"] == 4
    # expected, uniform mixture: the block's 2 domains are in every step; each sits on 64/40 nodes on average
    assert plan.ecss["owner_union_expected_per_layer"] == pytest.approx(2.0)
    assert plan.ecss["asked_expected_per_layer"] == pytest.approx(2 * 64 / 40)
    assert any("fetches 2 of its shard's 80 experts" in n and "domain-affine" in n for n in plan.notes)
    params = plan.parameters
    assert params["experts_on_host_per_gpu"] == UPLOADED == 3_355_852_800
    assert params["fetched_per_gpu_per_step"] == FETCHED
    assert plan.h2d_bytes_per_gpu_per_step == 2 * UPLOADED  # bf16 shadows of the owner's block cross PCIe
    assert plan.d2h_bytes_per_gpu_per_step == 4 * UPLOADED  # its fp32 per-expert sums come back
    t = plan.transfers
    assert t["ecss_owner_all_to_all_sent"] == 2 * ASKED and t["ecss_owner_all_to_all_received"] == 2 * FETCHED
    # gradients travel in bf16, as autograd made them; the owner sums them in fp32
    assert t["ecss_gradient_all_to_all_sent"] == 2 * FETCHED and t["ecss_gradient_all_to_all_received"] == 2 * ASKED
    assert not {"ecss_owner_all_gather", "ecss_gradient_reduce_scatter", "ecss_gradient_all_reduce"} & set(t)
    times = plan.times
    # the fetch (owners' copies, then the all-to-all) overlaps the forward of the 32 dense layers below the
    # first expert layer, a third of their compute time: only the rest shows, charged to the all-to-all
    h2d = max(2 * UPLOADED / hw.pcie_h2d_bytes_per_s, 2 * NODE_OWNED * SPARSE * PER_EXPERT / hw.host_dram_bytes_per_s)
    a2a = 2 * ASKED / hw.network_bytes_per_s
    window = plan.times["compute_dense"] / 3 * 32 / 40
    assert h2d < window < h2d + a2a
    assert times["ecss_fetch_h2d"] == 0.0
    assert times["ecss_owner_all_to_all"] == pytest.approx(h2d + a2a - window)
    # the host DRAM of a node serves its 8 owners: blocks rotate with the shard (ecss.owned_block), so a
    # node's ranks own 8 consecutive blocks, 10 experts a layer together (not 8 × 2)
    assert sorted(plan.ecss["node_blocks"]) == [1] * 6 + [2] * 2
    node = NODE_OWNED * SPARSE * PER_EXPERT
    # Gradients back: the replica group spans the 64 nodes (the network; the busiest rank sends the largest
    # block's Q rows), then the fp32 sums cross PCIe. Each of the top 8 blocks' share starts once the last
    # backward (2/3 of the compute, 1/40 a block) has passed it and the one above is done; only what ends after
    # the backward shows, charged to the all-to-all first.
    a2a_back = 2 * ASKED / hw.network_bytes_per_s
    d2h = max(4 * UPLOADED / hw.pcie_d2h_bytes_per_s, 4 * node / hw.host_dram_bytes_per_s)
    backward = 2 / 3 * (times["compute_dense"] + times["compute_experts"])
    end = 0.0
    for block in range(LAYERS - 1, LAYERS - SPARSE - 1, -1):
        end = max(end, (LAYERS - block) * backward / LAYERS) + (a2a_back + d2h) / SPARSE
    assert 0 < end - backward < a2a_back + d2h  # the link trails the backward, which hides most of it
    assert times["ecss_gradient_all_to_all"] == pytest.approx(min(a2a_back, end - backward))
    assert times["ecss_gradients_d2h"] == pytest.approx(end - backward - times["ecss_gradient_all_to_all"])
    assert any("ECSS gradients back" in n for n in plan.notes)
    # the preset updates the host one step behind: the gradients' multiply (8 B), CPU Adam (28 B) and the shadow
    # refresh (6 B) run beside the next step; what outlasts it shows
    rest = sum(v for k, v in times.items() if k not in ("ecss_cpu_adam", "compute"))
    assert 42 * node / hw.host_dram_bytes_per_s > rest
    assert times["ecss_cpu_adam"] == pytest.approx(42 * node / hw.host_dram_bytes_per_s - rest)


def test_sigma_1t_preset_device_bytes(sigma_preset):
    """Gradients back: bf16 weights + grads of A and, from the expert layers' hooks in the backward, every
    sparse layer's bf16 rows to send (A), the replicas' bf16 rows inbound (Q) and the fp32 per-expert sums
    (U), beside the ZeRO buckets and the activations of the 32 blocks below; the fetch: the uploaded union,
    the outgoing rows and their concatenation, the inbound and the assembled copies."""
    static = _static(ROWS)
    below = 34 * SEQ * ROWS * D * 32  # Korthikanti, bf16, no recompute: the blocks below the expert layers
    buckets = 2 * 500_000_000 * 2
    assert sigma_preset.gpu_phases["ecss_gradient_return"] == (static + buckets + 4 * FETCHED + 2 * FETCHED
                                                                + 2 * ASKED + 4 * UPLOADED + below)
    assert sigma_preset.gpu_phases["ecss_fetch"] == static + 2 * FETCHED + 2 * (UPLOADED + 2 * ASKED + FETCHED)
    assert sigma_preset.gpu_bytes_per_gpu == sigma_preset.gpu_phases["ecss_gradient_return"]  # ≈ 87.9 GiB
    assert sigma_preset.gpu_bytes_per_gpu <= int(H200_MEMORY * (1 - GPU_RESERVE_FRACTION))
    assert not any(r.startswith("GPU memory") for r in sigma_preset.reasons)


def test_sigma_1t_preset_host_per_node_under_1_tb(sigma_preset):
    """Every phase stays under 1 TB a node. Start-up: build_model cuts each layer's shard of experts (80 per
    layer, fp32) to the rank's block as soon as it is made, so it holds the word embedding (the largest
    module made on the host), one layer's shard and the blocks, then ExpertOffload's masters beside the
    blocks."""
    phases = sigma_preset.host_phases_per_node
    node = NODE_OWNED * SPARSE * PER_EXPERT  # the node's 8 blocks: 10 experts a layer
    # masters, bf16 shadows, Adam m, v and the two pinned buffers the owners' fp32 sums land in (the delayed
    # update's worker scales one while the next step lands in the other)
    assert phases["resident"] == 22 * node == 369_143_808_000
    assert phases["step"] == 22 * node  # the sums are scaled where they landed: no copy
    assert phases["checkpoint_save"] == 30 * node
    assert phases["resume"] == 26 * node
    layer_shard = EXPERTS_PER_RANK // 8
    kept = [b * SPARSE * PER_EXPERT for b in sigma_preset.ecss["node_blocks"]]
    assert phases["startup"] == sum(4 * (VOCAB * D + max(k + layer_shard, 2 * k)) for k in kept)
    assert max(phases.values()) <= 10**12 and sigma_preset.reasons == []


def test_sigma_1t_preset_fits_in_1_tb_of_host_per_node(sigma_preset):
    """build_model cuts each layer's expert shard to the rank's block as it is made (`keep_block`), so
    start-up holds one layer's shard beside the blocks, not the whole shard (3.9 TiB a node before)."""
    assert sigma_preset.fits and sigma_preset.host_bytes_per_node <= 10**12


def test_sigma_1t_preset_transfers_fit_the_link_in_the_dense_compute(sigma_preset):
    """Host↔device bytes per rank per step against what PCIe moves during the step's dense compute."""
    from pangu_model.config import get_config
    from pangu_model.metrics import flops_per_token

    hw = HARDWARE["h200"]
    tokens_per_gpu = ROWS * SEQ
    dense_flops = (flops_per_token(get_config("sigma-1t"), SEQ) - 6 * 2 * D * DFF * SPARSE) * tokens_per_gpu
    assert sigma_preset.times["compute_dense"] == pytest.approx(dense_flops / (989e12 * hw.compute_efficiency))
    assert sigma_preset.h2d_link_bytes_in_dense_compute == int(hw.pcie_h2d_bytes_per_s
                                                              * sigma_preset.times["compute_dense"])
    assert sigma_preset.h2d_bytes_per_gpu_per_step <= sigma_preset.h2d_link_bytes_in_dense_compute
    assert sigma_preset.d2h_bytes_per_gpu_per_step <= sigma_preset.d2h_link_bytes_in_dense_compute


def test_sigma_1t_preset_against_its_dense_counterpart(sigma_preset):
    """The dense 13b shape with the same TrainConfig (ECSS off, expert 1) on the same cluster; the ratio is
    the two step times'; sigma-1t's preset is within 1.5× of it."""
    from pangu_model.train import load_train_config

    dense_config = load_train_config("sigma-1t", ["model=13b", "ecss=false", "ecss_shard_states=false",
                                                  "expert_parallel=1", "topology=null"])
    dense = plan_for(dense_config, nodes=64, gpus_per_node=8, gpu="h200")
    counterpart = sigma_preset.dense_counterpart
    assert counterpart["model"] == "13b" and counterpart["parameters"] == dense.parameters["total"]
    assert counterpart["step_time_s"] == pytest.approx(dense.step_time_s)
    assert counterpart["step_time_ratio"] == pytest.approx(sigma_preset.step_time_s / dense.step_time_s)
    assert json.loads(sigma_preset.to_json())["dense_counterpart"]["step_time_ratio"] == counterpart["step_time_ratio"]
    # the target: within 1.5× of the dense step (the fetch half hidden, the gradients back mostly
    # hidden by the last backward, the host update beside the next step, which outlasts it a little; the rest
    # still shows)
    assert counterpart["step_time_ratio"] <= 1.5
    ecss = sum(v for k, v in sigma_preset.times.items() if k.startswith("ecss_"))
    assert ecss > 0.25 and 0.0 < sigma_preset.times["ecss_cpu_adam"] < 0.2
    text = format_plan(sigma_preset)
    assert "dense counterpart (13b) step" in text and f"{counterpart['step_time_ratio']:.2f}×" in text
    assert plan_for("200b", topology="pangu-alpha-200b").dense_counterpart is None


def test_sigma_1t_without_domain_affine_steps_fetches_more_and_does_not_fit():
    """Independent rows: the 32 rows of an expert-parallel group bring 40·(1 − (39/40)^32) ≈ 22 domains
    (uniform mixture), so about 45 of the shard's 80 experts per layer, and each expert of a block is asked
    by 64·(1 − (39/40)^32) ≈ 36 replicas on average."""
    plan = plan_for("sigma-1t", topology="pangu-sigma", gpu="h200", overrides=["domain_affine=false"])
    chance = 1 - (39 / 40) ** (ROWS * 8)
    assert plan.ecss["fetched_per_layer"] == math.ceil(SHARD * chance) == 45
    assert plan.ecss["asked_of_block_per_layer"] == math.ceil(REPLICAS * BLOCK * chance) == 72
    assert any("independent rows" in n for n in plan.notes)
    assert any(r.startswith("GPU memory") for r in plan.reasons)


def test_delayed_host_update_takes_cpu_adam_off_the_step(sigma_preset):
    """ecss_delayed_update: the gradients' multiply, CPU Adam and the shadow refresh run on a worker beside the
    next step, so only what outlasts the rest of the step counts; in line they add up. The worker reads one
    landing buffer while the next step lands in the other: twice the pinned landing bytes."""
    hw = HARDWARE["h200"]
    delayed = plan_for("sigma-1t", topology="pangu-sigma", gpu="h200", overrides=["ecss_delayed_update=true"])
    inline = plan_for("sigma-1t", topology="pangu-sigma", gpu="h200", overrides=["ecss_delayed_update=false"])
    node = NODE_OWNED * SPARSE * PER_EXPERT
    scale, adam, refresh = (n * node / hw.host_dram_bytes_per_s for n in (8, 28, 6))
    assert inline.times["ecss_gradient_scale"] == pytest.approx(scale)
    assert inline.times["ecss_cpu_adam"] == pytest.approx(adam)
    assert inline.times["ecss_shadow_refresh"] == pytest.approx(refresh)
    rest = sum(v for k, v in delayed.times.items() if k not in ("ecss_cpu_adam", "compute"))
    assert delayed.times["ecss_cpu_adam"] == pytest.approx(max(0.0, scale + adam + refresh - rest))
    assert "ecss_shadow_refresh" not in delayed.times and "ecss_gradient_scale" not in delayed.times
    assert delayed.step_time_s == pytest.approx(inline.step_time_s - scale - adam - refresh
                                                + delayed.times["ecss_cpu_adam"])
    landing = delayed.host_breakdown_per_node["ecss_gradient_landing"]
    assert landing == 2 * inline.host_breakdown_per_node["ecss_gradient_landing"] == 2 * 4 * node
    ratio = delayed.dense_counterpart["step_time_ratio"]
    assert ratio < inline.dense_counterpart["step_time_ratio"]
    assert any("delayed host update" in n and "two steps back" in n for n in delayed.notes)


def test_gradients_back_show_only_what_ends_after_the_backward():
    """ECSS gradients back (`_shown_after_backward`): 4 blocks of 1 s of backward each, the top 2 sparse.
    A layer's share starts when the backward has passed it and the layer above's share is done."""
    from pangu_model.plan import _shown_after_backward

    experts = (0, 0, 8, 8)
    assert _shown_after_backward(2.0, experts, 4.0) == 0.0  # 1 s each: ends at 2 s and 3 s
    assert _shown_after_backward(8.0, experts, 4.0) == 5.0  # 4 s each: ends at 5 s and 9 s
    assert _shown_after_backward(8.0, (0, 0, 0, 0), 4.0) == 0.0


def test_model_info_takes_a_pretrain_preset_as_plan_does(capsys):
    """`pangu plan --preset alpha-350m` planned while `pangu model info --preset alpha-350m` said "unknown model
    preset": both take a model preset, a pretrain preset or a YAML path (the model it trains)."""
    import json

    from flows.cli import main

    assert main(["model", "info", "--preset", "alpha-350m", "--json"]) == 0
    from_pretrain = json.loads(capsys.readouterr().out)
    assert main(["model", "info", "--preset", "350m", "--json"]) == 0
    assert from_pretrain["parameters"] == json.loads(capsys.readouterr().out)["parameters"]
    preset_file = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "pretrain" / "sigma-tiny.yaml"
    assert main(["model", "info", "--preset", str(preset_file)]) == 0
    assert capsys.readouterr().out.startswith("model sigma-tiny  (router: rre)")
