"""Optimiser settings, parameter groups and the warmup + cosine learning-rate schedule.

PanGu-α code defaults (SPEC §5.1): Adam(W), warmup then cosine decay, grad clip 1.0, no weight decay on
LayerNorm and biases. PanGu-Σ (SPEC §5.2, secondary source) uses a *hybrid* Adam ε: 1e-8 for dense
parameters and 1e-20 for expert parameters, so the groups are split on two axes: decay / no decay and
dense / expert. Every group carries its own `eps` and `weight_decay`, which torch's AdamW, DeepSpeed's
FusedAdam and DeepSpeedCPUAdam all read per group.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


class OptimConfig(BaseModel):
    """Adam(W) hyper-parameters and the learning-rate schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate (after warmup).")
    min_lr: float = Field(1e-5, ge=0.0, description="Learning rate at and after the end of the cosine decay.")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0.0)
    eps: float = Field(1e-8, gt=0.0, description="Adam ε of dense parameters.")
    expert_eps: float = Field(1e-20, gt=0.0, description="Adam ε of expert parameters (PanGu-Σ: 1e-20).")
    warmup_steps: int = Field(100, ge=0)
    decay_steps: int | None = Field(
        None, ge=1, description="Optimizer step at which the cosine reaches min_lr; None: the run's train_steps."
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables clipping.")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} > lr {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1): {self.betas}")
        return self


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """lr(step) / config.lr for the `step`-th optimizer update (0-based).

    Linear warmup that starts above zero (the first update already moves: (step+1)/warmup), then a
    half cosine from lr down to min_lr reached at `decay_steps`, flat afterwards. DeepSpeed's own
    WarmupCosineLR is not used because its first step has lr 0 and its cosine starts one step late.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    decay_end = config.decay_steps if config.decay_steps is not None else total_steps
    span = max(1, decay_end - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, config: OptimConfig, total_steps: int) -> float:
    return config.lr * lr_factor(step, config, total_steps)


@lru_cache(maxsize=64)
def _parse(config_json: str) -> OptimConfig:
    return OptimConfig.model_validate_json(config_json)


class _Factor:
    """The lr lambda: `lr_factor` of this run's config and total steps."""

    def __init__(self, config: OptimConfig, total_steps: int) -> None:
        self.config_json = config.model_dump_json()
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, _parse(self.config_json), self.total_steps)


class Schedule(LambdaLR):
    """LambdaLR whose checkpointed state is the step count alone.

    A plain LambdaLR saves its lambda's attributes and the base learning rates, and restores them on
    resume: a run resumed with more steps (or another decay or lr) would keep the old schedule for the
    dense parameters while ECSS's host experts follow `lr_at` of the new one. Here the schedule stays
    one function of (step, this run's config, this run's total) for every parameter after any resume.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self.apply()

    def apply(self) -> None:
        """Set every group's lr for the next update (after a restored optimizer brought back old ones)."""
        lrs = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> Schedule:
    """The schedule as a torch scheduler; DeepSpeed's engine steps it after every optimizer step."""
    return Schedule(optimizer, _Factor(config, total_steps))


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------
_EXPERT_MARKERS = (".experts.", "deepspeed_moe.experts")
_BIAS_SUFFIXES = ("bias", ".b_in", ".b_out")


def is_expert_parameter(name: str) -> bool:
    """Routed-expert weights: our ExpertBank (`...ffn.experts.w_in`) or a DeepSpeed MoE expert."""
    return any(marker in name for marker in _EXPERT_MARKERS) and ".shared_experts." not in name


def decays(name: str, module: nn.Module) -> bool:
    """Weight decay applies to matrices and embeddings, never to LayerNorm parameters or biases."""
    if isinstance(module, nn.LayerNorm):
        return False
    return not name.endswith(_BIAS_SUFFIXES)


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """Up to four groups: {dense, expert} × {decay, no_decay}, each with its own eps and weight_decay.

    Parameters that do not require grad are left out. Group names are kept (DeepSpeed's MoE group
    splitting and our logs read them).
    """
    owners = {f"{module_name}.{p}" if module_name else p: module
              for module_name, module in model.named_modules() for p, _ in module.named_parameters(recurse=False)}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (is_expert_parameter(name), decays(name, owners[name]))
        buckets.setdefault(key, []).append(param)
    groups = []
    for (expert, decay), params in sorted(buckets.items()):
        groups.append({
            "name": f"{'expert' if expert else 'dense'}_{'decay' if decay else 'no_decay'}",
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "eps": config.expert_eps if expert else config.eps,
        })
    return groups


def group_of(groups: list[dict[str, Any]], param: torch.Tensor) -> str:
    """Name of the group holding `param` (for tests and logs)."""
    for group in groups:
        if any(p is param for p in group["params"]):
            return group["name"]
    raise KeyError("parameter is in no group")


__all__ = [
    "OptimConfig",
    "Schedule",
    "build_scheduler",
    "decays",
    "group_of",
    "is_expert_parameter",
    "lr_at",
    "lr_factor",
    "parameter_groups",
]
