"""Expert parallelism through DeepSpeed's MoE layer with a fixed RRE gate (SPEC §5.2: the verified pattern).

PanGu-Σ routes by domain and token id, never by a learned gate: `FixedRouteGate` hands DeepSpeed
one-hot logits on the precomputed expert, dropless, so DeepSpeed's all-to-all moves each token to
the rank holding its expert. `gather_expert_state` collects every rank's experts back into the
`ExpertBank` layout for export (DeepSpeed's zero_to_fp32.py cannot read MoE checkpoints).

With tensor parallelism (DeepSpeed's `mpu` holds the tensor group) the experts are not split but
replicated over the tensor group, and every rank of the group computes its experts on the whole of the
layer's input, which is the same on all of them: so their gradients are whole and equal on every rank.
The layer is built with DeepSpeed's `enable_expert_tensor_parallelism` for its groups only: DeepSpeed then
makes the expert groups among the ranks of one tensor rank (`groups._get_expert_parallel_ranks`, the groups
of pangu_model/topology.py), so the ranks of a tensor group hold the same expert shard, and each tensor rank's
all-to-all runs in its own expert group. Its forward runs
with DeepSpeed's tensor group hidden (`_tensor_group_hidden`): with one, DeepSpeed's MoE layer would split
the capacity slots over the tensor group before the all-to-all and gather them back after it (an exchange
tp times smaller, but its gather writes into a flat buffer, which gloo refuses, and our replicated experts
need every slot anyway).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .model import PanguModel
from .moe import EXPERT_WEIGHTS, RandomRoutedExperts, rre_expert_ids


class _Expert(nn.Module):
    """One expert, laid out like an ExpertBank slice (GeLU FFN, nn.Linear orientation)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff)
        self.fc_out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.nn.functional.gelu(self.fc_in(x)))


def _fixed_route_gate_class() -> type:
    from deepspeed.moe.sharded_moe import TopKGate, top1gating

    class FixedRouteGate(TopKGate):
        """TopKGate whose logits are one-hot on the precomputed RRE expert: softmax gives weight 1.0 to
        that expert and 0 elsewhere; dropless (capacity = the largest load over the ep group) and
        without random token selection, so no RNG is consumed and nothing is dropped."""

        expert_ids: torch.Tensor | None = None

        def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None,
                    sparse_routes: bool = False, use_tutel: bool = False) -> Any:
            ids = self.expert_ids
            if ids is None or ids.numel() != input.shape[0]:
                raise RuntimeError("FixedRouteGate: expert ids for this input were not set")
            logits = torch.full((input.shape[0], self.wg.out_features), float("-inf"), device=input.device)
            logits.scatter_(1, ids[:, None], 0.0)
            return top1gating(logits, self.capacity_factor, 0, used_token, None, False, False, self.ep_group,
                              sparse_routes, use_tutel)

    return FixedRouteGate


@contextlib.contextmanager
def _tensor_group_hidden() -> Iterator[None]:
    """DeepSpeed's MoE layer (its forward, and the capacity its gate computes) without DeepSpeed's `mpu`: no split
    of the tokens over the tensor group (module docstring). Its backward reads no `mpu` (the all-to-alls keep
    their group), so hiding it for the forward, recomputed forwards included, is enough."""
    from deepspeed.utils import groups

    mpu, groups.mpu = groups.mpu, None
    try:
        yield
    finally:
        groups.mpu = mpu


