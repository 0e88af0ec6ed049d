"""Pinned host memory at the size asked for: ECSS's masters, shadows and gradient landing buffer.

torch's caching host allocator rounds every pinned block up to a power of two and keeps freed blocks for
reuse. At PanGu-Σ widths that is most of a node's host memory: one expert's fp32 `w_in` at sigma-1t is
400 MiB and pins 512 MiB, three of them pin 2 GiB, and each time the landing buffer grows the old one
stays pinned. Large blocks gain nothing from either: ECSS allocates them once. `exact_pinned_blocks()`
tells the allocator to pin blocks above `EXACT_ABOVE_MB` at their size and to give them back when freed
(its `pinned_max_round_threshold_mb` and `pinned_max_cached_size_mb` settings; torch 2.13 has them).
"""
from __future__ import annotations

import os

import torch

EXACT_ABOVE_MB = 64
SETTINGS = f"pinned_max_round_threshold_mb:{EXACT_ABOVE_MB},pinned_max_cached_size_mb:{EXACT_ABOVE_MB}"


def exact_pinned_blocks() -> bool:
    """Apply `SETTINGS` to the allocators; whether they were applied. Not when the user configured the
    allocators (PYTORCH_ALLOC_CONF, PYTORCH_CUDA_ALLOC_CONF): applying settings resets the ones a call does
    not name, so theirs would be lost; they can add these two keys to their own. Not either with a torch
    whose parser does not know the keys: its rounding stays (`torch.cuda.host_memory_stats()` shows it)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "")
    configured = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or getter()
    if setter is None or (configured and configured != SETTINGS):
        return False
    try:
        setter(SETTINGS)
    except RuntimeError:  # "Unrecognized CachingAllocator option"
        return False
    return True
