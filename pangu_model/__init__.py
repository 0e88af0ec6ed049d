"""PanGu-α (dense) and PanGu-Σ / MoE (sparse) language models in plain PyTorch (no Prefect here)."""

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
