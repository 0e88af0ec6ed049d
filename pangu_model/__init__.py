"""PanGu-α (dense) and PanGu-Σ / MoE (sparse) language models in plain PyTorch (no Prefect here)."""

import os
import sys
from pathlib import Path

# DeepSpeed JIT-builds its CPU ops (cpu_adam, shm comm) into TORCH_EXTENSIONS_DIR. Two environments
# sharing the default ~/.cache/torch_extensions rebuild each other's ops on every run (the build
# files name their own source paths), so each environment keeps its own; child processes inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, PanguConfig, get_config
from .generate import generate
from .info import describe, format_description
from .inherit import extract_domain, sigma_from_dense
from .model import KVCache, ModelOutput, PanguModel

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelOutput",
    "PanguConfig",
    "PanguModel",
    "describe",
    "extract_domain",
    "format_description",
    "generate",
    "get_config",
    "load_checkpoint",
    "save_checkpoint",
    "sigma_from_dense",
]
