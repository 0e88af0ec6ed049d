"""GPU speed switches that live outside the model's maths: TF32, bf16 autocast, per-block `torch.compile`.

Nothing here runs on import, and nothing changes a CPU run: the trainer calls these once, at setup.

- `configure_cuda_matmul()`: fp32 matmuls (and cuDNN convolutions) may use TF32 tensor cores on
  Ampere and later. Only the CUDA backends are touched (`torch.set_float32_matmul_precision` would also
  switch oneDNN on some CPUs).
- `autocast(device, precision)`: bf16 autocast around forward + loss (fp32 weights and optimiser,
  bf16 matmuls; LayerNorm, softmax and the loss stay fp32 under autocast's own rules). Not needed
  when DeepSpeed's `bf16` mode already casts the whole model to bf16.
- `maybe_compile(model, enabled)`: compiles every transformer block in place (`nn.Module.compile`,
  torchtitan-style per-block compilation): parameter names, `state_dict` keys, DeepSpeed's wrapping
  and gradient checkpointing stay as they are, and the embedding / loss code stays eager.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def configure_cuda_matmul(tf32: bool = True) -> None:
    """Let CUDA fp32 matmuls and convolutions use TF32 (or forbid it with `tf32=False`)."""
    # The older flags, not torch ≥ 2.9's `fp32_precision`: setting them sets both spellings alike, while
    # setting only `fp32_precision` leaves every reader of the older ones (inductor's autotuning,
    # `torch.get_float32_matmul_precision()`) failing on "a mix of the legacy and new APIs".
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device | str, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for `precision == "bf16"`; a no-op context elsewhere (CPU runs stay as they are)."""
    device = torch.device(device)
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model: nn.Module, enabled: bool, **compile_options: Any) -> nn.Module:
    """Compile each block of a `PanguModel` in place when `enabled`; returns the same model.

    Call it after the model is built and moved/cast (and after any expert replacement such as DeepSpeed
    MoE or ECSS), before `deepspeed.initialize`. `compile_options` go to `torch.compile` (e.g.
    `mode="max-autotune-no-cudagraphs"`); the default is plain `torch.compile`.
    """
    if not enabled:
        return model
    if torch.cuda.is_available():  # read before tracing: the blocks then see a constant (moe.py)
        from .moe import cuda_capability_major

        cuda_capability_major(torch.cuda.current_device())
    for block in model.layers:
        block.compile(**compile_options)
    return model


__all__ = ["configure_cuda_matmul", "autocast", "maybe_compile"]
