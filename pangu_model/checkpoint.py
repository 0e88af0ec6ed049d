"""Framework-neutral checkpoints: `model.safetensors` + `config.json` (SPEC §2.1).

safetensors only: loading never unpickles anything. The tied head is not a tensor of its own (the model
multiplies by `word_embedding.weight`), so the file holds each weight once and the tie survives loading.
Writes go to temporary names and are renamed, so an interrupted save leaves no partial checkpoint.

The file is laid out by `SafetensorsWriter` rather than `safetensors.save_file`: its header is fixed
before any tensor is written, so several processes can each write their own rows of a tensor into one
file (`pangu_model.train` exports PanGu-Σ this way: every expert shard writes its experts, nobody
gathers them). The layout is the safetensors format: an 8-byte little-endian header length, a JSON
header (tensors in name order, padded with spaces to 8 bytes), then the tensors back to back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cleaning.errors import one_line
from cleaning.writers import write_bytes_atomic

from .config import PanguConfig
from .materialize import on_meta
from .model import PanguModel
from .moe import EXPERT_WEIGHTS

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tensor.dtype, tuple(tensor.shape))


class SafetensorsWriter:
    """A safetensors file whose layout is fixed up front, written in pieces by one or many processes.

    One process calls `create()` (header, file sized to its final length); then any process may
    `write(name, rows, first_row)` into it, each piece at its own offset, and `close()` (fsync) when
    done; the file is complete when every byte of every tensor has been written by someone. Equal
    tensors give equal bytes: content hashes identify checkpoints in the lineage and in the
    evaluation cache.
    """

    def __init__(self, path: str | os.PathLike[str], specs: dict[str, TensorSpec]) -> None:
        self.path = Path(path)
        self.specs = dict(sorted(specs.items()))
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, spec in self.specs.items():
            if spec.dtype not in _DTYPE_NAMES:
                raise TypeError(f"{name}: dtype {spec.dtype} has no safetensors name here")
            header[name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[name] = offset
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.header = len(text).to_bytes(8, "little") + text
        self.size = len(self.header) + offset
        self._fd: int | None = None

    def create(self) -> None:
        with open(self.path, "wb") as fh:
            fh.write(self.header)
            fh.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write `tensor` as rows [first_row, first_row + len) of tensor `name` (the whole tensor by default)."""
        spec = self.specs[name]
        tensor = tensor.detach().to("cpu", spec.dtype).contiguous()
        rows = spec.shape[0] if spec.shape else 1
        if tuple(tensor.shape[1:]) != spec.shape[1:] or first_row < 0 or first_row + (
                tensor.shape[0] if tensor.dim() else 1) > rows:
            raise ValueError(f"{name}: rows {first_row}+{tuple(tensor.shape)} do not fit {spec.shape}")
        row_bytes = spec.nbytes // rows if rows else 0
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        position = len(self.header) + self.offsets[name] + first_row * row_bytes
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        view = memoryview(data)
        while view.nbytes:
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def close(self) -> None:
        """Flush this process's pieces to disk (other writers' pieces are theirs to flush)."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def write_config(config: PanguConfig, directory: str | os.PathLike[str]) -> None:
    payload = {"format_version": FORMAT_VERSION, "model_type": "pangu", **config.saved_fields()}
    write_bytes_atomic(Path(directory) / CONFIG_NAME,
                       (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_weights(directory: str | os.PathLike[str], specs: dict[str, TensorSpec],
                  tensor: Callable[[str], torch.Tensor]) -> Path:
    """Write `directory/model.safetensors` (atomically) with the tensors `specs` names, asking `tensor(name)`
    for each in turn: a caller converting from another format holds one tensor at a time, not the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(directory / f".{WEIGHTS_NAME}.tmp", specs)
    writer.create()
    try:
        for name in writer.specs:
            writer.write(name, tensor(name))
    finally:
        writer.close()
    os.replace(writer.path, directory / WEIGHTS_NAME)
    return directory / WEIGHTS_NAME


def save_checkpoint(model: PanguModel, directory: str | os.PathLike[str]) -> Path:
    """Write the model's weights, routing tables and config into `directory`; return it."""
    directory = Path(directory)
    tensors = model.state_dict()
    write_weights(directory, {k: TensorSpec.of(t) for k, t in tensors.items()}, tensors.__getitem__)
    write_config(model.config, directory)
    return directory


