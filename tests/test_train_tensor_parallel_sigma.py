"""Tensor parallelism for PanGu-Σ (issue #15 §1: "PanGu-Σ's dense part likewise; experts stay expert-parallel").

The dense part of `sigma-tiny` (attention, the dense FFNs of the lower layers, the vocabulary-parallel embedding
and tied head, the query layer) splits over the tensor group exactly as PanGu-α's does; the RRE layers' experts
are not split: every rank of a tensor group holds the same experts and computes them on the same tokens.

* tensor_parallel 2 on 2 ranks gives the losses, gradient norms and export of tensor_parallel 1 on 1 rank
  (dropout off, same global batch) and resumes exactly after a kill -9;
* tensor_parallel 2 × expert_parallel 2 on 4 ranks gives those of 2 data-parallel ranks, likewise;
* ECSS with tensor_parallel 2 on 2 ranks gives those of ECSS on 1 rank, likewise;
* a sparse model inherited from a dense export starts, on each tensor rank, from its slices of the
  one-rank inheritance.
"""
from __future__ import annotations

import pytest
import torch

# Dropout off; the same global batch (4 rows a step: tp 2 is one data-parallel replica of 2 ranks).
FIELDS = dict(train_steps=6, checkpoint_every=2, validation_every=3, micro_batch_size=4, ecss=False,
              model_overrides={"dropout": 0.0}, optimizer={"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5})


@pytest.mark.slow
def test_sigma_tensor_parallel_2_gives_the_losses_and_export_of_one_rank_and_resumes_after_kill_9() -> None:
    from tests.test_train_tensor_parallel import tensor_parallel_2_against_one_rank

    one, two = tensor_parallel_2_against_one_rank("sigma-tiny", FIELDS)
    # The expert load is counted once per tensor group, as the rows are.
    assert (two.parent / "expert_load.csv").read_text() == (one.parent / "expert_load.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "moge"])
def test_learned_routers_under_tensor_parallel_2_give_the_losses_and_export_of_one_rank(router: str) -> None:
    """A learned router (top-k, MoGE) is a replicated parameter like a LayerNorm: its input is the hidden state
    after the attention's all-reduce, the same on every rank of a tensor group, so both ranks route every token
    alike and compute the same experts, held whole on each. Losses, gradient norms (router and experts counted
    once) and the export equal tensor_parallel 1 on one rank."""
    from pangu_model import load_checkpoint
    from tests.test_train_common import cli, logged_rows, run_config, run_torchrun

    fields = dict(train_steps=4, checkpoint_every=0, validation_every=0, micro_batch_size=2, ecss=False,
                  model_overrides={"dropout": 0.0, "router": router},
                  optimizer={"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5})
    one = run_config(f"{router}-tp1", "sigma-tiny", tensor_parallel=1, **fields)
    two = run_config(f"{router}-tp2", "sigma-tiny", tensor_parallel=2, **fields)
    reference = cli(one)  # beside the two ranks, which mostly start up
    done = run_torchrun(two, timeout=180)
    out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, out[-3000:]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    dense, split = logged_rows(one.parent), logged_rows(two.parent)
    assert [r["step"] for r in split] == [r["step"] for r in dense] == [1, 2, 3, 4]
    for x, y in zip(dense, split):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x["grad_norm"], y["grad_norm"])
    x, y = (load_checkpoint(p.parent / "export").state_dict() for p in (one, two))
    assert set(x) == set(y) and any(".router." in name or "gate" in name for name in x), sorted(x)[:20]
    # To fp32 noise, but for a weight or two whose gradient is itself noise (a unit no token of a step uses),
    # which Adam turns into steps of up to lr, in either direction (measured: 1.2e-4 on 1 of 16,384).
    for name, tensor in x.items():
        off = (y[name] - tensor).abs()
        assert float(off.max()) < 1e-3, (name, float(off.max()))
        assert int((off > 1e-5).sum()) <= 2, (name, int((off > 1e-5).sum()))


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


@pytest.mark.slow
def test_sigma_tensor_2_by_expert_2_gives_the_losses_and_export_of_data_parallel_2_and_resumes_after_kill_9() -> None:
    """tp 2 × ep 2 on 4 ranks (dp 2): the expert groups are formed among the ranks of one tensor rank ([0, 2],
    [1, 3]; the trainer checks DeepSpeed's expert and expert-data groups against pangu_model/topology.py at start),
    so both ranks of a tensor group hold the same 4 of the 8 experts. Same losses, gradient norms and export
    as tp 1 × ep 1 on 2 ranks (the same 2 data-parallel replicas and rows)."""
    from pangu_model import load_checkpoint
    from tests.test_train_common import (assert_close_but_for_noise_steps, kill_9_after_a_checkpoint, logged_rows,
                                         run_config, run_torchrun, torchrun)

    fields = {**FIELDS, "train_steps": 4, "validation_every": 0}
    reference = run_config("sigma-dp2", "sigma-tiny", **fields)
    split = run_config("sigma-tp2-ep2", "sigma-tiny", tensor_parallel=2, expert_parallel=2, throttle_s=0.3, **fields)
    background = torchrun(reference)  # beside the killed run, which mostly waits (start-up, throttle)
    tag, before_kill = kill_9_after_a_checkpoint(split, ranks=4, timeout=180)
    out, err = background.communicate(timeout=120)
    assert background.returncode == 0, (out + err)[-4000:]
    assert tag == "step00000002" and len(before_kill) in (3, 4), (tag, len(before_kill))
    # Each tensor rank checkpoints its copy of its expert shard (DeepSpeed's expert files carry the tensor rank);
    # the copies are equal, bit for bit.
    checkpoint = split.parent / "checkpoints" / tag
    for expert in range(8):
        files = [checkpoint / f"layer_0_expert_{expert}_mp_rank_{r:02d}_model_states.pt" for r in (0, 1)]
        copies = [torch.load(path, weights_only=True) for path in files]
        assert copies[0].keys() == copies[1].keys()
        assert all(torch.equal(copies[0][k], copies[1][k]) for k in copies[0]), expert
    done = run_torchrun(split, ranks=4, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    _assert_same_steps_and_exact_resume(logged_rows(reference.parent), logged_rows(split.parent), before_kill)
    assert (split.parent / "expert_load.csv").read_text() == (reference.parent / "expert_load.csv").read_text()
    # One rank per expert shard writes its rows (tensor rank 0 of each expert-data group), rank 0 the replicated
    # tensors, each tensor rank its rows of the split ones: the whole model, once.
    got, expected = (load_checkpoint(p.parent / "export").state_dict() for p in (split, reference))
    assert_close_but_for_noise_steps(got, expected, steps=4, lr=FIELDS["optimizer"]["lr"])


def _assert_same_steps_and_exact_resume(reference: list[dict], rows: list[dict], before_kill: list[dict]) -> None:
    """4 steps logged with the reference's losses, gradient norms and tokens; the steps logged before the kill -9
    after its checkpoint (step 2) are logged again, exactly, after the resume."""
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for x, y in zip(reference, rows):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x["grad_norm"], y["grad_norm"])
        assert y["tokens"] == x["tokens"]
    for x, y in zip(before_kill[2:], rows[2:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (x["step"], x["loss"], y["loss"])


@pytest.mark.slow
def test_sigma_tensor_parallel_2_with_ecss_gives_the_losses_and_export_of_ecss_on_one_rank_and_resumes() -> None:
    """ECSS with tp 2 on 2 ranks: each tensor rank keeps the experts and their Adam states in its host memory
    and steps them with the same gradients (the ranks of a tensor group compute the same experts on the same
    tokens); tensor rank 0 writes them (one ECSS file). Same losses, gradient norms and export as ECSS on one
    rank; a kill -9 and resume is exact."""
    from pangu_model import load_checkpoint
    from tests.test_train_common import (assert_close_but_for_noise_steps, cli, kill_9_after_a_checkpoint, logged_rows,
                                         run_config, run_torchrun)

    fields = {**FIELDS, "ecss": True, "train_steps": 4, "validation_every": 0}
    one = run_config("sigma-ecss-tp1", "sigma-tiny", **fields)
    two = run_config("sigma-ecss-tp2", "sigma-tiny", tensor_parallel=2, throttle_s=0.5, **fields)
    reference = cli(one)  # beside the killed run, which mostly waits (start-up, throttle)
    tag, before_kill = kill_9_after_a_checkpoint(two)
    out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, out[-3000:]
    assert tag == "step00000002" and len(before_kill) in (3, 4), (tag, len(before_kill))
    assert sorted(p.name for p in (two.parent / "checkpoints" / tag).glob("ecss_*")) == ["ecss_experts_ep000.pt"]
    done = run_torchrun(two, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    _assert_same_steps_and_exact_resume(logged_rows(one.parent), logged_rows(two.parent), before_kill)
    got, expected = (load_checkpoint(p.parent / "export").state_dict() for p in (two, one))
    assert_close_but_for_noise_steps(got, expected, steps=4, lr=FIELDS["optimizer"]["lr"])
