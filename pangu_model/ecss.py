"""ECSS (Expert Computation and Storage Separation, PanGu-Σ, SPEC §5.2) on top of DeepSpeed's pieces.

DeepSpeed's `offload_optimizer` is engine-wide; there is no switch that offloads only the experts. So the
placement is ours:

* every Random-Routed-Experts layer's `ExpertBank` is replaced by a `HostExpertBank`: the fp32 master
  weights of all its experts live in host memory (pinned when CUDA exists, so the per-step copies are
  asynchronous DMA), next to their Adam states;
* RRE routing depends only on the domain id and the token id, so the experts a step needs are known
  from the batch *before* the forward pass (`ExpertOffload.plan`); only those are copied to the
  device (`fetch`), in the compute dtype, as one compact tensor per weight;
* after backward, only their gradients go back to the host and DeepSpeedCPUAdam (ZeRO-Offload's CPU
  Adam) updates only those experts (`step`); an expert that no batch routes to is untouched, its Adam
  state included (per-expert step counts keep the bias correction right: "lazy" Adam);
* the dense part never sees any of this: it is an ordinary module under the DeepSpeed engine (ZeRO).

The expert tensors are not `nn.Parameter`s of the model, so DeepSpeed neither flattens, partitions,
casts nor reduces them. They still appear in `state_dict()` under the `ExpertBank` names, so the
engine's checkpoint holds the masters and `model.safetensors` exports are unchanged.

Deviations (documented, not hidden): expert gradients are clipped by their own global norm (DeepSpeed
clips the dense part by its norm before we could add ours), and with data parallelism the routed sets
of all ranks are united so every rank fetches and updates the same experts.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .moe import ExpertBank, RandomRoutedExperts, grouped_experts
from .optim import OptimConfig

WEIGHT_NAMES = ("w_in", "b_in", "w_out", "b_out")
_DECAYED = ("w_in", "w_out")  # biases take no weight decay (optim.decays)


class HostExpertBank(nn.Module):
    """Drop-in for `ExpertBank`: host-resident masters, a compact device copy of the fetched experts."""

    def __init__(self, bank: ExpertBank, pin: bool) -> None:
        super().__init__()
        self.num_experts = bank.num_experts
        self.pinned = pin
        self.host: dict[str, torch.Tensor] = {}
        for name in WEIGHT_NAMES:
            source = getattr(bank, name).detach()
            master = torch.empty(source.shape, dtype=torch.float32, pin_memory=pin)
            master.copy_(source)
            self.host[name] = master
        # One optimizer "parameter" per expert and weight: a view into the master, so the Adam update
        # writes the master in place and state['step'] counts that expert's own updates.
        self.expert_params: dict[str, list[torch.Tensor]] = {
            name: [nn.Parameter(self.host[name][e], requires_grad=False) for e in range(self.num_experts)]
            for name in WEIGHT_NAMES
        }
        self.active = torch.zeros(0, dtype=torch.long)
        self.device_weights: dict[str, torch.Tensor] = {}
        self._slot_of: torch.Tensor | None = None

    # ---- placement ---------------------------------------------------------------------------
    def fetch(self, experts: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        """Copy the masters of `experts` (sorted global ids) to `device` as fresh leaf tensors."""
        experts = experts.to("cpu", torch.long)
        self.active = experts
        self.device_weights = {
            name: self.host[name].index_select(0, experts)
            .to(device=device, dtype=dtype, non_blocking=self.pinned)
            .requires_grad_(True)
            for name in WEIGHT_NAMES
        }
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot_of[experts] = torch.arange(len(experts))
        self._slot_of = slot_of.to(device)

    def release(self) -> None:
        self.device_weights = {}
        self._slot_of = None
        self.active = torch.zeros(0, dtype=torch.long)

    def gradients(self) -> dict[str, torch.Tensor | None]:
        return {name: w.grad for name, w in self.device_weights.items()}

    # ---- compute (the ExpertBank algorithm over slots) -------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        token_index: torch.Tensor,
        gate_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._slot_of is None:
            raise RuntimeError("ECSS: forward before fetch(); call ExpertOffload.fetch(plan) for this batch")
        slots = self._slot_of[expert_index]
        if bool((slots < 0).any()):
            missing = sorted(set(expert_index[slots < 0].tolist()))
            raise RuntimeError(f"ECSS: experts {missing[:8]} were routed to but not fetched")
        w = self.device_weights
        # Slots are in ascending expert order, so the sort and the index_add order match ExpertBank's
        # and the numbers are the same as without ECSS.
        return grouped_experts(x, slots, token_index, gate_weight, len(self.active),
                               w["w_in"], w["b_in"], w["w_out"], w["b_out"])

    # ---- the masters are this module's state --------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in WEIGHT_NAMES:
            destination[prefix + name] = self.host[name] if keep_vars else self.host[name].detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        for name in WEIGHT_NAMES:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != self.host[name].shape:
                error_msgs.append(f"{key}: shape {tuple(value.shape)} vs {tuple(self.host[name].shape)}")
                continue
            with torch.no_grad():
                self.host[name].copy_(value)


class ExpertOffload:
    """Host placement and host update of every RRE layer's experts of one model (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        group: Any = None,
        pin: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.group = group
        self.optim = optim
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.layers: dict[str, RandomRoutedExperts] = {}
        self.banks: dict[str, HostExpertBank] = {}
        for name, module in model.named_modules():
            if isinstance(module, RandomRoutedExperts):
                if not isinstance(module.experts, ExpertBank):
                    raise TypeError(f"{name}: experts are {type(module.experts).__name__}, not an ExpertBank")
                bank = HostExpertBank(module.experts, self.pin)
                module.experts = bank  # the device ExpertBank is dropped here: its memory is freed
                self.layers[name] = module
                self.banks[name] = bank
        if not self.layers:
            raise ValueError("ECSS needs Random Routed Experts layers (router 'rre'); this model has none")
        decay = [p for bank in self.banks.values() for n in _DECAYED for p in bank.expert_params[n]]
        no_decay = [p for bank in self.banks.values() for n in WEIGHT_NAMES if n not in _DECAYED
                    for p in bank.expert_params[n]]
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self.optimizer = DeepSpeedCPUAdam(
            [
                {"params": decay, "weight_decay": optim.weight_decay, "eps": optim.expert_eps},
                {"params": no_decay, "weight_decay": 0.0, "eps": optim.expert_eps},
            ],
            lr=optim.lr, betas=tuple(optim.betas), eps=optim.expert_eps, adamw_mode=True,
        )
        self.last_fetched: dict[str, list[int]] = {}

    # ---- per step -----------------------------------------------------------------------------
    def plan(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Layer → sorted expert ids that the micro-batches of one step route to (united over ranks)."""
        batches = list(batches)
        masks = []
        for layer in self.layers.values():
            mask = torch.zeros(layer.experts.num_experts, dtype=torch.bool, device=self.device)
            for batch in batches:
                ids = layer.route(batch["input_ids"].to(self.device), batch["domain_ids"].to(self.device))
                mask[ids.reshape(-1)] = True
            masks.append(mask)
        stacked = torch.stack(masks).to(torch.int32)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=self.group)
        return {name: row.nonzero().flatten().cpu() for name, row in zip(self.layers, stacked)}

    def fetch(self, plan: dict[str, torch.Tensor]) -> None:
        for name, bank in self.banks.items():
            bank.fetch(plan[name], self.device, self.dtype)
        self.last_fetched = {name: plan[name].tolist() for name in self.banks}

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0, skip: bool = False) -> dict[str, float]:
        """Reduce, unscale and clip the fetched experts' gradients, update them on the host, release.

        `grad_scale` is the fp16 loss scale the gradients carry; `skip` (an fp16 overflow step that the
        engine skipped) releases without updating, as the dense part does.
        """
        grads: list[torch.Tensor] = []
        owners: list[tuple[HostExpertBank, str]] = []
        for bank in self.banks.values():
            for name, grad in bank.gradients().items():
                if grad is not None:
                    grads.append(grad)
                    owners.append((bank, name))
        stats = {"expert_grad_norm": 0.0, "experts_updated": 0}
        if skip or not grads:
            self.release()
            return stats
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        world = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(flat, group=self.group)
        flat.div_(grad_scale * world)
        norm = float(flat.norm())
        if self.optim.grad_clip > 0 and norm > self.optim.grad_clip:
            flat.mul_(self.optim.grad_clip / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        host_flat = flat.to("cpu")
        offset = 0
        for grad, (bank, name) in zip(grads, owners):
            host_grad = host_flat[offset: offset + grad.numel()].view(grad.shape)
            offset += grad.numel()
            for slot, expert in enumerate(bank.active.tolist()):
                bank.expert_params[name][expert].grad = host_grad[slot]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for bank in self.banks.values():
            for name in WEIGHT_NAMES:
                for expert in bank.active.tolist():
                    bank.expert_params[name][expert].grad = None
        stats = {"expert_grad_norm": norm, "experts_updated": sum(len(b.active) for b in self.banks.values())}
        self.release()
        return stats

    def release(self) -> None:
        for bank in self.banks.values():
            bank.release()

    # ---- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Adam states per layer and weight, stacked over experts (zeros where never stepped), and
        each expert's own step count. The masters themselves travel in the model's state_dict."""
        out: dict[str, Any] = {}
        for layer, bank in self.banks.items():
            for name in WEIGHT_NAMES:
                params = bank.expert_params[name]
                steps = torch.zeros(len(params), dtype=torch.long)
                exp_avg = torch.zeros_like(bank.host[name])
                exp_avg_sq = torch.zeros_like(bank.host[name])
                for e, p in enumerate(params):
                    state = self.optimizer.state.get(p)
                    if state:
                        steps[e] = int(state["step"])
                        exp_avg[e] = state["exp_avg"]
                        exp_avg_sq[e] = state["exp_avg_sq"]
                out[f"{layer}.{name}"] = {"step": steps, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for layer, bank in self.banks.items():
            for name in WEIGHT_NAMES:
                saved = state[f"{layer}.{name}"]
                for e, p in enumerate(bank.expert_params[name]):
                    self.optimizer.state.pop(p, None)
                    step = int(saved["step"][e])
                    if step:
                        self.optimizer.state[p] = {
                            "step": step,
                            "exp_avg": saved["exp_avg"][e].clone(),
                            "exp_avg_sq": saved["exp_avg_sq"][e].clone(),
                        }

    def host_bytes(self) -> int:
        """Host memory held: masters plus Adam states (two fp32 moments per stepped expert)."""
        masters = sum(t.numel() * t.element_size() for b in self.banks.values() for t in b.host.values())
        moments = sum(s["exp_avg"].numel() * 8 for s in self.optimizer.state.values() if s)
        return masters + moments


__all__ = ["ExpertOffload", "HostExpertBank"]
