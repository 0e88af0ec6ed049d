"""Pipeline parallelism for PanGu-α and PanGu-Σ (issue #15 §2-3): DeepSpeed's 1F1B pipeline, the trainer on 2, 3,
4 and 8 gloo ranks.

* alpha-tiny with 5 layers and pipeline_parallel 3 on 3 ranks (an uneven split: 2, 2 and 1 layers) gives the
  losses of pipeline_parallel 1 on 1 rank (same global batch, 2 micro-batches a step, dropout off), resumes
  exactly after a kill -9, and exports the same model.safetensors; pipeline_parallel 2 (3 + 2 layers) resumes
  exactly with dropout on;
* tensor_parallel 2 × pipeline_parallel 2 × data parallel 2 on 8 ranks does the same (two replicas of stages of
  tensor-parallel layers), and in bf16 on 4 ranks follows the fp32 run to bf16 noise;
* PanGu-Σ (sigma-tiny, RRE experts on both stages) with tensor_parallel 2 × pipeline_parallel 2 does the same,
  expert load included;
* layouts the trainer cannot run with a pipeline are refused at start, in one line.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

# Dropout off; the same global batch (4 rows a step, in 2 micro-batches: the pipeline interleaves them);
# 5 layers, so the 2 stages hold 3 and 2.
FIELDS = dict(train_steps=6, checkpoint_every=2, validation_every=3, micro_batch_size=2, gradient_accumulation_steps=2,
              model_overrides={"dropout": 0.0, "num_layers": 5},
              optimizer={"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5})


def _killed_and_resumed(config: Path, ranks: int = 2) -> tuple[int, list[dict[str, float]], list[dict[str, float]]]:
    """Kill -9 the ranks after a checkpoint, resume to the end; the checkpointed step, the rows logged
    before the kill and the rows of the whole run."""
    from tests.test_train_common import kill_9_after_a_checkpoint, logged_rows, run_torchrun

    tag, before_kill = kill_9_after_a_checkpoint(config, ranks=ranks)
    assert tag in ("step00000002", "step00000004") and len(before_kill) < 6, (tag, len(before_kill))
    done = run_torchrun(config, ranks=ranks, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = logged_rows(config.parent)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    checkpointed = int(tag.removeprefix("step"))
    for x in before_kill[checkpointed:]:  # steps run before the kill and again after the resume: exact
        y = rows[int(x["step"]) - 1]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (x["step"], x["loss"], y["loss"])
    return checkpointed, before_kill, rows


class _Reference:
    """A run started in the background; `finished()` waits for it once and gives its config."""

    def __init__(self, config: Path, proc: subprocess.Popen) -> None:
        self.config, self.proc, self.out = config, proc, None

    def finished(self) -> Path:
        if self.out is None:
            self.out, _ = self.proc.communicate(timeout=180)
        assert self.proc.returncode == 0, self.out[-3000:]
        return self.config


@pytest.fixture(scope="module")
def pipeline_1() -> _Reference:
    """The reference run: pipeline_parallel 1 on 1 rank (shared by the pipeline runs, which compare with it),
    started beside the first of them (whose ranks mostly wait: start-up, throttle)."""
    from tests.test_train_common import cli, run_config

    one = run_config("pp1", "alpha-tiny", pipeline_parallel=1, **FIELDS)
    reference = _Reference(one, cli(one))
    yield reference
    if reference.proc.poll() is None:
        reference.proc.kill()


def _same_run(one: Path, other: Path) -> None:
    """`other` logged the losses, gradient norms, tokens and validation losses of `one` (to fp32 noise)."""
    from pangu_model.metrics import read_validation
    from tests.test_train_common import logged_rows

    single, parallel = logged_rows(one.parent), logged_rows(other.parent)
    assert len(single) == len(parallel) == 6
    for x, y in zip(single, parallel):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x["step"], "grad_norm")
        assert y["tokens"] == x["tokens"]  # a pipeline's rows are counted once (by its last stage)
    validations = read_validation(one.parent)["all"], read_validation(other.parent)["all"]
    assert len(validations[0]) == len(validations[1]) == 2
    for (s1, l1, _), (s2, l2, _) in zip(*validations):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)


@pytest.mark.slow
def test_pipeline_parallel_3_gives_the_losses_and_export_of_pipeline_parallel_1_and_resumes_after_kill_9(
        pipeline_1: _Reference) -> None:
    """Three stages (2 + 2 + 1 layers; pipeline 2 runs in the tensor × pipeline tests): the middle stage holds
    only blocks, and the tied embedding joins the first stage and the third."""
    from pangu_model import load_checkpoint
    from pangu_model.pipeline_parallel import pangu_name
    from tests.test_train_common import assert_close_but_for_noise_steps, run_config

    two = run_config("pp3", "alpha-tiny", pipeline_parallel=3, throttle_s=0.5, **FIELDS)
    _killed_and_resumed(two, ranks=3)
    one = pipeline_1.finished()
    _same_run(one, two)

    # Each stage wrote its own layers (DeepSpeed's layer files; the head's copy of the tied embedding is the
    # first stage's, layer 00) and its own optimizer partition; the layout is recorded.
    last = two.parent / "checkpoints" / "step00000006"
    files = {p.name for p in last.iterdir()}
    layers = [f"layer_{i:02d}-model_00-model_states.pt" for i in range(7)]  # embeddings, 4 blocks, query layer
    assert set(layers) <= files and "layer_07-model_00-model_states.pt" not in files, sorted(files)
    assert {f"zero_pp_rank_0_mp_rank_{s:02d}_optim_states.pt" for s in range(3)} <= files
    assert torch.load(last / "trainer_rank00002.pt", weights_only=True)["pipeline_parallel"] == 3
    # The export is exactly the stages' checkpointed layers in PanguModel's names...
    got = load_checkpoint(two.parent / "export").state_dict()
    saved = {}
    for index, name in enumerate(layers):
        prefix = "tied_modules.word_embedding" if index == 0 else str(index)
        for key, tensor in torch.load(last / name, weights_only=True).items():
            saved[pangu_name(f"{prefix}.{key}", num_layers=5)] = tensor
    assert set(saved) == set(got)
    for name, tensor in got.items():
        assert torch.equal(saved[name], tensor), name
    # ... and holds pipeline_parallel 1's weights, to fp32 noise.
    assert_close_but_for_noise_steps(got, load_checkpoint(one.parent / "export").state_dict(), steps=6, lr=3e-3)


@pytest.mark.slow
def test_tensor_2_by_pipeline_2_by_data_2_gives_the_losses_and_export_of_one_rank(pipeline_1: _Reference) -> None:
    """8 ranks in pangu-alpha-200b's shape (tensor inside, pipeline, data outside): 2 replicas of 2 stages (3 + 2
    layers) of tensor-parallel layers over 2 ranks each. A replica takes 1 row a micro-batch, 2 micro-batches a
    step, so the global batch is pipeline 1's 4 rows. Rank r of a stage splits every layer as tensor parallelism
    does; the tied embedding's vocabulary rows are summed between the same tensor rank of the first and last
    stage; gradients are averaged over the replicas and ZeRO-1 splits the optimizer between them; the gradient
    norm (clipped at 0.5, so every step clips) counts each element once. A kill -9 and resume under tensor ×
    pipeline parallelism is the PanGu-Σ test's below (the same checkpoint code for every layer)."""
    from pangu_model import PanguModel, load_checkpoint
    from pangu_model.checkpoint import load_config
    from pangu_model.pipeline_parallel import pangu_name
    from pangu_model.tensor_parallel import TensorParallel, split_dims
    from tests.test_train_common import assert_export_joins_the_slices, run_config, run_torchrun

    eight = run_config("tp2-pp2-dp2", "alpha-tiny", tensor_parallel=2, pipeline_parallel=2,
                       **{**FIELDS, "micro_batch_size": 1})
    done = run_torchrun(eight, ranks=8, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    one = pipeline_1.finished()
    _same_run(one, eight)

    # Each (stage, tensor rank) wrote its layers' slices (model_00 / model_01) once (data rank 0), and each
    # rank its ZeRO-1 partition of the optimizer (zero_pp_rank_<data rank>_mp_rank_<stage × tensor rank>).
    last = eight.parent / "checkpoints" / "step00000006"
    files = {p.name for p in last.iterdir()}
    layers = range(7)  # the tied embedding, the position embedding, 4 blocks, the query layer
    layer_files = {f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in layers for r in (0, 1)}
    assert {f for f in files if f.startswith("layer_")} == layer_files, sorted(files)
    optim_files = {f"zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt" for d in (0, 1) for r in range(4)}
    assert {f for f in files if f.endswith("_optim_states.pt")} == optim_files, sorted(files)
    state = torch.load(last / "trainer_rank00007.pt", weights_only=True)
    assert (state["tensor_parallel"], state["pipeline_parallel"], state["world_size"]) == (2, 2, 8)
    # The export is exactly the checkpointed slices joined (replicated tensors equal on both tensor ranks)...
    got = load_checkpoint(eight.parent / "export").state_dict()
    with torch.device("meta"):
        dims = split_dims(PanguModel(load_config(eight.parent / "export"), tp=TensorParallel(None, 0, 2)))
    parts: list[dict[str, torch.Tensor]] = [{}, {}]
    for index in layers:
        prefix = "tied_modules.word_embedding" if index == 0 else str(index)
        for r in (0, 1):
            layer_file = last / f"layer_{index:02d}-model_{r:02d}-model_states.pt"
            for key, tensor in torch.load(layer_file, weights_only=True).items():
                parts[r][pangu_name(f"{prefix}.{key}", num_layers=5)] = tensor
    # ... and holds the single rank's weights, to fp32 noise.
    assert_export_joins_the_slices(got, parts, dims, load_checkpoint(one.parent / "export").state_dict())


@pytest.mark.slow
def test_bf16_tensor_2_by_pipeline_2_follows_the_fp32_run_of_one_rank(pipeline_1: _Reference) -> None:
    """The precision a GPU cluster trains in, under tensor × pipeline parallelism: bf16 compute and
    activations between the stages, fp32 masters in DeepSpeed's bf16 optimizer over the pipeline engine. The
    losses follow the fp32 run on one rank to bf16 noise, and the export holds fp32 weights near its export."""
    from pangu_model import load_checkpoint
    from tests.test_train_common import logged_rows, run_config, run_torchrun

    four = run_config("tp2-pp2-bf16", "alpha-tiny", tensor_parallel=2, pipeline_parallel=2, precision="bf16",
                      **FIELDS)
    done = run_torchrun(four, ranks=4, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    one = pipeline_1.finished()
    fp32, bf16 = logged_rows(one.parent), logged_rows(four.parent)
    assert [r["step"] for r in bf16] == [r["step"] for r in fp32] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(fp32, bf16):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3), (x["step"], x["loss"], y["loss"])
        assert y["loss"] != x["loss"]  # bf16 did run: its rounding shows in every loss
    # Adam moves a weight by about lr a step whatever the gradient's size, so where bf16 rounding flips a
    # small gradient's sign the weights part by up to 2 lr a step: 6 steps at 3e-3 (measured: 0.013).
    exported, reference = (load_checkpoint(p.parent / "export").state_dict() for p in (four, one))
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert exported[name].dtype == torch.float32, name
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=2 * 6 * 3e-3, msg=name)


