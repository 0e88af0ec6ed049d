"""`pangu model import`: released PanGu-α PyTorch checkpoints (Megatron 1.1 layout) → export.

Tiny checkpoints are written in the release's layout from the release's own model: the PyTorch port of
the `pcl_pangu` wheel (downloaded through the registry at test time, imported from a temporary folder,
never copied), run on CPU in fp32 with apex absent and its fused kernels off. Its partitions are split
by the partition attributes its `mpu` layers set. The imported export's logits must equal the
reference model's on the same (fp16) weights.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sample_data.sources.packages import download
from pangu_model import load_checkpoint
from pangu_model.released import ReleasedCheckpointError, import_released, read_released
from tokenizer.released import RELEASED_PACKAGE

PORT = "pcl_pangu/model/panguAlpha_pytorch/"
TINY = dict(num_layers=3, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)  # preset "tiny"


def wheel_of(package) -> Path:
    """`package`'s archive from the registry (cached); a test that cannot get it fails, never skips: the
    registry is reachable wherever the tests run."""
    try:
        return download(package)
    except Exception as exc:
        pytest.fail(f"could not download {package.spec} from PyPI: {exc}")


@pytest.fixture(scope="module")
def megatron(tmp_path_factory: pytest.TempPathFactory):
    """The wheel's `megatron` package, importable, with CPU stubs; unloaded afterwards."""
    wheel = wheel_of(RELEASED_PACKAGE)
    root = tmp_path_factory.mktemp("pcl_port")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(PORT + "megatron/"):
                target = root / name[len(PORT):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    jit_state = (torch._C._jit_set_profiling_mode(True), torch._C._jit_set_profiling_executor(True),
                 torch._C._jit_can_fuse_on_cpu(), torch._C._jit_can_fuse_on_gpu())
    had_six = "torch._six" in sys.modules
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))  # removed from torch 2
    sys.path.insert(0, str(root))
    try:
        import megatron as mg
        import megatron.global_vars
        import megatron.model
        from megatron import mpu

        yield types.SimpleNamespace(megatron=mg, mpu=mpu, global_vars=megatron.global_vars,
                                    GPT2Model=megatron.model.GPT2Model)
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "megatron" or n.startswith("megatron.")]:
            del sys.modules[name]
        if not had_six:
            sys.modules.pop("torch._six", None)
        torch._C._jit_set_profiling_mode(jit_state[0])
        torch._C._jit_set_profiling_executor(jit_state[1])
        torch._C._jit_override_can_fuse_on_cpu(jit_state[2])
        torch._C._jit_override_can_fuse_on_gpu(jit_state[3])


