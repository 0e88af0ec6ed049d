"""ECSS's host optimizer: DeepSpeed's CPU Adam kernel, called with the GIL released.

ECSS's delayed host update (ecss.py) runs Adam on a worker thread while the training thread runs the next
step. DeepSpeed's binding of its kernel (`adam_update`) keeps Python's GIL for the whole tensor it is given;
at sigma-1t widths one expert row is about 100M values, so for every row the training thread could not run a
line of Python or launch a kernel, and the overlap the delayed update exists for was lost
(`benchmarks/host_adam_gil.py` measures it). `HostAdamBuilder` JIT-builds the same kernel source
(csrc/adam/cpu_adam_impl.cpp, with the host compiler, as DeepSpeed builds cpu_adam) with a binding that
releases the GIL (csrc/host_adam.cpp); `make ops` builds it ahead.

`HostAdam` is DeepSpeedCPUAdam's update (AdamW mode, lazy per-parameter step counts, fp32 states, the same
state dict) with one change: the kernel derived β^t from its previous call, by one multiply when the step
follows it and by `pow` otherwise, so a run resumed from a checkpoint (a new kernel state, no previous call)
rounded β^t differently from the uninterrupted run and its losses parted by ~5e-7 after a `kill -9`. Each
update here starts from a kernel state reset to step 0, so β^t is always `pow(β, t)`.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from deepspeed.ops.op_builder.cpu.cpu_adam import CPUAdamBuilder

from cleaning.writers import write_bytes_atomic

SOURCE = Path(__file__).resolve().parent / "csrc" / "host_adam.cpp"
_EMPTY = torch.empty(0)
_IDS = itertools.count()


class HostAdamBuilder(CPUAdamBuilder):
    """DeepSpeed's cpu_adam build (its flags, includes and kernel source) with our binding in place of its own."""

    NAME = "pangu_host_adam"

    def absolute_name(self) -> str:
        return f"pangu_model.{self.NAME}_op"

    def sources(self) -> list[str]:
        return [_content_addressed(SOURCE), "csrc/adam/cpu_adam_impl.cpp"]


def _content_addressed(source: Path) -> str:
    """`source` copied to a path that its content names, under TORCH_EXTENSIONS_DIR. torch's JIT build writes
    the source's absolute path into its ninja file, so the op built from one checkout was built again (40-60 s
    on 2 cores) by the first training run from any other checkout of the same code (a CI clone, the end-to-end
    test's copy of the repository, a second working tree), and again on the way back."""
    data = source.read_bytes()
    target = (Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "pangu_sources"
              / f"{source.stem}-{hashlib.sha256(data).hexdigest()[:16]}{source.suffix}")
    if not target.is_file() or target.read_bytes() != data:
        write_bytes_atomic(target, data)
    return str(target)


class HostAdam(torch.optim.Optimizer):
    """Adam(W) on host tensors with DeepSpeed's CPU kernel, the GIL released while it runs."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, adamw_mode: bool = True,
                 bias_correction: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        amsgrad=False)
        super().__init__(params, defaults)
        self.kernel = HostAdamBuilder().load()
        self.kernel_id = next(_IDS)
        self.kernel.create_adam(self.kernel_id, lr, betas[0], betas[1], eps, weight_decay, adamw_mode, False)

    def __del__(self) -> None:
        kernel = getattr(self, "kernel", None)
        if kernel is not None:
            kernel.destroy_adam(self.kernel_id)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["bias_correction"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.device.type != "cpu":
                    raise RuntimeError(f"HostAdam updates host tensors; a parameter is on {p.device}")
                state = self.state[p]
                if not state:  # as DeepSpeedCPUAdam: fp32 states made at the parameter's first step
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                # An empty update at step 0 first: the kernel then takes β^t as pow(β, t) (β itself at t = 1),
                # not from its previous call (`IncrementStep`), so a resumed run rounds as the uninterrupted one.
                self.kernel.adam_update(self.kernel_id, 0, *hyper, _EMPTY, _EMPTY, _EMPTY, _EMPTY)
                self.kernel.adam_update(self.kernel_id, state["step"], *hyper, p.data, p.grad.data,
                                        state["exp_avg"], state["exp_avg_sq"])
        return loss