@pytest.mark.slow
def test_sigma_tensor_2_by_pipeline_2_gives_the_losses_expert_load_and_export_of_one_rank_and_resumes_after_kill_9(
        ) -> None:
    """PanGu-Σ (RRE in the top 3 of 5 layers: one on stage 0, two on stage 1) on 2 stages of 2 tensor ranks: the
    token and domain ids travel with the hidden state to the experts of both stages, which every rank of a tensor
    group holds whole; losses, gradient norms, validation, the expert load of every RRE layer (logged by the last
    stage) and the export equal one rank's. Rows of every domain in every step (`domain_affine` off): an expert
    first routed to late takes an Adam step whose size does not depend on its gradient's, so elements with
    near-zero gradients would turn fp32 noise into differences of the learning rate's size."""
    from pangu_model import load_checkpoint
    from tests.test_train_common import cli, logged_rows, run_config

    fields = {**FIELDS, "ecss": False, "domain_affine": False,
              "model_overrides": {**FIELDS["model_overrides"], "moe_layers": 3}}
    one = run_config("sigma-pp1", "sigma-tiny", **fields)
    reference = _Reference(one, cli(one))
    four = run_config("sigma-tp2-pp2", "sigma-tiny", tensor_parallel=2, pipeline_parallel=2, throttle_s=0.5, **fields)
    _killed_and_resumed(four, ranks=4)
    reference.finished()
    _same_run(one, four)
    loads = [(one.parent / "expert_load.csv").read_text(), (four.parent / "expert_load.csv").read_text()]
    assert loads[0] == loads[1]
    routed: dict[str, int] = {}
    for line in loads[0].splitlines()[1:]:
        _, layer, _, tokens = line.split(",")
        routed[layer] = routed.get(layer, 0) + int(tokens)
    # every token of every step went to one expert of each RRE layer (labels count the rows' tokens)
    tokens = sum(int(r["tokens"]) for r in logged_rows(four.parent))
    assert routed == {"blocks.2.ffn": tokens, "blocks.3.ffn": tokens, "query_layer.ffn": tokens} and tokens > 0
    got = load_checkpoint(four.parent / "export").state_dict()
    expected = load_checkpoint(one.parent / "export").state_dict()
    assert set(got) == set(expected) and any(".experts." in name for name in got)
    # fp32 noise through six Adam steps: measured up to 4.1e-5 on single elements (1 in 16k), 2e-6 typical
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_pipeline_resume_after_kill_9_draws_the_same_dropout_masks() -> None:
    """Dropout on: each stage seeds itself per step and micro-batch, so a run killed and resumed gives the
    losses of an uninterrupted one, exactly (a run that carried its random state across steps would not)."""
    from tests.test_train_common import logged_rows, run_config, torchrun

    fields = {**FIELDS, "model_overrides": {"dropout": 0.1, "num_layers": 5}}
    whole = run_config("pp2-dropout", "alpha-tiny", pipeline_parallel=2, **fields)
    uninterrupted = torchrun(whole)  # beside the killed run
    _, _, resumed = _killed_and_resumed(run_config("pp2-dropout-killed", "alpha-tiny", pipeline_parallel=2,
                                                   throttle_s=0.5, **fields))
    out, err = uninterrupted.communicate(timeout=180)
    assert uninterrupted.returncode == 0, (out + err)[-4000:]
    for x, y in zip(logged_rows(whole.parent), resumed):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (x["step"], x["loss"], y["loss"])


