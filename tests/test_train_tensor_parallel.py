"""Tensor parallelism for PanGu-α (issue #15 §1): Megatron-style layers, the trainer on 2 gloo ranks.

* the parallel layers and the vocabulary-parallel cross-entropy on 2 ranks equal the dense ops, forward
  and gradients (the module is also the torchrun entry point of that check:
  `python -m torch.distributed.run --nproc_per_node 2 -m tests.test_train_tensor_parallel`);
* alpha-tiny with tensor_parallel 2 on 2 ranks gives the losses of tensor_parallel 1 on 1 rank (same
  global batch, dropout off), resumes exactly after a kill -9, and exports the same model.safetensors;
  every collective of such a run takes tensors on the compute device (as NCCL needs);
* layouts the trainer cannot run are refused at start, in one line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 1. The layers against the dense ops (2 gloo ranks)
# ---------------------------------------------------------------------------------------------
def _check_layers() -> None:
    """Every rank: each parallel layer equals its dense op (forward, input and weight gradients)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from pangu_model import get_config
    from pangu_model.materialize import build_model_on
    from pangu_model.tensor_parallel import (
        ColumnParallelLinear, RowParallelLinear, TensorParallel, VocabParallelEmbedding,
        copy_to_tensor_parallel_region, gather_from_tensor_parallel_region, gather_state_dict, row_blocks,
        shard_state_dict, split_dims, vocab_parallel_cross_entropy)

    tp = TensorParallel.of()
    torch.manual_seed(0)  # the same dense tensors on every rank

    def sharded(dense: nn.Module, parallel: nn.Module) -> nn.Module:
        parallel.load_state_dict(shard_state_dict(dense.state_dict(), split_dims(parallel), tp))
        return parallel

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")

    def slice_of(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        width = tensor.shape[dim] // tp.size
        return tensor.narrow(dim, tp.rank * width, width)

    # Column-parallel (output gathered) and row-parallel linears.
    x = torch.randn(3, 5, 8, requires_grad=True)
    x_tp = x.detach().clone().requires_grad_()
    dense = nn.Linear(8, 12)
    column = sharded(dense, ColumnParallelLinear(8, 12, tp))
    grad = torch.randn(3, 5, 12)
    out = gather_from_tensor_parallel_region(column(x_tp), tp)
    close(out, dense(x), "column forward")
    (dense(x) * grad).sum().backward()
    (out * grad).sum().backward()
    close(x_tp.grad, x.grad, "column input grad")
    close(column.weight.grad, slice_of(dense.weight.grad, 0), "column weight grad")
    close(column.bias.grad, slice_of(dense.bias.grad, 0), "column bias grad")

    z = torch.randn(3, 5, 12, requires_grad=True)
    z_tp = z.detach().clone().requires_grad_()
    dense = nn.Linear(12, 8)
    row = sharded(dense, RowParallelLinear(12, 8, tp))
    grad = torch.randn(3, 5, 8)
    out = row(slice_of(z_tp, -1))
    close(out, dense(z), "row forward")
    (dense(z) * grad).sum().backward()
    (out * grad).sum().backward()
    close(slice_of(z_tp.grad, -1), slice_of(z.grad, -1), "row input grad")
    close(row.weight.grad, slice_of(dense.weight.grad, 1), "row weight grad")
    close(row.bias.grad, dense.bias.grad, "row bias grad")

    # Vocabulary-parallel embedding: ids on every rank's rows.
    ids = torch.randint(0, 16, (4, 6))
    dense = nn.Embedding(16, 8)
    embedding = sharded(dense, VocabParallelEmbedding(16, 8, tp))
    grad = torch.randn(4, 6, 8)
    out = embedding(ids)
    close(out, dense(ids), "embedding forward")
    (dense(ids) * grad).sum().backward()
    (out * grad).sum().backward()
    close(embedding.weight.grad, slice_of(dense.weight.grad, 0), "embedding weight grad")

    # Vocabulary-parallel cross-entropy: -inf padding columns and ignored rows included.
    logits = torch.randn(10, 16)
    logits[:, 14:] = float("-inf")
    logits.requires_grad_()
    target = torch.randint(0, 14, (10,))
    target[[2, 7]] = -100
    local = slice_of(logits.detach(), 1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, tp)
    expected = F.cross_entropy(logits, target, ignore_index=-100)
    close(loss, expected, "cross-entropy")
    close(vocab_parallel_cross_entropy(local.detach(), target, tp, reduction="none"),
          F.cross_entropy(logits.detach(), target, ignore_index=-100, reduction="none"), "cross-entropy per row")
    expected.backward()
    loss.backward()
    close(local.grad, slice_of(logits.grad, 1), "cross-entropy grad")

    # A copy into the region sums the ranks' gradients.
    y = torch.randn(4, requires_grad=True)
    (copy_to_tensor_parallel_region(y, tp) * (tp.rank + 1)).sum().backward()
    close(y.grad, torch.full((4,), float(sum(range(1, tp.size + 1)))), "copy-to grad")

    # The whole model: a tiny PanGu-α split over the ranks (padded vocabulary rows masked) against the dense
    # one, from the weights the trainer's start-up gives every rank.
    config = get_config("tiny", dropout=0.0, vocab_size=64, tokenizer_pieces=60, max_seq_len=32)
    whole = build_model_on(config, "cpu", seed=7)
    split = build_model_on(config, "cpu", seed=7, tp=tp)
    dims = split_dims(split)
    assert set(dims) == {n for n in whole.state_dict() if n.endswith(("_proj.weight", "q_proj.bias",
                                                                       "k_proj.bias", "v_proj.bias", "fc_in.weight",
                                                                       "fc_in.bias", "fc_out.weight"))
                         or n == "word_embedding.weight"}, sorted(dims)
    for name, tensor in gather_state_dict(split.state_dict(), dims, tp).items():
        assert torch.equal(tensor, whole.state_dict()[name]), name  # the slices of the dense init, exactly
    ids = torch.randint(0, 60, (2, 24))
    ids[0, 10] = config.eot_token_id
    dense_out, split_out = whole(ids, labels=ids), split(ids, labels=ids)
    close(split_out.loss, dense_out.loss, "model loss")
    close(gather_from_tensor_parallel_region(split_out.logits.detach(), tp), dense_out.logits.detach(), "logits")
    dense_out.loss.backward()
    split_out.loss.backward()
    grads = gather_state_dict({n: p.grad for n, p in split.named_parameters()}, dims, tp)
    for name, param in whole.named_parameters():
        close(grads[name], param.grad, f"model grad {name}")
    # Row blocks of every split tensor (what each rank writes into the export) tile the dense tensors.
    for name, rows, first in row_blocks(split.state_dict(), dims, tp):
        assert torch.equal(rows, whole.state_dict()[name][first:first + len(rows)]), name

    # Dropout: the split heads draw from a stream of each rank's own, the rest of the model from the common
    # one, and activation checkpointing recomputes the same masks.
    torch.manual_seed(11)
    with tp.local_rng(torch.device("cpu")):
        mine = torch.rand(4)
    after = torch.rand(1)
    draws = [torch.empty(5) for _ in range(tp.size)]
    dist.all_gather(draws, torch.cat([mine, after]))
    assert not torch.equal(draws[0][:4], draws[1][:4]) and torch.equal(draws[0][4:], draws[1][4:])
    grads = []
    for checkpointing in (False, True):
        noisy = build_model_on(config.replace(dropout=0.3, gradient_checkpointing=checkpointing), "cpu", 7, tp=tp)
        torch.manual_seed(5)
        noisy(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in noisy.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), f"recomputed dropout {name}"
    dist.barrier()


def _torchrun_module(ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    from pangu_model.train import _free_port
    from tests.test_train_common import rank_env

    env = rank_env()
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
         str(_free_port()), "-m", "tests.test_train_tensor_parallel"],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)


