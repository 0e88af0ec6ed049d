"""DeepSpeedCPUAdam in slices, so that the training thread runs while the host optimizer works.

DeepSpeed's `adam_update` binding keeps the GIL for the whole tensor it is given. ECSS's delayed host
update (ecss.py) runs Adam on a worker thread beside the next training step; at sigma-1t widths one expert
row is about 100M values, and for every such call the training thread could not run a line of Python or
launch a kernel: the overlap the delayed update exists for was mostly lost (measured by
`benchmarks/host_adam_gil.py`). Here each row is updated in slices of `SLICE_ELEMENTS`, and between two
calls another thread may take the GIL.

Each update is DeepSpeed's kernel. The slices start on multiples of its SIMD block (at most 16 lanes × 8,
DeepSpeed's own rule for ZenFlow's slices), so each element takes the same vector or scalar path as in one
call, and a call that repeats the step of the call before it keeps that call's β^t (`IncrementStep`). One
thing is changed on purpose: the kernel derived β^t from its previous call, by one multiply when the step
follows it and by `pow` otherwise, so a run resumed from a checkpoint (a new kernel object, no previous call)
rounded β^t differently from the uninterrupted run and its losses parted by ~5e-7 after a `kill -9`. Here β^t
is always `pow(β, t)`, whatever came before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

SIMD_BLOCK = 16 * 8  # AVX-512 lanes × the kernel's span (Step_8): the widest block it rounds a tensor to
_EMPTY = torch.empty(0)
SLICE_ELEMENTS = 1 << 20  # 4 MiB of fp32 values: about a millisecond of Adam on a host's cores


class SlicedCPUAdam(DeepSpeedCPUAdam):
    """`DeepSpeedCPUAdam` (AdamW mode, lazy per-parameter steps, fp32 states) whose step updates each
    parameter in slices of `slice_elements` values (a multiple of `SIMD_BLOCK`), with β^t = pow(β, t)."""

    def __init__(self, params: Any, slice_elements: int = SLICE_ELEMENTS, **options: Any) -> None:
        if slice_elements <= 0 or slice_elements % SIMD_BLOCK:
            raise ValueError(f"slice_elements must be a positive multiple of {SIMD_BLOCK} (got {slice_elements})")
        super().__init__(params, **options)
        self.slice_elements = slice_elements

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.device.type != "cpu":
                    raise RuntimeError(f"SlicedCPUAdam updates host tensors; a parameter is on {p.device}")
                state = self.state[p]
                if not state:  # as DeepSpeedCPUAdam: states made at the parameter's first step
                    state["step"] = 0
                    dtype = torch.float if self.fp32_optimizer_states else p.dtype
                    state["exp_avg"] = torch.zeros_like(p.data, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p.data, dtype=dtype)
                state["step"] += 1
                hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["bias_correction"])
                # An empty update at step 0 first: the kernel then takes β^t as pow(β, t) (β itself at t = 1),
                # not from its previous call (`IncrementStep`), so a resumed run rounds as the uninterrupted one.
                self.ds_opt_adam.adam_update(self.opt_id, 0, *hyper, *[_EMPTY] * 4)
                # view(-1), not reshape: the update writes in place, so a copy would lose it
                tensors = [t.view(-1) for t in (p.data, p.grad.data, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, tensors[0].numel(), self.slice_elements):
                    parts = [t[start: start + self.slice_elements] for t in tensors]
                    self.ds_opt_adam.adam_update(self.opt_id, state["step"], *hyper, *parts)
        return loss