class DeepSpeedRRE(nn.Module):
    """RRE routing in front of `deepspeed.moe.layer.MoE`: experts spread over `ep` ranks, all-to-all; with
    `tensor_parallel` the experts are replicated over the tensor group (module docstring)."""

    def __init__(self, rre: RandomRoutedExperts, ep: int, ep_rank: int, tensor_parallel: bool = False) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.num_domains = rre.num_domains
        self.experts_per_domain = rre.experts_per_domain
        self.domain_id_offset = rre.domain_id_offset
        self.expert_layout = rre.expert_layout
        self.register_buffer("token_to_expert", rre.token_to_expert.clone(), persistent=True)
        bank = rre.experts  # the whole bank, or already this rank's shard (PanguModel expert_shard)
        total = rre.total_experts
        _, d_ff, d_model = bank.w_in.shape
        self.moe = MoE(hidden_size=d_model, expert=_Expert(d_model, d_ff), num_experts=total, ep_size=ep, k=1,
                       min_capacity=0, drop_tokens=False, use_rts=False,
                       enable_expert_tensor_parallelism=tensor_parallel)
        old = self.moe.deepspeed_moe.gate
        gate = _fixed_route_gate_class()(d_model, total, k=1, min_capacity=0, drop_tokens=False, use_rts=False)
        gate.wg.weight.requires_grad_(False)  # unused: the route is fixed
        gate.ep_group = getattr(old, "ep_group", None)
        self.moe.deepspeed_moe.gate = gate
        local = total // ep
        with torch.no_grad():
            for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                g = ep_rank * local + i  # experts are contiguous per ep rank, domain by domain
                g -= bank.first_expert
                if not 0 <= g < bank.num_experts:
                    raise ValueError(f"expert {g + bank.first_expert} is not in this rank's bank")
                expert.fc_in.weight.copy_(bank.w_in[g])
                expert.fc_in.bias.copy_(bank.b_in[g])
                expert.fc_out.weight.copy_(bank.w_out[g])
                expert.fc_out.bias.copy_(bank.b_out[g])
        self.total_experts = total

    def route(self, token_ids: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        return rre_expert_ids(domain_ids - self.domain_id_offset, self.token_to_expert[token_ids], self.num_domains,
                              self.experts_per_domain, self.expert_layout)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, domain_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self.moe.deepspeed_moe.gate.expert_ids = self.route(token_ids, domain_ids).reshape(-1)
        with _tensor_group_hidden() if self.moe.enable_expert_tensor_parallelism else contextlib.nullcontext():
            out, _, _ = self.moe(x)
        return out.view_as(x), x.new_zeros(())


def to_deepspeed_moe(model: PanguModel, ep: int, ep_rank: int) -> None:
    """Swap every RRE layer of `model` for a DeepSpeedRRE holding this ep rank's experts (replicated over the
    model's tensor group, if it has one)."""
    for block in model.layers:
        if isinstance(block.ffn, RandomRoutedExperts):
            block.ffn = DeepSpeedRRE(block.ffn, ep, ep_rank, tensor_parallel=model.tp is not None)


def local_expert_rows(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, int]]:
    """This rank's experts as (ExpertBank tensor name, stacked rows, first row) pieces, read from `state`
    (which may hold the optimizer's fp32 masters instead of the module's copies)."""
    pieces = []
    for name, module in model.named_modules():
        if not isinstance(module, DeepSpeedRRE):
            continue
        local_experts = f"{name}.moe.deepspeed_moe.experts.deepspeed_experts"
        count = len(module.moe.deepspeed_moe.experts.deepspeed_experts)
        first = dist.get_rank(module.moe.deepspeed_moe.ep_group) * count  # contiguous per ep rank
        for bank_name, weight in EXPERT_WEIGHTS.items():
            rows = torch.stack([state[f"{local_experts}.{i}.{weight}"].detach().float() for i in range(count)])
            pieces.append((f"{name}.experts.{bank_name}", rows, first))
    return pieces


def without_moe_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the DeepSpeed MoE layers' own keys (their experts travel as `local_expert_rows`)."""
    prefixes = tuple(f"{name}.moe." for name, module in model.named_modules() if isinstance(module, DeepSpeedRRE))
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def gather_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every DeepSpeedRRE's local experts gathered over its ep group into ExpertBank names.

    Collective over the expert-parallel group; DeepSpeed's zero_to_fp32.py cannot do this (SPEC §5.2).
    Every rank ends up holding every expert: for tests and small models; exports write the local rows
    instead (pangu_model.train.Trainer.export).
    """
    out = without_moe_keys(model, state)
    groups = {f"{name}.experts.": module.moe.deepspeed_moe.ep_group
              for name, module in model.named_modules() if isinstance(module, DeepSpeedRRE)}
    for key, rows, _ in local_expert_rows(model, state):
        group = next(g for prefix, g in groups.items() if key.startswith(prefix))
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows.contiguous(), group=group)
        out[key] = torch.cat(parts)
    return out
