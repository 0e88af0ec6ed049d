"""Presets and parameter counts (meta device) against the published figures of SPEC §5."""

import time

import pytest
import torch

from pangu_model import PRESETS, PanguConfig, PanguModel, describe, format_description, get_config


def closed_form_count(config: PanguConfig) -> int:
    """The parameter arithmetic of SPEC §5, written out independently of the module tree."""
    d, ff, expert_ff = config.d_model, config.d_ff, config.expert_width
    embeddings = config.vocab_size * d + 2 * config.max_seq_len * d  # words, positions, top queries
    attention = 4 * d * d + 4 * d  # q, k, v, out projections with biases
    layer_norms = 2 * 2 * d
    dense_ffn = 2 * d * ff + ff + d
    expert = 2 * d * expert_ff + expert_ff + d
    sparse_ffn = {
        "dense": dense_ffn,
        "rre": config.total_experts * expert,
        "topk": config.total_experts * expert + d * config.total_experts,
        "moge": (config.total_experts + config.moge_shared_experts) * expert
        + d * config.total_experts
        + config.total_experts,
    }[config.router]
    sparse = config.moe_layers if config.router != "dense" else 0
    layers = config.num_layers * (attention + layer_norms) + (config.num_layers - sparse) * dense_ffn
    return embeddings + layers + sparse * sparse_ffn + 2 * d  # + final LayerNorm


def meta_count(config: PanguConfig) -> int:
    with torch.device("meta"):
        model = PanguModel(config)
    return sum(p.numel() for p in model.parameters())


# Published totals (SPEC §5.1 table, §5.2) and the relative tolerance each one allows.
PUBLISHED = {
    "350m": (0.35e9, 0.015),  # "~0.35B": two significant digits, 345.4M rounds to it
    "2.6b": (2.6e9, 0.01),
    # 13B as released: 39 transformer layers plus the query layer (40 blocks), 12.80B; the paper says 13.1B.
    "13b": (12.80e9, 0.001),
    "200b": (207.0e9, 0.01),
    "sigma-1t": (1.085e12, 0.005),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_meta_count_matches_closed_form(preset: str) -> None:
    config = get_config(preset)
    assert meta_count(config) == closed_form_count(config)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_count_matches_published_figure(preset: str) -> None:
    published, tolerance = PUBLISHED[preset]
    count = meta_count(get_config(preset))
    assert abs(count - published) / published <= tolerance, f"{preset}: {count:,} vs {published:,.0f}"


def test_sigma_1t_arithmetic() -> None:
    """1.085T = 13B shape − 8 dense FFNs + 8 layers × 640 experts; one domain's sub-model ≈ 38B."""
    sigma = get_config("sigma-1t")
    dense = get_config("13b")
    assert (sigma.num_layers, sigma.d_model, sigma.d_ff, sigma.num_heads) == (40, 5120, 20480, 40)
    assert (dense.num_layers, dense.d_model, dense.d_ff, dense.num_heads) == (40, 5120, 20480, 40)
    assert sigma.moe_layers == 8 and sigma.total_experts == 640 == 40 * 16
    expert = 2 * 5120 * 20480 + 20480 + 5120
    assert meta_count(sigma) == meta_count(dense) + 8 * (640 - 1) * expert
    info = describe(sigma)
    assert info["parameters"]["per_expert"] == expert
    assert info["parameters"]["active_per_token"] == meta_count(dense)
    assert abs(info["parameters"]["per_domain_sub_model"] - 38e9) / 38e9 < 0.01


def test_describe_is_fast_and_allocates_nothing() -> None:
    start = time.perf_counter()
    info = describe("sigma-1t")
    assert time.perf_counter() - start < 10
    assert info["parameters"]["total"] == meta_count(get_config("sigma-1t"))
    assert info["layout"][-1]["kind"].startswith("head tied")
    text = format_description(info)
    assert "1.085T" in text and "query layer" in text


def test_describe_counts_active_parameters_per_router() -> None:
    base = get_config("tiny", vocab_size=100, max_seq_len=16)
    moge = base.replace(router="moge", moe_layers=2, num_experts=8, moge_groups=4, moge_shared_experts=1)
    topk = base.replace(router="topk", moe_layers=2, num_experts=8, topk_k=2)
    for config, active_experts in ((moge, 4), (topk, 2)):
        parameters = describe(config)["parameters"]
        assert parameters["total"] == closed_form_count(config)
        idle = (8 - active_experts) * parameters["per_expert"] * 2
        assert parameters["active_per_token"] == parameters["total"] - idle


def test_config_validation_and_overrides() -> None:
    with pytest.raises(ValueError):
        get_config("tiny", num_heads=5)
    with pytest.raises(ValueError):
        get_config("tiny", moe_layers=2)  # sparse layers need a sparse router
    with pytest.raises(KeyError):
        get_config("nope")
    config = get_config("sigma-tiny", num_domains=3)
    assert config.total_experts == 3 * config.experts_per_domain
    assert PanguConfig.model_validate_json(config.model_dump_json()) == config
