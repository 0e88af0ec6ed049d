"""Import released PanGu-α checkpoints into an export: the PyTorch port's (Megatron 1.1 layout) and
MindSpore's (the release's own `.ckpt`, or the `.npy` directory `pcl_pangu`'s `ms_2_numpy` writes).

PyTorch layout read (SPEC §10; `megatron/checkpointing.py` of the `pcl_pangu` wheel):

    SOURCE/latest_checkpointed_iteration.txt        an iteration number, or "release"
    SOURCE/iter_NNNNNNN/mp_rank_XX/model_optim_rng.pt   (or SOURCE/release/mp_rank_XX/...)

Each file is `{"model": {"language_model": {"embedding": …, "topQueryEmbedding": …, "transformer": …}},
"iteration": …}` (training checkpoints may also carry `args`, optimizer and RNG state). SOURCE may also
be the `iter_*` / `release` directory itself, or one `model_optim_rng.pt` (a single partition).

Files are read with `torch.load(weights_only=True)` (plus `argparse.Namespace`, the `args` Megatron
saves); a file that needs more is refused with the global it asks for, unless `trust=True`, which
allows each global the file names (still weights_only: nothing but those is unpickled).

Model-parallel partitions (`mpu/layers.py`) are merged as `tools/merge_mp_partitions.py` does, stride 1:
column-parallel tensors (word embedding rows, query/key/value and dense_h_to_4h weights and biases)
are concatenated on dim 0, row-parallel weights (attention dense, dense_4h_to_h) on dim 1, everything
else (LayerNorms, position and query tables, row-parallel biases) is replicated and taken from rank 0.
The word table is cut to the tokenizer's 40,000 rows (Megatron pads it to a multiple of
make_vocab_size_divisible_by × partitions). The shape is read from the tensors and must match a preset
(its head count is the preset's: tensors do not say it).

MindSpore: the container is read by `mindspore_ckpt` (no MindSpore needed). Names and layouts are those
the release's converter (`pcl_pangu/model_converter/_numpy_ckpt_2_pytorch.py`) maps:
`backbone.blocks.{i}.attention.dense1/2/3` → query/key/value as they are; `attention.projection`,
`output.mapping` and `output.projection` weights transposed (MindSpore keeps them [in, out]);
`layernorm1/2` and the final `backbone.layernorm` gamma/beta → LayerNorm weight/bias. Optimizer states
(`adam_m.…`, `moment1.…`) and scalars (`global_step`, `learning_rate`, …) are skipped and listed. The
MindSpore word table has exactly the tokenizer's rows. The result goes through the same shape check and
renaming as a PyTorch checkpoint.
"""
from __future__ import annotations

import argparse
import importlib
import math
import pickle
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import PRESETS, PanguConfig
from .mindspore_ckpt import MindSporeCheckpoint, MindSporeCheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
PROVENANCE_FILE = "imported.json"  # in the export: what it was imported from (read by `pangu eval`)
# Presets of the published sizes: an import of one is the model the paper's columns report.
PUBLISHED = {"2.6b": "PanGu-α 2.6B", "13b": "PanGu-α 13B", "200b": "PanGu-α 200B"}
PARTITION_FILE = "model_optim_rng.pt"
RELEASED_VOCAB = 40000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Megatron names (inside language_model) → ours. {i}: the layer index.
_EMBEDDINGS = {
    "embedding.word_embeddings.weight": "word_embedding.weight",
    "embedding.position_embeddings.weight": "position_embedding.weight",
    "topQueryEmbedding.top_query_embeddings.weight": "top_query_embedding.weight",
    "transformer.final_layernorm.weight": "final_norm.weight",
    "transformer.final_layernorm.bias": "final_norm.bias",
}
_LAYER = {
    "input_layernorm": "attention_norm",
    "attention.query": "attention.q_proj",
    "attention.key": "attention.k_proj",
    "attention.value": "attention.v_proj",
    "attention.dense": "attention.out_proj",
    "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn.fc_in",
    "mlp.dense_4h_to_h": "ffn.fc_out",
}
# How a model-parallel tensor is split (mpu.VocabParallelEmbedding / ColumnParallelLinear / RowParallelLinear).
_COLUMN_PARALLEL = re.compile(
    r"(embedding\.word_embeddings\.weight"
    r"|attention\.(query|key|value)\.(weight|bias)"
    r"|mlp\.dense_h_to_4h\.(weight|bias))$"
)
_ROW_PARALLEL = re.compile(r"(attention\.dense|mlp\.dense_4h_to_h)\.weight$")
_LAYER_NAME = re.compile(r"^transformer\.(?:layers\.(\d+)|topQueryLayer)\.(.+)\.(weight|bias)$")