def test_pipeline_layouts_the_trainer_cannot_run_are_refused_in_one_line() -> None:
    from pangu_model.train import fit_to_data, load_train_config
    from tests.test_train_common import cli, run_config

    # Checked with the config: dense models and RRE experts held whole by each stage (no ECSS, no expert
    # parallelism, no other router), ZeRO 0-1 and not 0 where DeepSpeed's fp32
    # clipping miscounts the norm, a layer at least per stage.
    whole = r": pipeline parallelism is implemented for dense PanGu-α and for PanGu-Σ with RRE experts held whole"
    refused = [
        ("pp-sigma-ecss", "sigma-tiny", {}, r"pipeline_parallel 2 with ECSS" + whole),
        ("pp-sigma-ep", "sigma-tiny", {"ecss": False, "expert_parallel": 2},
         r"pipeline_parallel 2 with expert_parallel" + whole),
        ("pp-topk", "sigma-tiny", {"ecss": False, "model_overrides": {"router": "topk"}},
         r"pipeline_parallel 2 with router topk" + whole),
        ("pp-zero2", "alpha-tiny", {"zero_stage": 2},
         r"pipeline_parallel 2 with ZeRO stage 2: DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only"),
        ("pp-zero0", "alpha-tiny", {"zero_stage": 0},
         r"pipeline_parallel 2 with ZeRO stage 0 in fp32 and grad_clip 1.0: DeepSpeed's fp32 gradient clipping"),
        # sigma-tiny's 4 layers on 2 stages of 2: the experts (the top 2) all on stage 1; it hung in the first step
        ("pp-sigma-dense-stage", "sigma-tiny", {"ecss": False},
         r"pipeline_parallel 2 with experts in the top 2 of 4 layers: stage 0 \(layers 0-1\) would hold no expert "
         r"layer"),
    ]
    for name, preset, extra, message in refused:
        with pytest.raises(ValueError, match=message):
            load_train_config(run_config(name, preset, pipeline_parallel=2, **extra))
    with pytest.raises(ValueError, match=r"pipeline_parallel 5 is more stages than the model's 4 layers"):
        load_train_config(run_config("pp-stages", "alpha-tiny", pipeline_parallel=5))
    # Not refused: tensor × pipeline, and ZeRO 0 where DeepSpeed's clipping counts right (bf16) or does not run.
    for name, extra in {"pp-tp": {"tensor_parallel": 2}, "pp-zero0-bf16": {"zero_stage": 0, "precision": "bf16"},
                        "pp-zero0-noclip": {"zero_stage": 0, "optimizer": {"grad_clip": 0.0}}}.items():
        load_train_config(run_config(name, "alpha-tiny", pipeline_parallel=2, **extra))
    sigma = {"ecss": False, "model_overrides": {"vocab_size": 2000, "max_seq_len": 64, "moe_layers": 3}}
    load_train_config(run_config("pp-sigma", "sigma-tiny", pipeline_parallel=2, **sigma))
    load_train_config(run_config("pp-tp-sigma", "sigma-tiny", pipeline_parallel=2, tensor_parallel=2, **sigma))

    # Checked at start, before the model is built: pipeline 2 on one rank. Before a checkpoint is loaded: one
    # of pipeline_parallel 2 resumed with pipeline_parallel 1, and one of tensor 2 × pipeline 2 (both named).
    world = run_config("pp-world", "alpha-tiny", pipeline_parallel=2, train_steps=1)
    relayouts = {}
    for name, (tp, pp, ranks) in {"pp-relayout": (1, 2, 2), "tp-pp-relayout": (2, 2, 4)}.items():
        relayouts[name] = relayout = run_config(name, "alpha-tiny", train_steps=4, export=False)
        tag = relayout.parent / "checkpoints" / "step00000002"
        tag.mkdir(parents=True)
        fingerprint = fit_to_data(load_train_config(relayout)).fingerprint()
        torch.save({"step": 2, "dataset": {}, "fingerprint": fingerprint, "world_size": ranks, "tensor_parallel": tp,
                    "pipeline_parallel": pp}, tag / "trainer_rank00000.pt")
        (relayout.parent / "checkpoints" / "latest").write_text(tag.name)
    runs = {config: cli(config) for config in (world, *relayouts.values())}  # side by side: each starts Python
    expected = {world: "pipeline_parallel 2 does not divide the world size 1",
                relayouts["pp-relayout"]: "was written with pipeline_parallel 2 (2 ranks), this run has "
                                          "pipeline_parallel 1: each stage's checkpoint holds its own layers;",
                relayouts["tp-pp-relayout"]: "was written with tensor_parallel 2 × pipeline_parallel 2 (4 ranks), this "
                                             "run has tensor_parallel 1 × pipeline_parallel 1: each tensor rank's "
                                             "checkpoint holds its own slices; each stage's checkpoint holds its "
                                             "own layers;"}
    for config, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out[-3000:]
        lines = [line for line in out.splitlines() if line.startswith("pangu_model.train:")]
        assert len(lines) == 1 and expected[config] in lines[0], out[-3000:]
        assert "Traceback" not in out
    assert not (world.parent / "metrics.csv").exists()


