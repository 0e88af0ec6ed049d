"""Tensor parallelism for PanGu-Σ (issue #15 §1: "PanGu-Σ's dense part likewise; experts stay expert-parallel").

The dense part of `sigma-tiny` (attention, the dense FFNs of the lower layers, the vocabulary-parallel embedding
and tied head, the query layer) splits over the tensor group exactly as PanGu-α's does; the RRE layers' experts
are not split: every rank of a tensor group holds the same experts and computes them on the same tokens.

* tensor_parallel 2 on 2 ranks gives the losses, gradient norms and export of tensor_parallel 1 on 1 rank
  (dropout off, same global batch) and resumes exactly after a kill -9;
* a sparse model inherited from a dense export starts, on each tensor rank, from its slices of the
  one-rank inheritance.
"""
from __future__ import annotations

import pytest
import torch

# Dropout off; the same global batch (4 rows a step: tp 2 is one data-parallel replica of 2 ranks).
FIELDS = dict(train_steps=6, checkpoint_every=2, validation_every=3, micro_batch_size=4, ecss=False,
              model_overrides={"dropout": 0.0}, optimizer={"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5})


def _module_states(checkpoint, ranks: list[int]) -> list[dict[str, torch.Tensor]]:
    return [torch.load(checkpoint / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)["module"] for r in ranks]


@pytest.mark.slow
def test_sigma_tensor_parallel_2_gives_the_losses_and_export_of_one_rank_and_resumes_after_kill_9() -> None:
    from pangu_model import PanguModel, load_checkpoint
    from pangu_model.checkpoint import load_config
    from pangu_model.metrics import read_validation
    from pangu_model.tensor_parallel import TensorParallel, split_dims
    from tests.test_train_common import (assert_export_joins_the_slices, kill_9_after_a_checkpoint, logged_rows,
                                         run_cli, run_config, run_torchrun)

    one = run_config("sigma-tp1", "sigma-tiny", tensor_parallel=1, **FIELDS)
    two = run_config("sigma-tp2", "sigma-tiny", tensor_parallel=2, throttle_s=0.5, **FIELDS)
    reference = run_cli(one, timeout=120)
    tag, before_kill = kill_9_after_a_checkpoint(two)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert tag in ("step00000002", "step00000004") and len(before_kill) < 6, (tag, len(before_kill))
    done = run_torchrun(two, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    dense, split = logged_rows(one.parent), logged_rows(two.parent)
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(dense, split):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        # The experts' and other replicated gradients count once in the norm clipped.
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x["grad_norm"], y["grad_norm"])
        assert y["tokens"] == x["tokens"]  # a tensor group's rows are counted once
    checkpointed = int(tag.removeprefix("step"))
    for x in before_kill[checkpointed:]:  # steps run before the kill and again after the resume: exact
        y = split[int(x["step"]) - 1]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (x["step"], x["loss"], y["loss"])
    for (s1, l1, _), (s2, l2, _) in zip(read_validation(one.parent)["all"], read_validation(two.parent)["all"]):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)
    # The expert load is counted once per tensor group, as the rows are.
    assert (two.parent / "expert_load.csv").read_text() == (one.parent / "expert_load.csv").read_text()

    # The export is the tensor ranks' checkpointed slices joined; the experts (replicated over the tensor group)
    # are equal on both ranks, bit for bit; and it holds the one-rank run's weights.
    got = load_checkpoint(two.parent / "export").state_dict()
    with torch.device("meta"):
        dims = split_dims(PanguModel(load_config(two.parent / "export"), tp=TensorParallel(None, 0, 2)))
    assert not any(".experts." in name for name in dims) and "word_embedding.weight" in dims
    parts = _module_states(two.parent / "checkpoints" / "step00000006", [0, 1])
    assert_export_joins_the_slices(got, parts, dims, load_checkpoint(one.parent / "export").state_dict())


def test_a_sigma_model_inherited_from_a_dense_export_starts_from_its_tensor_slices(tmp_path) -> None:
    """init_from a dense export with tensor_parallel 2: each tensor rank holds its slices of the model that
    the one-rank inheritance makes (experts whole on both), with the split marks DeepSpeed reads."""
    from pangu_model import get_config
    from pangu_model.checkpoint import save_checkpoint
    from pangu_model.materialize import build_model_on
    from pangu_model.tensor_parallel import TensorParallel, split_dim, split_dims
    from pangu_model.train import TrainConfig, build_model

    overrides = {"vocab_size": 256, "max_seq_len": 32}
    save_checkpoint(build_model_on(get_config("tiny", **overrides), "cpu", seed=3), tmp_path / "dense")
    fields = dict(model="sigma-tiny", model_overrides=overrides, init_from=str(tmp_path / "dense"), ecss=False)
    whole = build_model(TrainConfig(**fields)).state_dict()
    config = TrainConfig(**fields, tensor_parallel=2)
    ranks = [build_model(config, tp=TensorParallel(None, rank, 2)) for rank in (0, 1)]
    dims = split_dims(ranks[0])
    assert dims and not any(".experts." in name for name in dims)
    for name, tensor in whole.items():
        if name in dims:
            joined = torch.cat([model.state_dict()[name] for model in ranks], dims[name])
            assert torch.equal(joined, tensor), name
            assert split_dim(ranks[1].get_parameter(name)) == dims[name], name
        else:
            assert all(torch.equal(model.state_dict()[name], tensor) for model in ranks), name
