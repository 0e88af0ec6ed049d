"""Expert parallelism through DeepSpeed's MoE layer with a fixed RRE gate: 2 gloo ranks on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
import torch

from pangu_model import load_checkpoint
from pangu_model.metrics import read_metrics
from tests.test_train_common import run_config, run_torchrun, torchrun


def _torchrun(config: Path) -> None:
    done = run_torchrun(config, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _both(first: Path, second: Path) -> None:
    """Both runs at once (each spends seconds starting up on one core while the other computes)."""
    proc = torchrun(first)
    _torchrun(second)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (out + err)[-4000:]


@pytest.mark.slow
def test_expert_parallel_2_gives_the_losses_of_expert_parallel_1() -> None:
    """Same 2 data-parallel ranks and rows; ep 2 puts 4 of the 8 experts on each rank (all-to-all)."""
    fields = dict(train_steps=4, checkpoint_every=0, ecss=False, topology=None)
    ep1 = run_config("ep1", "sigma-tiny", expert_parallel=1, **fields)
    ep2 = run_config("ep2", "sigma-tiny", expert_parallel=2, **{**fields, "topology": "cpu-tiny"})
    _both(ep1, ep2)
    a, b = read_metrics(ep1.parent), read_metrics(ep2.parent)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    # The export gathers both ranks' experts back into ExpertBank tensors (zero_to_fp32 cannot).
    dense, sparse = (load_checkpoint(p.parent / "export").state_dict() for p in (ep1, ep2))
    assert set(dense) == set(sparse)
    for name, tensor in dense.items():
        torch.testing.assert_close(sparse[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ecss_sharded_over_expert_parallel_2_matches_ecss_on_one_shard_and_resumes() -> None:
    """ECSS with ep 2: each rank keeps 4 of the 8 experts (and their Adam states) in host memory and
    tokens reach their expert's owner by all-to-all. Same losses as ECSS with every expert on every
    rank; a stop at step 2 and a rerun to step 4 resume each shard from its own file."""
    optimizer = {"lr": 3e-3, "warmup_steps": 1, "decay_steps": 4, "grad_clip": 0.5}
    fields = dict(checkpoint_every=2, ecss=True, optimizer=optimizer)
    one = run_config("ecss-ep1", "sigma-tiny", expert_parallel=1, train_steps=4, topology=None, **fields)
    two = run_config("ecss-ep2", "sigma-tiny", expert_parallel=2, train_steps=2, topology="cpu-tiny", **fields)
    _both(one, two)
    assert (two.parent / "checkpoints" / "latest").read_text() == "step00000002"
    data = yaml.safe_load(two.read_text())
    two.write_text(yaml.safe_dump({**data, "train_steps": 4}))
    _torchrun(two)

    a, b = read_metrics(one.parent), read_metrics(two.parent)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x["loss"], y["loss"])
    shards = sorted((two.parent / "checkpoints" / "step00000004").glob("ecss_experts_ep*.pt"))
    assert [p.name for p in shards] == ["ecss_experts_ep000.pt", "ecss_experts_ep001.pt"]
    for ep_rank, path in enumerate(shards):
        state = torch.load(path, weights_only=True)
        assert state["shard"].tolist() == [ep_rank, 2]
        assert all(v["master"].shape[0] == 4 for k, v in state.items() if k != "shard")
    # The export gathers both shards back into whole ExpertBank tensors.
    whole, sharded = (load_checkpoint(p.parent / "export").state_dict() for p in (one, two))
    assert set(whole) == set(sharded)
    for name, tensor in whole.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # A resume onto another expert-parallel size (the same 2 ranks) is refused before anything is loaded,
    # in one line that names both degrees.
    two.write_text(yaml.safe_dump({**data, "train_steps": 6, "expert_parallel": 1, "topology": None}))
    refused = run_torchrun(two, timeout=180)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "written with expert_parallel 2" in out and "this run has expert_parallel 1" in out, \
        out[-3000:]
    assert 'pangu_model/train.py", line' not in out, out[-3000:]  # no traceback of ours (torchrun prints its own)
