"""PanGu-α (dense) and PanGu-Σ / MoE (sparse) language models in plain PyTorch (no Prefect here)."""

import os
import sys
from pathlib import Path

# DeepSpeed JIT-builds its CPU ops (cpu_adam, shm comm) into TORCH_EXTENSIONS_DIR. Two environments
# sharing the default ~/.cache/torch_extensions rebuild each other's ops on every run (the build
# files name their own source paths), so each environment keeps its own; child processes inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# They are built by the `ninja` on PATH. The environment brings its own (the `ninja` package, beside the
# interpreter) and a system may have another: ninja 1.11 and 1.13 record build commands differently, so
# processes that find different ones rebuild each other's ops every time (~40 s each on 2 cores). The
# environment's own goes first, as in an activated environment.
_BIN = str(Path(sys.executable).parent)
if (Path(_BIN) / "ninja").is_file() and os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])

from .cpuinfo_cache import remember_cpu_info

remember_cpu_info()  # DeepSpeed's questions about the CPU, answered once (pangu_model/cpuinfo_cache.py)

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
