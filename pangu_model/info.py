"""Model inspection for `pangu model info`: layout and parameter counts, computed on the meta device.

Building on the meta device allocates nothing, so even the 1.085T-parameter PanGu-Σ is described in
well under a second; the counts come from the real module tree, not from a formula.
"""

from __future__ import annotations

from typing import Any

from .config import PanguConfig, get_config
from .materialize import on_meta
from .model import PanguModel

_EMBEDDING_PREFIXES = ("word_embedding.", "position_embedding.", "top_query_embedding.")


def _layer_kind(config: PanguConfig, index: int) -> str:
    role = "query layer" if index == config.num_layers - 1 else "block"
    if not config.is_sparse_layer(index):
        return f"{role} (dense FFN)"
    experts = config.total_experts
    if config.router == "rre":
        detail = f"RRE, {config.num_domains} domains x {config.experts_per_domain} experts = {experts}"
    elif config.router == "moge":
        detail = (
            f"MoGE, {experts} experts in {config.moge_groups} groups, top-{config.moge_top_k_per_group}/group"
            + (f", {config.moge_shared_experts} shared" if config.moge_shared_experts else "")
        )
    else:
        detail = f"learned top-{config.topk_k} of {experts}, capacity factor {config.capacity_factor}"
    return f"{role} ({detail})"


def _layout(config: PanguConfig) -> list[dict[str, Any]]:
    """Consecutive layers of the same kind, bottom-up, with the final LayerNorm where it sits."""
    runs: list[dict[str, Any]] = []
    for index in range(config.num_layers):
        if index == config.num_layers - 1:
            runs.append({"layers": "-", "kind": "final LayerNorm"})
        kind = _layer_kind(config, index)
        if runs and runs[-1]["kind"] == kind:
            runs[-1]["last"] = index
        else:
            runs.append({"first": index, "last": index, "kind": kind})
    for run in runs:
        if "first" in run:
            first, last = run.pop("first"), run.pop("last")
            run["layers"] = str(first) if first == last else f"{first}-{last}"
    runs.append({"layers": "-", "kind": "head tied to word embedding"})
    return runs


def describe(preset_or_config: str | PanguConfig) -> dict[str, Any]:
    """Layout and parameter counts (total, active per token, per expert, embedding) of a preset or config."""
    config = get_config(preset_or_config)
    with on_meta():
        model = PanguModel(config)

    total = embedding = routed_experts = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if name.startswith(_EMBEDDING_PREFIXES):
            embedding += parameter.numel()
        if ".ffn.experts." in name:
            routed_experts += parameter.numel()

    sparse_layers = config.moe_layers if config.router != "dense" else 0
    experts_per_layer = config.total_experts
    per_expert = routed_experts // (sparse_layers * experts_per_layer) if sparse_layers else 0
    idle_experts = experts_per_layer - config.experts_active_per_token
    active = total - sparse_layers * idle_experts * per_expert

    parameters: dict[str, int] = {
        "total": total,
        "active_per_token": active,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "per_expert": per_expert,
        "routed_experts": routed_experts,
        "shared": total - routed_experts,
    }
    if config.router == "rre":
        parameters["per_domain_sub_model"] = total - sparse_layers * (
            experts_per_layer - config.experts_per_domain
        ) * per_expert

    return {
        "name": config.name,
        "router": config.router,
        "shape": {
            "layers": config.num_layers,
            "d_model": config.d_model,
            "d_ff": config.d_ff,
            "heads": config.num_heads,
            "seq_len": config.max_seq_len,
            "vocab": config.vocab_size,
            "sparse_layers": sparse_layers,
            "experts_per_sparse_layer": experts_per_layer,
            "experts_active_per_token": config.experts_active_per_token,
        },
        "layout": _layout(config),
        "parameters": parameters,
        "config": config.saved_fields(),  # as config.json holds it
    }


def human_count(count: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3f}{unit}"
    return str(count)


def format_description(description: dict[str, Any]) -> str:
    """A human-readable rendering of `describe()`."""
    shape = description["shape"]
    lines = [
        f"model {description['name']}  (router: {description['router']})",
        "  " + ", ".join(f"{key} {value}" for key, value in shape.items()),
        "",
        "layout (bottom-up):",
    ]
    width = max(len(run["layers"]) for run in description["layout"])
    lines += [f"  {run['layers']:>{width}}  {run['kind']}" for run in description["layout"]]
    lines += ["", "parameters:"]
    width = max(len(key) for key in description["parameters"])
    lines += [
        f"  {key:<{width}}  {human_count(value):>10}  ({value:,})"
        for key, value in description["parameters"].items()
    ]
    return "\n".join(lines)
