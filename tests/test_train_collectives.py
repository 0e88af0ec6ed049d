"""Every collective of a training run takes tensors that NCCL accepts (issue: correct under NCCL).

Two gloo ranks train, validate, checkpoint and export under `tests.collective_guard`, with the compute
device `cpu:0` standing for `cuda:0`: a collective on a tensor that the project put on the host raises,
as NCCL would on the first step of an 8-GPU run.
"""
from __future__ import annotations

import subprocess

import pytest

from pangu_model.metrics import read_metrics, read_validation
from tests.test_train_common import run_config, run_torchrun


def _guarded_torchrun(config) -> subprocess.CompletedProcess:
    return run_torchrun(config, module="tests.collective_guard")


@pytest.mark.slow
@pytest.mark.parametrize("ecss", [True, False], ids=["ecss-ep2", "deepspeed-moe-ep2"])
def test_two_ranks_run_every_collective_on_the_compute_device(ecss: bool) -> None:
    # The interleaved expert layout on the way: its routing runs through ECSS and DeepSpeed MoE alike.
    config = run_config(f"nccl-rule-{'ecss' if ecss else 'moe'}", "sigma-tiny", ecss=ecss, expert_parallel=2,
                        topology="cpu-tiny", train_steps=3, checkpoint_every=2, validation_every=2,
                        log_every=1, export=True, model_overrides={"expert_layout": "interleaved"})
    done = _guarded_torchrun(config)
    output = done.stdout + done.stderr
    assert "on a host tensor" not in output, output[-3000:]
    assert done.returncode == 0, output[-4000:]
    run = config.parent
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[-1]["tokens"] > 0
    assert [step for step, _, _ in read_validation(run)["all"]] == [2, 3]
    assert (run / "export" / "model.safetensors").is_file()
    loads = (run / "expert_load.csv").read_text().splitlines()
    assert len(loads) > 1 and sum(int(line.rsplit(",", 1)[1]) for line in loads[1:]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded-host-state", "replicated-host-state"])
def test_ecss_returns_keep_one_collective_order_on_every_rank(sharded: bool) -> None:
    """NCCL runs each collective as a kernel that waits on the GPU for its peers: two ranks that issue the
    collectives of two groups in opposite orders can wait on each other for good, where gloo finishes both.
    Here 4 ranks (ep 2 × dp 2) take rows of any domain, so in some steps one replica of a shard computes
    rows of a layer and the other none, and ZeRO-2 reduces dense gradients in small buckets during the
    backward; the guard fails the run when two ranks' shared collectives (ECSS's returns to the replicas,
    DeepSpeed's reductions, the expert-parallel all-to-alls) come in different orders."""
    optimizer = {"lr": 3e-3, "warmup_steps": 1, "decay_steps": 4, "grad_clip": 0.5}
    config = run_config(f"collective-order-{'sharded' if sharded else 'replicated'}", "sigma-tiny", ecss=True,
                        expert_parallel=2, topology=None, domain_affine=False, ecss_shard_states=sharded,
                        micro_batch_size=1, gradient_accumulation_steps=2 if sharded else 3, zero_stage=2,
                        reduce_bucket_size=100, optimizer=optimizer, train_steps=4, checkpoint_every=0)
    done = run_torchrun(config, module="tests.collective_guard", ranks=4)
    output = done.stdout + done.stderr
    assert "collective order:" not in output, output[-3000:]
    assert done.returncode == 0, output[-4000:]
    assert [int(r["step"]) for r in read_metrics(config.parent)] == list(range(1, 5))