# MindSpore names (after "backbone.") → Megatron names; layer sub-names → (Megatron sub-name, transposed).
_MS_EMBEDDINGS = {
    "word_embedding.embedding_table": "embedding.word_embeddings.weight",
    "position_embedding.embedding_table": "embedding.position_embeddings.weight",
    "top_query_embedding.embedding_table": "topQueryEmbedding.top_query_embeddings.weight",
    "layernorm.gamma": "transformer.final_layernorm.weight",
    "layernorm.beta": "transformer.final_layernorm.bias",
}
_MS_LAYER = {
    "attention.dense1.weight": ("attention.query.weight", False),
    "attention.dense1.bias": ("attention.query.bias", False),
    "attention.dense2.weight": ("attention.key.weight", False),
    "attention.dense2.bias": ("attention.key.bias", False),
    "attention.dense3.weight": ("attention.value.weight", False),
    "attention.dense3.bias": ("attention.value.bias", False),
    "attention.projection.weight": ("attention.dense.weight", True),
    "attention.projection.bias": ("attention.dense.bias", False),
    "output.mapping.weight": ("mlp.dense_h_to_4h.weight", True),
    "output.mapping.bias": ("mlp.dense_h_to_4h.bias", False),
    "output.projection.weight": ("mlp.dense_4h_to_h.weight", True),
    "output.projection.bias": ("mlp.dense_4h_to_h.bias", False),
    "layernorm1.gamma": ("input_layernorm.weight", False),
    "layernorm1.beta": ("input_layernorm.bias", False),
    "layernorm2.gamma": ("post_attention_layernorm.weight", False),
    "layernorm2.beta": ("post_attention_layernorm.bias", False),
}
_MS_LAYER_NAME = re.compile(r"^(?:blocks\.(\d+)|top_query_layer)\.(.+)$")
# Cells of MindSpore optimizers and loss scaling whose parameters mirror the model's names.
_MS_OPTIMIZER_PART = re.compile(r"^(adam_[mv]|moments?\d*|accu_grads?|accum\w*|exp_avg\w*|.*_state)$")
FORMATS = {"megatron": "PyTorch, Megatron 1.1 layout", "mindspore": "MindSpore .ckpt", "npy": "MindSpore tensors as .npy"}


class ReleasedCheckpointError(ValueError):
    """The source is not a readable released checkpoint; the message names the file and the reason."""


class Joined:
    """One weight still in its model-parallel pieces (or a row range of it), joined only when it is
    written: an import then holds one tensor at a time, not a second copy of the model."""

    def __init__(self, pieces: list[torch.Tensor], dim: int, rows: int | None = None):
        self.pieces, self.split, self.rows = pieces, dim, rows
        shape = list(pieces[0].shape)
        shape[dim] = sum(p.shape[dim] for p in pieces)
        if rows is not None:
            shape[0] = min(rows, shape[0])
        self.shape = torch.Size(shape)
        self.dtype = pieces[0].dtype

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: slice) -> Joined:
        assert rows.start is None and rows.step is None, "only a leading row range is taken"
        return Joined(self.pieces, self.split, rows.stop)

    def build(self) -> torch.Tensor:
        if self.split == 0 and self.rows is not None:  # only the pieces that hold the kept rows
            kept, total = [], 0
            for piece in self.pieces:
                if total >= self.rows:
                    break
                kept.append(piece[: self.rows - total])
                total += kept[-1].shape[0]
            return torch.cat(kept, dim=0)
        whole = torch.cat(self.pieces, dim=self.split)
        return whole if self.rows is None else whole[: self.rows]


