"""`pangu model import` of the release's MindSpore checkpoints: the `.ckpt` container and the `.npy` directory.

The weights are those of the release's own PyTorch model (the `megatron` fixture of test_model_import),
written under MindSpore's names and layouts:
- the names and transposes written here are checked against the release's converter: its
  `_numpy_ckpt_2_pytorch.loadModelFromNp` (from the `pcl_pangu` wheel) fills a zeroed Megatron state
  from the `.npy` directory and must give back the reference's weights;
- the `.ckpt` file is written with MindSpore's own generated protobuf module
  (`mindspore/train/checkpoint_pb2.py`, from the MindSpore wheel through the registry) the way its
  `_exec_save` writes one: a serialized `Checkpoint` per tensor or dim-0 slice, concatenated, and a CRC
  trailer. MindSpore slices tensors over 512 MiB; a small slice size here takes the same path.
The import of each must give the reference's logits.
"""
from __future__ import annotations

import argparse
import binascii
import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sample_data.sources.packages import Package, read_member
from pangu_model import load_checkpoint
from pangu_model.mindspore_ckpt import MindSporeCheckpoint
from pangu_model.released import import_released
from tests.test_model_import import TINY, _cli_error, _reference, _reference_logits, megatron, wheel_of  # noqa: F401
from tokenizer.released import RELEASED_PACKAGE

MINDSPORE = Package("mindspore", "2.10.0", "pypi", "Apache-2.0")
CONVERTER = "pcl_pangu/model_converter/_numpy_ckpt_2_pytorch.py"
_TYPES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32", np.dtype(np.int32): "Int32"}