def test_init_from_reads_only_the_rank_s_stage_and_tensor_slices(tmp_path: Path, monkeypatch) -> None:
    """init_from on a rank of a tensor × pipeline layout: it reads the tensors of its stage's modules only,
    and of the split ones its slices only (safetensors slices: no rank holds the whole export), and they equal
    its part of the whole model; the other stages' modules stay on the meta device."""
    import safetensors

    from pangu_model import save_checkpoint
    from pangu_model.pipeline_parallel import stage_module_names
    from pangu_model.tensor_parallel import TensorParallel, shard_state_dict, split_dims
    from pangu_model.train import build_model, load_train_config
    from tests.test_train_common import run_config

    config = run_config("init-from-stage", "alpha-tiny", model_overrides={"num_layers": 5})
    whole = build_model(load_train_config(config)).state_dict()
    save_checkpoint(build_model(load_train_config(config)), tmp_path / "source")

    read: dict[str, tuple[int, ...]] = {}  # name → shape of what was read
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            read[name] = tuple(tensor.shape)
            return tensor

        def get_slice(self, name):
            handle = self.handle

            class Slice:
                def __getitem__(self, index):
                    tensor = handle.get_slice(name)[index]
                    read[name] = tuple(tensor.shape)
                    return tensor
            return Slice()

    class SpyOpen:
        def __init__(self, *args, **kwargs):
            self.context = real_open(*args, **kwargs)

        def __enter__(self):
            return Spy(self.context.__enter__())

        def __exit__(self, *exc):
            return self.context.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    train = load_train_config(config, {"init_from": str(tmp_path / "source")})
    keep = stage_module_names(train.pangu_config(), 1, [3, 2])  # the last of 2 stages: blocks 3, query layer, head
    model = build_model(train, tp=TensorParallel(None, 1, 2), keep_modules=keep)

    state = model.state_dict()
    kept = {name for name in state if keep(name.rpartition(".")[0])}
    assert set(read) == kept and any(name.startswith("blocks.3.") for name in kept)
    assert not any(name.startswith(("blocks.0.", "position_embedding")) for name in kept)
    # The split parameters keep the marks DeepSpeed reads (those of a model built with the same layout).
    split = split_dims(model)
    fresh = build_model(load_train_config(config), tp=TensorParallel(None, 1, 2), keep_modules=keep)
    assert split == split_dims(fresh) and any(name in split for name in kept)
    expected = shard_state_dict(whole, split, TensorParallel(None, 1, 2))
    for name in kept:
        assert read[name] == tuple(state[name].shape)  # the slice, not the whole tensor
        assert torch.equal(state[name], expected[name]), name
        if name in split:
            assert state[name].shape[split[name]] * 2 == whole[name].shape[split[name]]
    assert all(state[name].is_meta for name in set(state) - kept)