def materialize(tensor: torch.Tensor | Joined, dtype: torch.dtype | None = None) -> torch.Tensor:
    built = tensor.build() if isinstance(tensor, Joined) else tensor.detach()
    return built.contiguous() if dtype is None else built.to(dtype).contiguous()


@dataclass
class ImportSummary:
    source: Path
    files: list[Path]
    iteration: str
    partitions: int
    preset: str
    config: PanguConfig
    padded_vocab: int
    source_dtype: str
    dtype: str
    output: Path | None = None
    tokenizer: Path | None = None
    parameters: int = 0
    notes: list[str] = field(default_factory=list)
    format: str = "megatron"

    def provenance(self) -> dict[str, Any]:
        """What the export records of its source (`imported.json`)."""
        return {"source": str(self.source), "format": FORMATS[self.format], "iteration": self.iteration,
                "partitions": self.partitions, "source_dtype": self.source_dtype, "preset": self.preset,
                "published": PUBLISHED.get(self.preset), "notes": self.notes}

    def lines(self) -> list[str]:
        c = self.config
        parts = f", {self.partitions} model-parallel partition{'s' if self.partitions != 1 else ''}" \
            if self.format == "megatron" else ""
        out = [
            f"source      {self.source} ({FORMATS[self.format]}, iteration {self.iteration}{parts}, "
            f"{self.source_dtype})",
            f"shape       {c.num_layers} layers incl. the query layer, d {c.d_model}, d_ff {c.d_ff}, "
            f"heads {c.num_heads} (the preset's), seq {c.max_seq_len} → preset {self.preset}",
            f"vocabulary  {self.padded_vocab} rows → {c.vocab_size}",
            f"parameters  {self.parameters:,} ({self.dtype})",
        ]
        if self.output is not None:
            out.append(f"export      {self.output}")
        if self.tokenizer is not None:
            out.append(f"tokenizer   {self.tokenizer}")
        out += [f"note        {n}" for n in self.notes]
        return out


# -- locating the files -----------------------------------------------------------------------------
def _partition_files(directory: Path) -> list[Path]:
    ranks = {}
    for child in directory.iterdir():
        m = re.fullmatch(r"mp_rank_(\d+)", child.name)
        if m and child.is_dir():
            ranks[int(m.group(1))] = child
    if not ranks:
        raise ReleasedCheckpointError(f"{directory}: no mp_rank_XX/{PARTITION_FILE} partitions (wrong layout)")
    count = max(ranks) + 1
    missing = [f"mp_rank_{r:02d}/{PARTITION_FILE}" for r in range(count)
               if r not in ranks or not (ranks[r] / PARTITION_FILE).is_file()]
    if missing:
        raise ReleasedCheckpointError(f"{directory}: missing partition {', '.join(missing)} "
                                      f"(found ranks {sorted(ranks)})")
    return [ranks[r] / PARTITION_FILE for r in range(count)]