def test_parallel_layers_equal_the_dense_ops_on_two_ranks() -> None:
    done = _torchrun_module()
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("tensor-parallel layers: ok") == 2, done.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# 2-3. The trainer: tp 2 on 2 ranks = tp 1 on 1 rank; kill -9 and resume; export
# ---------------------------------------------------------------------------------------------
# Dropout off; the same global batch (4 rows a step: tp 2 is one data-parallel replica of 2 ranks).
FIELDS = dict(train_steps=6, checkpoint_every=2, validation_every=3, micro_batch_size=4,
              model_overrides={"dropout": 0.0}, optimizer={"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5})


def tensor_parallel_2_against_one_rank(preset: str, fields: dict) -> tuple[Path, Path]:
    """`preset` trained with tensor_parallel 1 on one rank and with tensor_parallel 2 on two, the latter killed
    (-9) after a checkpoint and resumed: the same losses, gradient norms, tokens and validation losses, the steps
    run again after the resume exact, and an export that is the tensor ranks' checkpointed slices joined and holds
    the one-rank run's weights. The two runs' configs (tensor_parallel 1, 2)."""
    from pangu_model import PanguModel, load_checkpoint
    from pangu_model.checkpoint import load_config
    from pangu_model.metrics import read_validation
    from pangu_model.tensor_parallel import TensorParallel, split_dims
    from tests.test_train_common import (assert_export_joins_the_slices, cli, kill_9_after_a_checkpoint, logged_rows,
                                         run_config, run_torchrun)

    one = run_config(f"{preset}-tp1", preset, tensor_parallel=1, **fields)
    two = run_config(f"{preset}-tp2", preset, tensor_parallel=2, throttle_s=0.5, **fields)
    reference = cli(one)  # beside the killed run, which mostly waits (start-up, throttle)
    tag, before_kill = kill_9_after_a_checkpoint(two)
    out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, out[-3000:]
    assert tag in ("step00000002", "step00000004") and len(before_kill) < 6, (tag, len(before_kill))
    files = {p.name for p in (two.parent / "checkpoints" / tag).iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= files, files  # one per tensor rank
    done = run_torchrun(two, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    dense, split = logged_rows(one.parent), logged_rows(two.parent)
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(dense, split):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        # (PanGu-Σ's experts, replicated over the tensor group, count once in the norm clipped, as LayerNorms do)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], x["grad_norm"], y["grad_norm"])
        assert y["tokens"] == x["tokens"]  # a tensor group's rows are counted once
    checkpointed = int(tag.removeprefix("step"))
    for x in before_kill[checkpointed:]:  # steps run before the kill and again after the resume: exact
        y = split[int(x["step"]) - 1]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (x["step"], x["loss"], y["loss"])
    for (s1, l1, _), (s2, l2, _) in zip(read_validation(one.parent)["all"], read_validation(two.parent)["all"]):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)
    # Rank 0 and rank 1 each wrote their rows of the split tensors: the export is exactly the tensor ranks'
    # checkpointed slices joined (and the replicated tensors are equal on both ranks, bit for bit), and it
    # holds tensor_parallel 1's weights: the same names and shapes, the values to fp32 noise.
    got = load_checkpoint(two.parent / "export").state_dict()
    with torch.device("meta"):
        dims = split_dims(PanguModel(load_config(two.parent / "export"), tp=TensorParallel(None, 0, 2)))
    assert not any(".experts." in name for name in dims) and "word_embedding.weight" in dims
    last = two.parent / "checkpoints" / "step00000006"
    parts = [torch.load(last / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)["module"] for r in (0, 1)]
    assert_export_joins_the_slices(got, parts, dims, load_checkpoint(one.parent / "export").state_dict())
    return one, two


@pytest.mark.slow
def test_tensor_parallel_2_gives_the_losses_and_export_of_tensor_parallel_1_and_resumes_after_kill_9() -> None:
    tensor_parallel_2_against_one_rank("alpha-tiny", FIELDS)


@pytest.mark.slow
def test_tensor_parallel_collectives_run_on_the_compute_device() -> None:
    """tp 2 under tests.collective_guard (NCCL's rule on gloo: no collective on a host tensor): training
    with dropout on (each rank's own stream for its heads), validation, a checkpoint and the export."""
    from tests.test_train_common import logged_rows, run_config, run_torchrun

    config = run_config("tp2-guard", "alpha-tiny", tensor_parallel=2, train_steps=3, checkpoint_every=2,
                        validation_every=2, export=True)
    done = run_torchrun(config, module="tests.collective_guard", timeout=120)
    output = done.stdout + done.stderr
    assert "on a host tensor" not in output, output[-3000:]
    assert done.returncode == 0, output[-4000:]
    assert [int(r["step"]) for r in logged_rows(config.parent)] == [1, 2, 3]
    assert (config.parent / "export" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 4. Layouts the trainer cannot run: refused at start, in one line
# ---------------------------------------------------------------------------------------------
def test_layouts_the_trainer_cannot_run_are_refused_in_one_line() -> None:
    from pangu_model.train import fit_to_data, load_train_config
    from tests.test_train_common import cli, run_config, torchrun

    # Checked with the config: tensor parallelism splits the dense part of every model evenly (experts, whatever
    # routes to them, replicated over the tensor group: tests/test_train_tensor_parallel_sigma.py).
    with pytest.raises(ValueError, match="tensor_parallel 2 with expert_parallel 2 and ZeRO stage 0: DeepSpeed's "
                                         "gradient clipping without ZeRO is not implemented for experts replicated"):
        load_train_config(run_config("tp-ep-zero0", "sigma-tiny", ecss=False, expert_parallel=2, tensor_parallel=2,
                                     zero_stage=0))
    for name, extra in {"tp-sigma": {"ecss": False}, "tp-ep": {"ecss": False, "expert_parallel": 2},
                        "tp-ecss": {"ecss": True}, "tp-ep-ecss-zero0": {"ecss": True, "expert_parallel": 2,
                                                                        "zero_stage": 0},
                        "tp-moge": {"ecss": False, "model_overrides": {"router": "moge"}}}.items():  # not refused
        load_train_config(run_config(name, "sigma-tiny", tensor_parallel=2, **extra))
    with pytest.raises(ValueError, match="tensor_parallel 8 does not divide num_heads 4"):
        load_train_config(run_config("tp-heads", "alpha-tiny", tensor_parallel=8))

    # Checked at start, before the model is built: tp 2 on one rank; an expert group that would leave the node
    # (ep 2 at stride tp 2 needs 4 ranks a node; torchrun gives 2); a topology whose layout is not the config's
    # (pangu-alpha-200b: tp 8, pp 16). Before a checkpoint is loaded: one of tensor_parallel 2 resumed with
    # tensor_parallel 1.
    world = run_config("tp-world", "alpha-tiny", tensor_parallel=2, train_steps=1)
    stride = run_config("tp-ep-node", "sigma-tiny", ecss=False, tensor_parallel=2, expert_parallel=2, train_steps=1)
    pipeline = run_config("tp-pipeline", "alpha-tiny", topology="pangu-alpha-200b", train_steps=1)
    relayout = run_config("tp-relayout", "alpha-tiny", train_steps=4, export=False)
    tag = relayout.parent / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    fingerprint = fit_to_data(load_train_config(relayout)).fingerprint()
    torch.save({"step": 2, "dataset": {}, "fingerprint": fingerprint, "world_size": 2, "tensor_parallel": 2},
               tag / "trainer_rank00000.pt")
    (relayout.parent / "checkpoints" / "latest").write_text(tag.name)
    runs = {config: cli(config) for config in (world, pipeline, relayout)}  # side by side: each starts Python
    runs[stride] = torchrun(stride, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    expected = {world: "tensor_parallel 2 does not divide the world size 1",
                stride: "expert group of 2 ranks at stride tensor_parallel 2 would leave a node of 2 ranks",
                pipeline: "topology pangu-alpha-200b has pipeline 16, config says pipeline_parallel 1",
                relayout: "was written with tensor_parallel 2 (2 ranks), this run has tensor_parallel 1"}
    for config, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 if config == stride else proc.returncode == 2, out[-3000:]  # torchrun exits 1
        lines = [line for line in out.splitlines() if line.startswith("pangu_model.train:")]
        assert lines and set(lines) == {lines[0]} and expected[config] in lines[0], out[-3000:]  # a line a rank
        assert 'pangu_model/train.py", line' not in out and (config == stride or "Traceback" not in out)  # torchrun's
    assert not (world.parent / "metrics.csv").exists()


def main() -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        _check_layers()
        print(f"rank {dist.get_rank()}: tensor-parallel layers: ok", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