def _padded(vocab: int, partitions: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * partitions
    return -(-vocab // multiple) * multiple  # megatron/tokenizer/tokenizer.py _vocab_size_with_padding


def _reference(megatron, partitions: int = 1, **shape):
    """The release's GPT2Model (PanGu-α) at mp size 1, eval mode, fp32, and its padded vocabulary."""
    shape = {**TINY, **shape}
    padded = _padded(40000, partitions)
    megatron.global_vars._GLOBAL_ARGS = argparse.Namespace(
        **shape, padded_vocab_size=padded, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        layernorm_epsilon=1e-5, apply_residual_connection_post_layernorm=False, fp16=False,
        apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
        scaled_upper_triang_masked_softmax_fusion=False, bias_gelu_fusion=False, openai_gelu=False,
        onnx_safe=False, bias_dropout_fusion=False, fp16_lm_cross_entropy=False, checkpoint_activations=False,
        checkpoint_num_layers=1, num_unique_layers=None, param_sharing_style="grouped", model_parallel_size=1,
        use_cpu_initialization=True, params_dtype=torch.float32, distribute_checkpointed_activations=False,
    )
    megatron.mpu.initialize.set_model_parallel_world_size(1)
    megatron.mpu.initialize.set_model_parallel_rank(0)
    model = megatron.GPT2Model(num_tokentypes=0, parallel_output=False).eval()
    generator = torch.Generator().manual_seed(partitions * 100 + shape["num_layers"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") else 0.0
            param.copy_((base + 0.08 * torch.randn(param.shape, generator=generator)).half().float())
    return model


def _write_release(megatron, model, directory: Path, partitions: int, release: bool = False,
                   extra: dict | None = None) -> Path:
    """`model`'s weights as a Megatron 1.1 checkpoint of `partitions` model-parallel ranks, fp16."""
    params = dict(model.named_parameters())
    nested = model.state_dict_for_save_checkpoint()

    def split(tree: dict, prefix: str, rank: int) -> dict:
        out = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = split(value, name + ".", rank)
                continue
            param = params[name]
            tensor = value.detach().half()
            if getattr(param, "model_parallel", False):  # the release's own annotation of the split
                tensor = torch.chunk(tensor, partitions, dim=param.partition_dim)[rank]
            out[key] = tensor.clone()
        return out

    iteration = 3000
    sub = "release" if release else f"iter_{iteration:07d}"
    for rank in range(partitions):
        path = directory / sub / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": split(nested, "", rank), "iteration": iteration, **(extra or {})}, path)
    (directory / "latest_checkpointed_iteration.txt").write_text("release" if release else str(iteration))
    return directory


def _release_function(megatron, module: str, name: str):
    """One function of the port, compiled alone from its source (its module's imports need apex and
    NumPy 1): used for functions that need nothing but torch."""
    import ast

    path = Path(megatron.megatron.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _reference_logits(megatron, model, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
                      eod: int | None = None) -> torch.Tensor:
    """The port's logits; with `eod`, positions and attention reset after it, by the port's own
    `get_ltor_masks_and_position_ids` (its training-time `--reset-position-ids --reset-attention-mask`)."""
    class _NoCudaRng:
        @contextlib.contextmanager
        def fork(self, *args, **kwargs):
            yield

    monkeypatch.setattr(megatron.mpu, "get_cuda_rng_tracker", lambda: _NoCudaRng())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # the port allocates scores there
    length = ids.shape[1]
    positions = torch.arange(length)[None].expand_as(ids)
    ltor_mask = torch.tril(torch.ones(length, length)).view(1, 1, length, length) < 0.5  # utils.py: True = masked
    if eod is not None:
        masks = _release_function(megatron, "utils", "get_ltor_masks_and_position_ids")
        ltor_mask, _, positions = masks(ids, eod, True, True, False)
    with torch.no_grad():
        return model(ids, positions, ltor_mask)[..., :40000]


@pytest.mark.parametrize("partitions,release", [(1, False), (2, False), (2, True)])
def test_import_matches_reference_logits(megatron, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         partitions: int, release: bool) -> None:
    reference = _reference(megatron, partitions)
    source = _write_release(megatron, reference, tmp_path / "ckpt", partitions, release=release)
    summary = import_released(source, tmp_path / "export")
    assert summary.partitions == partitions and summary.preset == "tiny"
    assert summary.padded_vocab == _padded(40000, partitions) and summary.config.vocab_size == 40000
    assert summary.iteration == ("release" if release else "3000")
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model.safetensors", "config.json", "tokenizer"}

    ours = load_checkpoint(tmp_path / "export")
    assert ours.config.num_layers == 4 and ours.config.num_heads == 4
    ids = torch.randint(10, 40000, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _reference_logits(megatron, reference, ids, monkeypatch)
    with torch.no_grad():
        got = ours(ids, position_ids=torch.arange(24)[None].expand_as(ids)).logits
    assert got.shape == expected.shape == (2, 24, 40000)
    assert expected.std() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_export_is_self_contained_with_released_tokenizer(megatron, tmp_path: Path) -> None:
    from tokenizer.pangu import PanguTokenizer

    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1)
    import_released(source, tmp_path / "export", dtype="bf16")
    tok = PanguTokenizer.load(tmp_path / "export" / "tokenizer")
    assert tok.vocab_size == 40000 and tok.meta["source"]["package"] == RELEASED_PACKAGE.spec
    model = load_checkpoint(tmp_path / "export")
    assert model.word_embedding.weight.dtype == torch.bfloat16
    ids = torch.tensor([tok.encode("中文预训练语言模型")])
    assert model(ids).logits.shape == (1, ids.shape[1], 40000)


def test_single_file_and_iteration_directory(megatron, tmp_path: Path) -> None:
    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1)
    state, summary = read_released(source / "iter_0003000")
    assert summary.iteration == "3000" and "query_layer.attention.q_proj.weight" in state
    state2, summary2 = read_released(source / "iter_0003000" / "mp_rank_00" / "model_optim_rng.pt")
    assert summary2.iteration == "3000"
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_cli_import(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    source = _write_release(megatron, _reference(megatron, 2), tmp_path / "ckpt", 2)
    assert main(["model", "import", str(source), "--output", str(tmp_path / "export"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "2 model-parallel partitions" in out and "preset tiny" in out and "40192 rows → 40000" in out
    assert load_checkpoint(tmp_path / "export").word_embedding.weight.dtype == torch.float16


def test_an_import_replaces_an_import_and_nothing_else(megatron, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`pangu model import ... --output A_TRAINED_EXPORT` replaced the trained weights in place (exit 0); a
    missing --tokenizer left an empty output behind; an output that is a file gave "[Errno 17] File exists"."""
    from flows.cli import main

    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1)
    trained = tmp_path / "trained"
    trained.mkdir()
    for name, data in (("model.safetensors", b"trained weights"), ("config.json", b"{}")):
        (trained / name).write_bytes(data)
    line = _cli_error(["model", "import", str(source), "--output", str(trained)], capsys)
    assert f"--output {trained} holds something else (config.json, model.safetensors)" in line
    assert (trained / "model.safetensors").read_bytes() == b"trained weights"
    (tmp_path / "afile").write_text("mine")
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "afile")], capsys)
    assert f"cannot write the export to {tmp_path / 'afile'}: it is a file" in line
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out"), "--tokenizer",
                       str(tmp_path / "nope")], capsys)
    assert not (tmp_path / "out").exists()
    # an import into an earlier import replaces it
    for dtype in ("fp32", "fp16"):
        assert main(["model", "import", str(source), "--output", str(tmp_path / "imported"), "--dtype", dtype]) == 0
    assert load_checkpoint(tmp_path / "imported").word_embedding.weight.dtype == torch.float16


# -- bad input: one clear message naming the file ----------------------------------------------------
def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from flows.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pangu model import: error: "), err
    return err[0]


def test_truncated_file(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write_release(megatron, _reference(megatron, 2), tmp_path / "ckpt", 2)
    victim = source / "iter_0003000" / "mp_rank_01" / "model_optim_rng.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out")], capsys)
    assert str(victim) in line and "truncated" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_wrong_layout(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    line = _cli_error(["model", "import", str(tmp_path / "plain"), "--output", str(tmp_path / "out")], capsys)
    assert "not a released checkpoint" in line and str(tmp_path / "plain") in line

    bad = tmp_path / "bad" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    bad.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    (tmp_path / "bad" / "latest_checkpointed_iteration.txt").write_text("release")
    line = _cli_error(["model", "import", str(tmp_path / "bad"), "--output", str(tmp_path / "out")], capsys)
    assert str(bad) in line and "wrong layout" in line

    (tmp_path / "tracker").mkdir()
    (tmp_path / "tracker" / "latest_checkpointed_iteration.txt").write_text("12")
    line = _cli_error(["model", "import", str(tmp_path / "tracker"), "--output", str(tmp_path / "out")], capsys)
    assert "iter_0000012" in line


def test_missing_partition(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write_release(megatron, _reference(megatron, 2), tmp_path / "ckpt", 2)
    rank1 = source / "iter_0003000" / "mp_rank_01" / "model_optim_rng.pt"
    rank1.unlink()
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out")], capsys)
    assert "missing partition mp_rank_01/model_optim_rng.pt" in line and str(rank1.parent.parent) in line
    # the whole rank folder gone: only the shapes can tell
    rank1.parent.rmdir()
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out")], capsys)
    assert "partition is missing" in line and "2 partitions are needed" in line
    assert str(source / "iter_0003000" / "mp_rank_00" / "model_optim_rng.pt") in line


def test_shape_matching_no_preset(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write_release(megatron, _reference(megatron, 1, num_layers=2), tmp_path / "ckpt", 1)
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out")], capsys)
    assert "matches no preset" in line and "--num-layers 2" in line and "model_optim_rng.pt" in line


def test_weights_only_refusal_and_trust(megatron, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"args": argparse.Namespace(num_layers=3), "np_rng_state": np.random.get_state()}
    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1, extra=extra)
    line = _cli_error(["model", "import", str(source), "--output", str(tmp_path / "out")], capsys)
    assert "weights_only" in line and "--trust" in line and "numpy" in line and "model_optim_rng.pt" in line
    summary = import_released(source, tmp_path / "out", trust=True)
    assert summary.preset == "tiny"


def test_megatron_args_alone_load_without_trust(megatron, tmp_path: Path) -> None:
    extra = {"args": argparse.Namespace(num_layers=3, hidden_size=64)}
    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1, extra=extra)
    _, summary = read_released(source)
    assert summary.preset == "tiny"


def test_merge_rules_are_the_release_s(megatron) -> None:
    """Our split table (released.split_dim) agrees with the partition_dim the port's mpu layers set."""
    from pangu_model.released import split_dim

    model = _reference(megatron, 1)
    for name, param in model.named_parameters():
        short = name.removeprefix("language_model.")
        expected = param.partition_dim if getattr(param, "model_parallel", False) else None
        assert split_dim(short) == expected, name


def test_a_pangu_sigma_run_inherits_from_an_imported_release(megatron, tmp_path: Path) -> None:
    """Released PanGu-α → `pangu model import` → a PanGu-Σ run with `init_from` (its data packed with the
    imported tokenizer): every expert starts as its layer's dense FFN, so at step 0 the Σ model computes
    the released model's logits on every domain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pangu_model import PanguModel
    from pangu_model.train import Trainer, load_train_config
    from tests.test_train_common import _documents
    from tokenizer.config import PackConfig
    from tokenizer.pack import pack_corpus

    source = _write_release(megatron, _reference(megatron, 1), tmp_path / "ckpt", 1)
    import_released(source, tmp_path / "alpha")
    docs = _documents(per_task=8)
    corpus = tmp_path / "corpus" / "data"
    corpus.mkdir(parents=True)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(docs))], "text": [t for _, t in docs],
                             "domain": [d for d, _ in docs], "source": ["fewclue"] * len(docs),
                             "quality": [1.0] * len(docs), "meta": ["{}"] * len(docs)}),
                   corpus / "part-00000.parquet")
    tokens = tmp_path / "tokens"
    pack_corpus(PackConfig(input=str(corpus.parent), output=str(tokens), tokenizer=str(tmp_path / "alpha" / "tokenizer")))

    config = load_train_config("sigma-tiny", {"data": str(tokens), "output": str(tmp_path / "run"), "seq_len": 64,
                                              "init_from": str(tmp_path / "alpha"), "progress_bar": False})
    trainer = Trainer(config)
    try:
        sigma = PanguModel(trainer.pangu)
        sigma.load_state_dict(trainer.full_state_dict(), strict=True)
    finally:
        trainer.close()
    dense = load_checkpoint(tmp_path / "alpha").eval()
    sigma.eval()
    assert sigma.config.router == "rre" and sigma.config.num_domains == 4
    ids = torch.randint(10, 40000, (4, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24)[None].expand_as(ids)
    with torch.no_grad():
        expected = dense(ids, position_ids=positions).logits
        for domain in range(4):
            got = sigma(ids, position_ids=positions, domain_ids=domain).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eval_of_an_imported_release_uses_its_tokenizer_and_says_so(megatron, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`pangu eval --checkpoint <imported export>`: the released tokenizer scores with the released weights
    (each candidate's loss equals the release's own model on the release's own token ids), and the report
    says what was evaluated."""
    import json

    from evaluation.report import markdown_report
    from evaluation.scoring import EOT_ID
    from evaluation.tasks import TASKS
    from flows.cli import main
    from tests.test_eval_common import require_clue
    from tokenizer.released import load_released_tokenizer

    clue = require_clue()
    reference = _reference(megatron, 2)
    source = _write_release(megatron, reference, tmp_path / "ckpt", 2)
    import_released(source, tmp_path / "export")
    assert main(["eval", "--checkpoint", str(tmp_path / "export"), "--data-dir", str(clue), "--tasks", "tnews",
                 "--limit", "4", "--output", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    meta = results["meta"]
    assert meta["tokenizer"] == str(tmp_path / "export" / "tokenizer")
    assert meta["tokenizer_name"] == "pangu-alpha-released" and meta["tokenizer_package"] == RELEASED_PACKAGE.spec
    assert meta["imported"]["source"] == str(source) and meta["imported"]["partitions"] == 2
    assert meta["imported"]["preset"] == "tiny" and meta["imported"]["published"] is None

    released = load_released_tokenizer()
    items = {item.id: item for item in TASKS["tnews"].load(str(clue), "eval", 1234).items}
    rows = [json.loads(line) for line in
            (tmp_path / "eval" / "predictions" / "tnews.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    for row in rows[:2]:
        for candidate, loss, tokens in zip(items[row["id"]].candidates, row["loss"], row["tokens"]):
            ids = released.encode(candidate)
            assert tokens == len(ids)
            sequence = torch.tensor([[EOT_ID, *ids]])
            # the harness's `<eot>` context: positions and attention restart after it, as in training
            logits = _reference_logits(megatron, reference, sequence, monkeypatch, eod=EOT_ID)[0, :-1]
            expected = torch.nn.functional.cross_entropy(logits, sequence[0, 1:], reduction="sum").item()
            assert loss == pytest.approx(expected, abs=1e-3)

    report = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert f"imported from {source}" in report and "not a published PanGu-α size" in report
    assert f"the released PanGu-α tokenizer ({RELEASED_PACKAGE.spec})" in report and "same weights" not in report
    published = {**meta, "imported": {**meta["imported"], "preset": "2.6b", "published": "PanGu-α 2.6B"}}
    marked = markdown_report({**results, "meta": published})
    assert "| ours | PanGu-α 2.6B (same weights) | PanGu-α 13B |" in marked and "Like with like" in marked
    other_tokenizer = markdown_report({**results, "meta": {**published, "tokenizer_name": "corpus-trained"}})
    assert "same weights" not in other_tokenizer


@pytest.mark.parametrize("data, reason", [
    (b"hi\n", "KeyError 105"), (b"t", "IndexError pop from empty list"), (b"\x80\x40", "EOFError"),
    (b"\x80\x02}q\x00X\x05", "error unpack requires a buffer of 4 bytes"),
])
def test_bytes_that_are_not_a_checkpoint_are_refused_naming_the_file(tmp_path, recwarn, data, reason):
    """The unpickler stops on such bytes with a KeyError, an IndexError or a struct.error: `model import` printed
    `error: 105`, or a traceback; a "pickle protocol 64" warning came first."""
    from pangu_model.released import ReleasedCheckpointError, read_partition

    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(data)
    with pytest.raises(ReleasedCheckpointError) as caught:
        read_partition(path)
    assert str(caught.value) == f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