def locate(source: str | Path) -> tuple[list[Path], str]:
    """The partition files of the checkpoint at `source`, rank order, and its iteration label."""
    source = Path(source)
    if not source.exists():
        raise ReleasedCheckpointError(f"{source}: no such file or directory")
    if source.is_file():
        if source.name == TRACKER_FILE:
            return locate(source.parent)
        return [source], "?"
    tracker = source / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()
        if text == "release":
            directory, label = source / "release", "release"
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise ReleasedCheckpointError(f"{tracker}: expected an iteration number or 'release', "
                                              f"found {text[:40]!r}") from None
            directory, label = source / f"iter_{iteration:07d}", str(iteration)
        if not directory.is_dir():
            raise ReleasedCheckpointError(f"{tracker} names {label}, but {directory} does not exist")
        return _partition_files(directory), label
    if re.fullmatch(r"iter_\d+|release", source.name) or any(source.glob("mp_rank_*")):
        label = source.name[len("iter_"):].lstrip("0") or "0" if source.name.startswith("iter_") else source.name
        return _partition_files(source), label
    raise ReleasedCheckpointError(f"{source}: not a Megatron checkpoint directory (no {TRACKER_FILE}, "
                                  f"no iter_*/release/mp_rank_XX folders)")


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive, or a legacy pickle


def _head(path: Path, size: int = 4) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def source_format(source: str | Path) -> str:
    """"megatron", "mindspore" or "npy": which kind of released checkpoint `source` is."""
    source = Path(source)
    if not source.exists():
        raise ReleasedCheckpointError(f"{source}: no such file or directory")
    if source.is_file():
        if source.suffix == ".npy":
            raise ReleasedCheckpointError(f"{source}: one tensor of a .npy directory: give the directory")
        head = _head(source)
        if source.name == TRACKER_FILE or head.startswith(_TORCH_MAGIC):
            return "megatron"
        if source.suffix == ".ckpt" or head[:1] == b"\x0a":
            return "mindspore"
        return "megatron"  # read as PyTorch, whose loader says what is wrong with it
    if (source / TRACKER_FILE).is_file() or re.fullmatch(r"iter_\d+|release", source.name) \
            or any(source.glob("mp_rank_*")):
        return "megatron"
    if any(source.glob("*backbone.*.npy")):
        return "npy"
    ckpts = sorted(source.glob("*.ckpt"))
    if len(ckpts) == 1:
        return "mindspore"
    if ckpts:
        raise ReleasedCheckpointError(
            f"{source}: {len(ckpts)} MindSpore .ckpt files ({', '.join(p.name for p in ckpts[:4])}…): give one "
            f"file; model-parallel slices must first be merged into one (the release ships merged files)")
    raise ReleasedCheckpointError(f"{source}: not a released checkpoint: no {TRACKER_FILE}, iter_*/release/"
                                  f"mp_rank_XX folders, .ckpt file or backbone.*.npy tensors")


# -- reading ---------------------------------------------------------------------------------------
_NEEDED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>")


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _load(path: Path, trust: bool) -> Any:
    """`torch.load(weights_only=True)`, with Megatron's `args`; with `trust`, every other global the file
    needs (optimizer or NumPy RNG state) is allowed by name as the loader meets it."""
    allowed: list[Any] = [argparse.Namespace]
    # Memory-mapped when the file is a zip archive (every torch.save since 1.6): tensors are read when
    # written out, one at a time. A legacy pickle file is read whole.
    mmap = _head(path) == _TORCH_MAGIC[0]
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                # Random bytes read as a pickle "protocol" warn before they fail: the failure is the message
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            m = _NEEDED_GLOBAL.search(str(exc))
            if not trust or m is None:
                raise
            allowed.append(_resolve(m.group(1) or m.group(2)))
    raise pickle.UnpicklingError(f"{path}: more than 64 globals to allow")