def load_config(directory: str | os.PathLike[str]) -> PanguConfig:
    path = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():
        raise NotADirectoryError(f"{directory}: a file, not an export directory ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such export directory ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an export directory: no {CONFIG_NAME} (an export holds "
                                f"{CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg[:1].lower()}{exc.msg[1:]} at line {exc.lineno}, "
                         f"column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}): not a config.json") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a model config (a JSON {type(payload).__name__}, not an object)")
    if "transformers_version" in payload:  # `pangu model export-hf`'s output, given where an export goes
        raise ValueError(f"{path}: a transformers config (pangu model export-hf writes one), not an export's; load "
                         "that directory with transformers, or give the export it was written from")
    payload.pop("format_version", None)
    payload.pop("model_type", None)
    try:
        return PanguConfig.model_validate(payload)
    except ValueError as exc:  # pydantic's ValidationError: which file, then the fields in one line
        raise ValueError(f"{path}: {one_line(exc)}") from exc


def load_checkpoint(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    expert_shard: tuple[int, int] | None = None,
) -> PanguModel:
    """Rebuild the model from `config.json` and adopt the tensors of `model.safetensors` as they are.

    The model is built on the meta device and the loaded tensors are assigned, so no memory is spent on a
    throw-away random initialisation. The model comes back in eval mode. With `expert_shard` (rank,
    size) only that shard of every RRE layer's experts is read from disk (see `PanguModel`).
    """
    directory = Path(directory)
    config = load_config(directory)
    with on_meta():
        model = PanguModel(config, expert_shard)
    if expert_shard is None:
        with _readable(directory / WEIGHTS_NAME):
            state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
        _check_shapes(directory, {name: tuple(t.shape) for name, t in model.state_dict().items()},
                      {name: tuple(t.shape) for name, t in state.items()}, extra_allowed=False)
    else:
        state = read_parts(directory, model, device)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def read_parts(directory: str | os.PathLike[str], model: PanguModel, device: str | torch.device = "cpu",
               keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `directory`'s model.safetensors that `model` (built on the meta device, of the same
    architecture) holds, each read as the part it holds: an RRE layer's expert shard as rows, a
    tensor-parallel slice along its split dimension at its tensor rank, and with `keep` (a module's
    qualified name → whether this rank builds it: a pipeline stage's) the kept modules' tensors only.
    safetensors reads just those bytes, so no rank of a large model holds the whole file."""
    from safetensors import safe_open

    from .tensor_parallel import split_dims

    first_rows = {f"{name}.experts.{weight}": ffn.experts.first_expert
                  for name, ffn in model.sparse_layers().items() for weight in EXPERT_WEIGHTS}
    split = split_dims(model) if model.tp is not None else {}
    # name → (its shape in the file, as config.json makes it; the part this rank reads, None: all of it)
    parts: dict[str, tuple[tuple[int, ...], tuple[slice, ...] | None]] = {}
    for name, target in model.state_dict().items():
        if keep is not None and not keep(name.rpartition(".")[0]):
            continue
        shape, part = list(target.shape), None
        if name in first_rows:
            first = first_rows[name]
            shape[0] = model.config.total_experts
            part = (slice(first, first + target.shape[0]),)
        elif name in split:
            dim, width = split[name], target.shape[split[name]]
            shape[dim] *= model.tp.size
            start = model.tp.rank * width
            part = (slice(None),) * dim + (slice(start, start + width),)
        parts[name] = (tuple(shape), part)
    path = Path(directory) / WEIGHTS_NAME
    with _readable(path), safe_open(str(path), framework="pt", device=str(device)) as handle:
        _check_shapes(directory, {name: shape for name, (shape, _) in parts.items()}, _stored_shapes(path),
                      extra_allowed=True)  # the header safe_open accepted
        return {name: handle.get_tensor(name) if part is None else handle.get_slice(name)[part]
                for name, (_, part) in parts.items()}


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """safetensors' own error for a file it cannot parse, as one line that names the file."""
    try:
        yield
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise ValueError(f"{path}: not a readable safetensors file ({reason}): the export is damaged or "
                         "was cut off while written") from exc


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a safetensors file, from its header (8-byte length, JSON)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "absent"
    return "x".join(str(size) for size in shape) if shape else "a scalar"


def _check_shapes(directory: str | os.PathLike[str], wanted: dict[str, tuple[int, ...]],
                  found: dict[str, tuple[int, ...]], extra_allowed: bool) -> None:
    """ValueError, in one line, when the tensors of model.safetensors (`found`: name → shape) are not those
    the export's config.json makes (`wanted`): a config edited, or taken from another export. Checked before
    `load_state_dict`, whose error is a many-line RuntimeError."""
    names = sorted(set(wanted) | (set() if extra_allowed else set(found)))
    wrong = [name for name in names if wanted.get(name) != found.get(name)]
    if not wrong:
        return
    first = wrong[0]
    more = f"; and {len(wrong) - 1} more tensor(s) differ" if len(wrong) > 1 else ""
    raise ValueError(
        f"{directory}: the weights do not match {CONFIG_NAME} ({first}: {_shape_text(found.get(first))} in the "
        f"file, {_shape_text(wanted.get(first))} in the config){more}; {CONFIG_NAME} and {WEIGHTS_NAME} must "
        "come from the same export")
