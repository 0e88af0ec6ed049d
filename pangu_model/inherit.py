"""Dense → sparse inheritance (PanGu-Σ from PanGu-α) and single-domain sub-model extraction.

Both are tensor copies keyed by state-dict names, so they work the same on a live model, on a state
dict loaded from `model.safetensors`, and (for extraction) produce an ordinary checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from .config import SHAPE_FIELDS, PanguConfig
from .materialize import on_meta
from .model import PanguModel
from .moe import EXPERT_WEIGHTS, ExpertBank, rre_expert_ids


def _expert_banks(model: PanguModel) -> dict[str, ExpertBank]:
    """Qualified name of the FFN (e.g. 'blocks.35.ffn') → its routed ExpertBank."""
    return {name: ffn.experts for name, ffn in model.sparse_layers().items()}


def sigma_from_dense(
    dense: PanguModel | Mapping[str, torch.Tensor], sigma_config: PanguConfig,
    expert_shard: tuple[int, int] | None = None,
) -> PanguModel:
    """A sparse model whose every expert starts as a copy of the dense FFN of its layer (only the
    experts of `expert_shard` (rank, size) when given: see `PanguModel`).

    All other weights (embeddings, attention, LayerNorms, dense layers) are copied as they are; routing
    tables come from `sigma_config.routing_seed`; learned gates (MoGE / top-k) keep their fresh init.
    For RRE (top-1, weight 1, no gate) the result computes exactly the dense function at step 0.
    """
    if isinstance(dense, PanguModel):
        mismatched = [f for f in SHAPE_FIELDS if getattr(dense.config, f) != getattr(sigma_config, f)]
        if mismatched:
            raise ValueError(f"dense and sparse configs differ in {mismatched}")
        dense_state = dense.state_dict()
    else:
        dense_state = dict(dense)
    if sigma_config.expert_width != sigma_config.d_ff:
        raise ValueError("inheritance needs experts as wide as the dense FFN (expert_d_ff = d_ff)")

    reference = next(iter(dense_state.values()))
    sparse = PanguModel(sigma_config, expert_shard).to(device=reference.device, dtype=reference.dtype)
    # Routing tables are integer buffers: the dtype cast above leaves them alone, as it should.
    state = sparse.state_dict()
    expert_prefixes = {f"{name}.experts." for name in _expert_banks(sparse)}
    with torch.no_grad():
        for key, target in state.items():
            prefix = next((p for p in expert_prefixes if key.startswith(p)), None)
            if prefix is not None:
                ffn_name = prefix[: -len("experts.")]
                source = dense_state[ffn_name + EXPERT_WEIGHTS[key[len(prefix):]]]
                target.copy_(source.unsqueeze(0).expand_as(target))
            elif key in dense_state:
                if dense_state[key].shape != target.shape:
                    raise ValueError(f"{key}: dense {tuple(dense_state[key].shape)} vs sparse {tuple(target.shape)}")
                target.copy_(dense_state[key])
            elif not key.endswith(("token_to_expert", "gate.weight", "expert_scale")) and ".shared_experts." not in key:
                raise KeyError(f"{key} has no source in the dense state")
    return sparse


def extract_domain(model: PanguModel, domain: int) -> PanguModel:
    """The standalone model of one domain: the same weights, with only that domain's experts.

    Because RRE routing depends on the domain and the token id alone, this model gives identical logits
    on the domain's inputs. It keeps accepting the original domain id (`domain_id_offset`), and also
    runs with `domain_ids=None`.
    """
    config = model.config
    if config.router != "rre":
        raise ValueError(f"sub-model extraction needs RRE routing, not {config.router!r}")
    local = domain - config.domain_id_offset
    if not 0 <= local < config.num_domains:
        raise ValueError(f"domain {domain} is not among this model's domains")
    sub_config = config.replace(
        name=f"{config.name}-domain{domain}", num_domains=1, domain_id_offset=domain
    )
    reference = next(model.parameters())
    with on_meta():
        sub_model = PanguModel(sub_config)
    # The domain's experts in slot order (the sub-model has one domain: slot k is its expert k).
    rows = rre_expert_ids(torch.full((config.experts_per_domain,), local), torch.arange(config.experts_per_domain),
                          config.num_domains, config.experts_per_domain, config.expert_layout)
    banks = {f"{name}.experts." for name in _expert_banks(model)}
    state = {}
    for key, tensor in model.state_dict().items():
        if any(key.startswith(prefix) for prefix in banks):
            tensor = tensor[rows.to(tensor.device)]
        state[key] = tensor.detach().clone()
    sub_model.load_state_dict(state, strict=True, assign=True)
    return sub_model.to(reference.device).train(model.training)


__all__ = ["sigma_from_dense", "extract_domain"]