def read_partition(path: Path, trust: bool = False) -> dict[str, Any]:
    """One `model_optim_rng.pt`, loaded with weights_only; `trust` allows the other globals it names."""
    try:
        payload = _load(path, trust)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        needed = _NEEDED_GLOBAL.search(text)
        if "Weights only load failed" in text and needed and not trust:  # --trust would load it
            what = f"the global {needed.group(1) or needed.group(2)}"
            raise ReleasedCheckpointError(
                f"{path}: refused to load with weights_only=True: it needs {what} (e.g. optimizer or RNG "
                f"state); pass --trust to allow what it names, only if you trust where it came from") from None
        # torch's own first line advises weights_only=False; the unpickler's reason is the useful part.
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        first = reason.group(1) if reason else (text.splitlines() or [type(exc).__name__])[0]
        raise ReleasedCheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                                      f"{first}") from None
    # Bytes that are not a checkpoint can stop the unpickler anywhere: a memo or stack entry it lacks too
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, KeyError, IndexError,
            TypeError, struct.error) as exc:
        first = (str(exc).splitlines() or [""])[0]
        if isinstance(exc, (KeyError, IndexError, TypeError, struct.error)) or not first:  # "105" says nothing
            first = f"{type(exc).__name__} {first}".strip()
        raise ReleasedCheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                                      f"{first}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ReleasedCheckpointError(f"{path}: wrong layout: expected a dict with 'model' "
                                      f"(Megatron 1.1), found {keys}")
    model = payload["model"]
    lm = model.get("language_model", model)
    if not isinstance(lm, dict) or not {"embedding", "transformer"} <= set(lm):
        found = sorted(lm)[:8] if isinstance(lm, dict) else type(lm).__name__
        raise ReleasedCheckpointError(f"{path}: wrong layout: expected model.language_model with 'embedding', "
                                      f"'topQueryEmbedding' and 'transformer', found {found}")
    return {"tensors": _flatten(lm, path), "iteration": payload.get("iteration")}


