"""Expert parallelism through DeepSpeed's MoE layer with a fixed RRE gate: 2 gloo ranks on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pangu_model import load_checkpoint
from pangu_model.metrics import read_metrics
from tests.test_train_common import ROOT, run_config


def _torchrun(config: Path, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "pangu_model.train", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.slow
def test_expert_parallel_2_gives_the_losses_of_expert_parallel_1() -> None:
    """Same 2 data-parallel ranks and rows; ep 2 puts 4 of the 8 experts on each rank (all-to-all)."""
    fields = dict(train_steps=4, checkpoint_every=0, ecss=False, topology=None)
    ep1 = run_config("ep1", "sigma-tiny", expert_parallel=1, **fields)
    ep2 = run_config("ep2", "sigma-tiny", expert_parallel=2, **{**fields, "topology": "cpu-tiny"})
    _torchrun(ep1, 29731)
    _torchrun(ep2, 29732)
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