@pytest.fixture(scope="module")
def checkpoint_pb2(tmp_path_factory: pytest.TempPathFactory):
    """MindSpore's generated `checkpoint_pb2`, taken from its wheel (nothing else of MindSpore is used)."""
    wheel = wheel_of(MINDSPORE)
    path = tmp_path_factory.mktemp("mindspore") / "mindspore_checkpoint_pb2.py"
    path.write_bytes(read_member(wheel, "mindspore/train/checkpoint_pb2.py"))
    spec = importlib.util.spec_from_file_location("mindspore_checkpoint_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _converter(tmp_path: Path):
    """The release's `.npy` → Megatron converter module, from the `pcl_pangu` wheel."""
    with zipfile.ZipFile(wheel_of(RELEASED_PACKAGE)) as zf:
        (tmp_path / "converter.py").write_bytes(zf.read(CONVERTER))
    spec = importlib.util.spec_from_file_location("pcl_numpy_ckpt_2_pytorch", tmp_path / "converter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mindspore_tensors(model) -> dict[str, np.ndarray]:
    """The reference model's weights under MindSpore names, in MindSpore's layout, fp16 as released."""
    lm = model.state_dict_for_save_checkpoint()["language_model"]
    t = lm["transformer"]
    out = {
        "backbone.word_embedding.embedding_table": lm["embedding"]["word_embeddings"]["weight"][:40000],
        "backbone.position_embedding.embedding_table": lm["embedding"]["position_embeddings"]["weight"],
        "backbone.top_query_embedding.embedding_table": lm["topQueryEmbedding"]["top_query_embeddings"]["weight"],
        "backbone.layernorm.gamma": t["final_layernorm.weight"],
        "backbone.layernorm.beta": t["final_layernorm.bias"],
    }
    blocks = [(f"layers.{i}", f"blocks.{i}") for i in range(TINY["num_layers"])] + [("topQueryLayer", "top_query_layer")]
    for ours, theirs in blocks:
        for kind in ("weight", "bias"):
            for n, name in ((1, "query"), (2, "key"), (3, "value")):
                out[f"backbone.{theirs}.attention.dense{n}.{kind}"] = t[f"{ours}.attention.{name}.{kind}"]
        for ms, mg in (("attention.projection", "attention.dense"), ("output.mapping", "mlp.dense_h_to_4h"),
                       ("output.projection", "mlp.dense_4h_to_h")):
            out[f"backbone.{theirs}.{ms}.weight"] = t[f"{ours}.{mg}.weight"].t()  # MindSpore: [in, out]
            out[f"backbone.{theirs}.{ms}.bias"] = t[f"{ours}.{mg}.bias"]
        for ms, mg in (("layernorm1", "input_layernorm"), ("layernorm2", "post_attention_layernorm")):
            out[f"backbone.{theirs}.{ms}.gamma"] = t[f"{ours}.{mg}.weight"]
            out[f"backbone.{theirs}.{ms}.beta"] = t[f"{ours}.{mg}.bias"]
    return {k: v.detach().half().contiguous().numpy() for k, v in out.items()}


def _training_extras(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a MindSpore training checkpoint holds beside the model: Adam moments and scalars."""
    extras = {f"adam_m.{k}": np.zeros_like(v, dtype=np.float32) for k, v in list(tensors.items())[:3]}
    extras["global_step"] = np.array([3000], dtype=np.int32)
    extras["learning_rate"] = np.array(1e-4, dtype=np.float32)
    return extras


def write_ckpt(pb2, tensors: dict[str, np.ndarray], path: Path, slice_bytes: int = 4096, crc: bool = True) -> Path:
    """`tensors` as MindSpore's `_write_parameter_data` writes them (serialization.py)."""
    crc_num = 0
    with open(path, "wb") as fh:
        for tag, array in tensors.items():
            count = max(1, -(-array.nbytes // slice_bytes)) if array.ndim else 1
            for piece in (np.array_split(array, count) if array.ndim else [array]):
                message = pb2.Checkpoint()
                value = message.value.add()
                value.tag = tag
                value.tensor.dims.extend(array.shape)
                value.tensor.tensor_type = _TYPES[array.dtype]
                value.tensor.tensor_content = piece.tobytes()
                data = message.SerializeToString()
                crc_num = binascii.crc32(data, crc_num)
                fh.write(data)
        if crc:
            fh.write(b"crc_num" + crc_num.to_bytes(10, byteorder="big"))
    return path


def write_npy_dir(tensors: dict[str, np.ndarray], directory: Path) -> Path:
    """The directory `pcl_pangu`'s `ms_2_numpy` writes: `<parameter name>.npy` per tensor."""
    directory.mkdir(parents=True)
    for tag, array in tensors.items():
        np.save(directory / f"{tag}.npy", array)
    return directory


def test_names_and_layouts_are_the_release_converter_s(megatron, tmp_path: Path) -> None:
    reference = _reference(megatron, 1)
    npy = write_npy_dir(_mindspore_tensors(reference), tmp_path / "npy")
    nested = reference.state_dict_for_save_checkpoint()

    def zeroed(tree):
        return {k: zeroed(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in tree.items()}

    sd = {"model": zeroed(nested)}
    _converter(tmp_path).loadModelFromNp(sd, argparse.Namespace(num_layers=TINY["num_layers"],
                                                                 npy_ckpt_path=f"{npy}/"))

    def flat(tree, prefix=""):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    got, want = dict(flat(sd["model"])), dict(flat(nested))
    assert got.keys() == want.keys() and len(got) > 40
    for name, tensor in want.items():
        if name.endswith("word_embeddings.weight"):  # padded rows stay as they were; the converter fills 40,000
            tensor, got[name] = tensor[:40000], got[name][:40000]
        torch.testing.assert_close(got[name], tensor.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("layout", ["ckpt", "npy"])
def test_import_matches_reference_logits(megatron, checkpoint_pb2, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    reference = _reference(megatron, 1)
    tensors = _mindspore_tensors(reference)
    if layout == "ckpt":
        source = write_ckpt(checkpoint_pb2, {**tensors, **_training_extras(tensors)}, tmp_path / "PanguAlpha.ckpt")
        index = MindSporeCheckpoint(source)
        assert max(len(e.spans) for e in index.entries.values()) > 4  # the sliced path is taken
    else:
        source = write_npy_dir(tensors, tmp_path / "numpy_ckpt")
    summary = import_released(source, tmp_path / "export")
    assert summary.format == ("mindspore" if layout == "ckpt" else "npy") and summary.preset == "tiny"
    assert summary.source_dtype == "float16" and summary.padded_vocab == 40000
    if layout == "ckpt":
        assert summary.iteration == "3000"
        assert any("skipped 5 non-model entries" in n and "adam_m.backbone" in n for n in summary.notes)

    ours = load_checkpoint(tmp_path / "export")
    ids = torch.randint(10, 40000, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = _reference_logits(megatron, reference, ids, monkeypatch)
    with torch.no_grad():
        got = ours(ids, position_ids=torch.arange(24)[None].expand_as(ids)).logits
    assert expected.std() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_container_types_slices_and_scalars(checkpoint_pb2, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((7, 5)).astype(np.float32), "b": rng.standard_normal(11).astype(np.float16),
              "step": np.array([12], dtype=np.int32), "scalar": np.array(2.5, dtype=np.float32)}
    path = write_ckpt(checkpoint_pb2, arrays, tmp_path / "x.ckpt", slice_bytes=16, crc=False)
    with MindSporeCheckpoint(path) as ckpt:
        assert ckpt.entries.keys() == arrays.keys() and len(ckpt.entries["a"].spans) == 9
        for tag, array in arrays.items():
            tensor = ckpt.tensor(tag)
            assert tensor.shape == array.shape and np.array_equal(tensor.numpy(), array), tag
        tensor = ckpt.tensor("a")
        tensor.add_(1)  # a parameter assigned from it may be written: the file is not
    with MindSporeCheckpoint(path) as again:
        assert np.array_equal(again.tensor("a").numpy(), arrays["a"])

    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    message = checkpoint_pb2.Checkpoint()
    value = message.value.add()
    value.tag, value.tensor.tensor_type = "w", "BFloat16"
    value.tensor.dims.extend([3, 4])
    value.tensor.tensor_content = bf16.view(torch.int16).numpy().tobytes()
    (tmp_path / "bf16.ckpt").write_bytes(message.SerializeToString())
    with MindSporeCheckpoint(tmp_path / "bf16.ckpt") as ckpt:
        assert torch.equal(ckpt.tensor("w"), bf16)


def test_bad_mindspore_input(megatron, checkpoint_pb2, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = _mindspore_tensors(_reference(megatron, 1))
    out = ["--output", str(tmp_path / "out")]
    good = write_ckpt(checkpoint_pb2, tensors, tmp_path / "good.ckpt", crc=False)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    line = _cli_error(["model", "import", str(truncated), *out], capsys)
    assert str(truncated) in line and "truncated" in line

    damaged = write_ckpt(checkpoint_pb2, tensors, tmp_path / "damaged.ckpt")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    line = _cli_error(["model", "import", str(damaged), *out], capsys)
    assert str(damaged) in line and "damaged" in line and "CRC-32" in line

    encrypted = tmp_path / "encrypted.ckpt"
    encrypted.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)) + b"\x00")
    line = _cli_error(["model", "import", str(encrypted), *out], capsys)
    assert str(encrypted) in line and "encrypted" in line

    partial = {k: v for k, v in tensors.items() if k != "backbone.blocks.1.output.mapping.weight"}
    missing = write_ckpt(checkpoint_pb2, partial, tmp_path / "missing.ckpt")
    line = _cli_error(["model", "import", str(missing), *out], capsys)
    assert str(missing) in line and "backbone.blocks.1.output.mapping.weight" in line and "missing" in line

    (tmp_path / "slices").mkdir()
    for rank in range(2):
        write_ckpt(checkpoint_pb2, tensors, tmp_path / "slices" / f"rank_{rank}.ckpt")
    line = _cli_error(["model", "import", str(tmp_path / "slices"), *out], capsys)
    assert "2 MindSpore .ckpt files" in line and "merged" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()