def _flatten(tree: dict[str, Any], path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise ReleasedCheckpointError(f"{path}: wrong layout: {name} is a {type(value).__name__}, not a tensor")
    return out


def read_mindspore(source: Path, fmt: str) -> tuple[dict[str, torch.Tensor], str, Path, list[str]]:
    """The tensors of a MindSpore `.ckpt` (or `.npy` directory) under their Megatron names, transposed to
    its layout; the iteration (`global_step` when saved), the file named in errors, and notes."""
    tensors: dict[str, torch.Tensor] = {}
    no_tensor: dict[str, str] = {}
    if fmt == "npy":
        where = source
        for path in sorted(source.glob("*.npy")):
            try:  # copy-on-write map: one tensor in memory at a time, the file never written
                tensors[path.name[:-len(".npy")]] = torch.from_numpy(np.load(path, mmap_mode="c"))
            except (ValueError, OSError, TypeError) as exc:
                raise ReleasedCheckpointError(f"{path}: not a readable .npy tensor (truncated?): {exc}") from None
    else:
        where = source if source.is_file() else next(source.glob("*.ckpt"))
        try:
            ckpt = MindSporeCheckpoint(where)
        except MindSporeCheckpointError as exc:
            raise ReleasedCheckpointError(str(exc)) from None
        with ckpt:
            tensors = {tag: ckpt.tensor(tag) for tag in ckpt.entries}
        no_tensor = ckpt.skipped
    notes: list[str] = []
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    iteration = "?"
    for tag, tensor in tensors.items():
        prefix, found, name = tag.rpartition("backbone.")
        if not found or any(_MS_OPTIMIZER_PART.match(part) for part in prefix.split(".") if part):
            skipped.append(tag)
            if tag.rsplit(".", 1)[-1] == "global_step" and tensor.numel() == 1:
                iteration = str(int(tensor.reshape(()).item()))
            continue
        target, transpose = _MS_EMBEDDINGS.get(name), False
        if target is None:
            m = _MS_LAYER_NAME.match(name)
            if not m or m.group(2) not in _MS_LAYER:
                raise ReleasedCheckpointError(f"{where}: unexpected MindSpore tensor {tag!r} (not a PanGu-α "
                                              f"backbone parameter)")
            sub, transpose = _MS_LAYER[m.group(2)]
            block = "topQueryLayer" if m.group(1) is None else f"layers.{m.group(1)}"
            target = f"transformer.{block}.{sub}"
        if target in state:
            raise ReleasedCheckpointError(f"{where}: two tensors map to {target}: {tag!r} and another with a "
                                          f"different prefix")
        state[target] = tensor.t() if transpose else tensor
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        notes.append(f"skipped {len(skipped)} non-model entr{'y' if len(skipped) == 1 else 'ies'}: {shown}")
    if no_tensor:
        notes.append(f"skipped {len(no_tensor)} value(s) without a tensor: "
                     f"{', '.join(f'{tag} ({kind})' for tag, kind in list(no_tensor.items())[:5])}")
    _check_mindspore_names(state, where)
    return state, iteration, where, notes


def _check_mindspore_names(state: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor of the embeddings and of each block present, named as MindSpore names it."""
    blocks = {m.group(1) for n in state if (m := re.match(r"transformer\.(layers\.\d+|topQueryLayer)\.", n))}
    blocks.add("topQueryLayer")
    wanted = {target: f"backbone.{name}" for name, target in _MS_EMBEDDINGS.items()}
    for block in blocks:
        ms_block = "top_query_layer" if block == "topQueryLayer" else f"blocks.{block.split('.')[1]}"
        wanted.update({f"transformer.{block}.{sub}": f"backbone.{ms_block}.{name}"
                       for name, (sub, _) in _MS_LAYER.items()})
    missing = sorted(ms for target, ms in wanted.items() if target not in state)
    if missing:
        raise ReleasedCheckpointError(f"{where}: wrong layout: MindSpore tensor{'s' if len(missing) > 1 else ''} "
                                      f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} missing")


# -- merging ---------------------------------------------------------------------------------------
def split_dim(name: str) -> int | None:
    """The dim a model-parallel tensor is split on (0 column-parallel, 1 row-parallel), None if replicated."""
    if _COLUMN_PARALLEL.search(name):
        return 0
    if _ROW_PARALLEL.search(name):
        return 1
    return None


def merge_partitions(partitions: list[dict[str, torch.Tensor]],
                     files: list[Path]) -> dict[str, torch.Tensor | Joined]:
    """One state (Megatron names) from the partitions' states, in rank order; split tensors stay `Joined`."""
    first = partitions[0]
    for rank, (part, path) in enumerate(zip(partitions, files)):
        if set(part) != set(first):
            diff = sorted(set(part) ^ set(first))[:4]
            raise ReleasedCheckpointError(f"{path}: partition {rank} holds other tensors than {files[0]}: {diff}")
    merged = {}
    for name, tensor in first.items():
        dim = split_dim(name)
        pieces = [part[name] for part in partitions]
        if dim is None or len(pieces) == 1:
            merged[name] = tensor
            continue
        for piece, path in zip(pieces, files):
            if piece.dim() <= dim or piece.shape != tensor.shape:
                raise ReleasedCheckpointError(f"{path}: {name} has shape {tuple(piece.shape)}, rank 0 has "
                                              f"{tuple(tensor.shape)}")
        merged[name] = Joined(pieces, dim)
    return merged


# -- shape → preset, names → ours --------------------------------------------------------------------
def _require(state: dict[str, torch.Tensor], name: str, where: Path) -> torch.Tensor:
    if name not in state:
        raise ReleasedCheckpointError(f"{where}: wrong layout: tensor language_model.{name} is missing")
    return state[name]


def infer_config(state: dict[str, torch.Tensor], where: Path, vocab: int = RELEASED_VOCAB,
                 partitions: int = 1) -> tuple[str, PanguConfig]:
    """The preset whose shape the merged tensors have, as a config with `vocab` rows."""
    words = _require(state, "embedding.word_embeddings.weight", where)
    positions = _require(state, "embedding.position_embeddings.weight", where)
    _require(state, "topQueryEmbedding.top_query_embeddings.weight", where)
    fc_in = _require(state, "transformer.topQueryLayer.mlp.dense_h_to_4h.weight", where)
    layers = {int(m.group(1)) for n in state if (m := re.match(r"transformer\.layers\.(\d+)\.", n))}
    if layers != set(range(len(layers))):
        raise ReleasedCheckpointError(f"{where}: wrong layout: transformer layers {sorted(layers)} are not 0..N-1")
    d_model, seq, d_ff, num_layers = words.shape[1], positions.shape[0], fc_in.shape[0], len(layers) + 1
    query = _require(state, "transformer.topQueryLayer.attention.query.weight", where)
    if query.shape != (d_model, d_model):
        per = query.shape[0] // max(partitions, 1)
        raise ReleasedCheckpointError(
            f"{where}: the query weight is {tuple(query.shape)} after merging {partitions} partition(s), not "
            f"{(d_model, d_model)}: a model-parallel partition is missing (each holds {per} of {d_model} rows, "
            f"so {d_model // max(per, 1)} partitions are needed)")
    if words.shape[0] < vocab:
        raise ReleasedCheckpointError(f"{where}: the word table has {words.shape[0]} rows, fewer than the "
                                      f"tokenizer's {vocab}")
    shape = dict(num_layers=num_layers, d_model=d_model, d_ff=d_ff, max_seq_len=seq)
    for name, preset in PRESETS.items():
        if preset.router == "dense" and all(getattr(preset, k) == v for k, v in shape.items()):
            return name, preset.replace(vocab_size=vocab, tokenizer_pieces=None)
    known = "; ".join(f"{n}: {p.num_layers}×{p.d_model}, d_ff {p.d_ff}, seq {p.max_seq_len}"
                      for n, p in PRESETS.items() if p.router == "dense")
    raise ReleasedCheckpointError(
        f"{where}: shape matches no preset: {num_layers} layers (Megatron --num-layers {num_layers - 1} + the query "
        f"layer) × d {d_model}, d_ff {d_ff}, seq {seq}; known: {known}")


def to_pangu_state(state: dict[str, torch.Tensor], config: PanguConfig, where: Path) -> dict[str, torch.Tensor]:
    """Megatron names → `PanguModel` names; the word table cut to `config.vocab_size` rows."""
    out: dict[str, torch.Tensor] = {}
    last = config.num_layers - 2
    for name, tensor in state.items():
        if name in _EMBEDDINGS:
            target = _EMBEDDINGS[name]
        else:
            m = _LAYER_NAME.match(name)
            if not m or m.group(2) not in _LAYER:
                raise ReleasedCheckpointError(f"{where}: unexpected tensor language_model.{name}")
            block = "query_layer" if m.group(1) is None else f"blocks.{m.group(1)}"
            if m.group(1) is not None and int(m.group(1)) > last:
                raise ReleasedCheckpointError(f"{where}: unexpected tensor language_model.{name}")
            target = f"{block}.{_LAYER[m.group(2)]}.{m.group(3)}"
        if target == "word_embedding.weight":
            tensor = tensor[: config.vocab_size]
        out[target] = tensor
    return out


# -- the whole import ------------------------------------------------------------------------------
def _read_lazy(source: str | Path, trust: bool, vocab: int,
               dtype: str) -> tuple[dict[str, torch.Tensor | Joined], ImportSummary]:
    """Our names → source tensors (memory-mapped where the format allows, split ones still `Joined`)."""
    if dtype not in DTYPES:
        raise ReleasedCheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    fmt = source_format(source)
    notes: list[str] = []
    if fmt == "megatron":
        files, label = locate(source)
        parts = [read_partition(path, trust) for path in files]
        if label == "?" and parts[0]["iteration"] is not None:
            label = str(parts[0]["iteration"])
        merged = merge_partitions([p["tensors"] for p in parts], files)
        where = files[0] if len(files) == 1 else files[0].parent.parent
    else:
        merged, label, where, notes = read_mindspore(Path(source), fmt)
        files = [where]
    preset, config = infer_config(merged, where, vocab, len(files))
    if config.num_heads % len(files):
        raise ReleasedCheckpointError(f"{where}: {len(files)} partitions do not divide the preset's "
                                      f"{config.num_heads} heads")
    words = merged["embedding.word_embeddings.weight"]
    state = to_pangu_state(merged, config, where)
    summary = ImportSummary(
        source=Path(source), files=files, iteration=label, partitions=len(files), preset=preset, config=config,
        padded_vocab=words.shape[0], source_dtype=str(words.dtype).replace("torch.", ""), dtype=dtype,
        parameters=sum(math.prod(v.shape) for v in state.values()), notes=notes, format=fmt,
    )
    return state, summary


def read_released(source: str | Path, trust: bool = False, vocab: int = RELEASED_VOCAB,
                  dtype: str = "fp32") -> tuple[dict[str, torch.Tensor], ImportSummary]:
    """Our state dict and a summary for the released checkpoint at `source` (nothing written)."""
    state, summary = _read_lazy(source, trust, vocab, dtype)
    return {k: materialize(v, DTYPES[dtype]) for k, v in state.items()}, summary


def import_released(source: str | Path, output: str | Path, dtype: str = "fp32", trust: bool = False,
                    tokenizer: str | Path | None = None, cache: str | Path | None = None) -> ImportSummary:
    """Convert the released checkpoint at `source` into a self-contained export at `output`.

    The export: `model.safetensors` + `config.json` (names and shapes checked against `PanguModel` of the
    matched preset, then written one tensor at a time: memory holds one tensor, not the model) and
    `tokenizer/`: the released tokenizer from the `pcl_pangu` wheel, or a copy of `tokenizer` (any
    directory `PanguTokenizer.load` reads) when given.
    """
    from cleaning.outputs import check_output_directory, check_replaceable
    from tokenizer.artifacts import write_json_atomic
    from tokenizer.pangu import PanguTokenizer

    from .checkpoint import TensorSpec, write_config, write_weights
    from .materialize import on_meta
    from .model import PanguModel

    output = Path(output)
    # Before the checkpoint is read: an output that is a file, or that holds something else (a trained export,
    # which an import used to replace in place); an earlier import into it is replaced
    check_output_directory(output, "the export")
    check_replaceable(output, "an imported export", lambda place: (place / PROVENANCE_FILE).is_file())
    state, summary = _read_lazy(source, trust, RELEASED_VOCAB, dtype)
    with on_meta():
        model = PanguModel(summary.config)
    expected = {k: TensorSpec(DTYPES[dtype], tuple(v.shape)) for k, v in model.state_dict().items()}
    for name in sorted(expected.keys() | state.keys()):  # what a strict load_state_dict checks
        got = tuple(state[name].shape) if name in state else None
        want = expected[name].shape if name in expected else None
        if got != want:
            what = f"missing {name} {want}" if got is None else f"unexpected {name}" if want is None \
                else f"{name} is {got}, the preset's is {want}"
            raise ReleasedCheckpointError(f"{summary.files[0]}: tensors do not fit preset {summary.preset}: {what}")
    if tokenizer is not None:
        tok = PanguTokenizer.load(tokenizer)
    else:
        from tokenizer.released import load_released_tokenizer
        tok = load_released_tokenizer(cache)
    if tok.vocab_size != summary.config.vocab_size:
        raise ReleasedCheckpointError(f"{tok.origin}: tokenizer has {tok.vocab_size} pieces, the model "
                                      f"{summary.config.vocab_size} rows")
    output.mkdir(parents=True, exist_ok=True)  # once the tokenizer is found: a missing one leaves no folder
    # One tensor in memory at a time: read (or joined from its partitions), cast, written.
    write_weights(output, expected, lambda name: materialize(state[name]))
    write_config(summary.config, output)
    summary.tokenizer = tok.save(output / "tokenizer", {"imported_with": str(summary.source)})
    tok.close()
    write_json_atomic(output / PROVENANCE_FILE, summary.provenance())
    summary.output = output
    return summary
