"""Framework-neutral checkpoints: `model.safetensors` + `config.json` (SPEC §2.1).

safetensors only: loading never unpickles anything. The tied head is not a tensor of its own (the model
multiplies by `word_embedding.weight`), so the file holds each weight once and the tie survives loading.
Writes go to temporary names and are renamed, so an interrupted save leaves no partial checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import PanguConfig
from .model import PanguModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def save_checkpoint(model: PanguModel, directory: str | os.PathLike[str]) -> Path:
    """Write the model's weights, routing tables and config into `directory`; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    config_payload = {"format_version": FORMAT_VERSION, "model_type": "pangu", **model.config.model_dump()}

    weights_tmp = directory / f".{WEIGHTS_NAME}.tmp"
    config_tmp = directory / f".{CONFIG_NAME}.tmp"
    # One metadata key only: safetensors keeps the header's metadata in a hash map whose order
    # changes from process to process, and equal weights must give equal bytes (content hashes
    # identify checkpoints in the lineage and in the evaluation cache). config.json names the model.
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(config_payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)
    return directory


def load_config(directory: str | os.PathLike[str]) -> PanguConfig:
    payload = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    payload.pop("format_version", None)
    payload.pop("model_type", None)
    return PanguConfig.model_validate(payload)


def load_checkpoint(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PanguModel:
    """Rebuild the model from `config.json` and adopt the tensors of `model.safetensors` as they are.

    The model is built on the meta device and the loaded tensors are assigned, so no memory is spent on a
    throw-away random initialisation. The model comes back in eval mode.
    """
    directory = Path(directory)
    config = load_config(directory)
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    with torch.device("meta"):
        model = PanguModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
