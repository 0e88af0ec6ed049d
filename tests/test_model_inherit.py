"""Dense → PanGu-Σ inheritance and single-domain sub-model extraction."""

import re

import pytest
import torch

from pangu_model import PanguModel, extract_domain, get_config, load_checkpoint, save_checkpoint, sigma_from_dense

VOCAB = 64


def dense_config():
    return get_config(
        "tiny", vocab_size=VOCAB, max_seq_len=32, d_model=32, num_heads=4, d_ff=64, num_layers=4, dropout=0.0
    )


def sigma_config():
    return dense_config().replace(router="rre", moe_layers=2, num_domains=3, experts_per_domain=2)


def test_inherited_sigma_equals_dense_at_step_zero() -> None:
    torch.manual_seed(0)
    dense = PanguModel(dense_config()).eval()
    ids = torch.randint(10, VOCAB, (3, 12))
    with torch.no_grad():
        expected = dense(ids).logits
    for source in (dense, dense.state_dict()):
        sigma = sigma_from_dense(source, sigma_config()).eval()
        with torch.no_grad():
            got = sigma(ids, domain_ids=torch.tensor([0, 1, 2])).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in sigma.parameters()) > sum(p.numel() for p in dense.parameters())

    # Each expert is its own copy: changing one changes only the tokens routed to it.
    layer = sigma.query_layer.ffn
    with torch.no_grad():
        layer.experts.b_out[1].add_(1.0)
        after = sigma(ids, domain_ids=torch.tensor([0, 1, 2])).logits
    routed_to_1 = layer.route(ids, torch.tensor([0, 1, 2])[:, None].expand_as(ids)) == 1
    differs = (after - expected).abs().amax(dim=-1) > 1e-4
    assert routed_to_1.any() and torch.equal(differs, routed_to_1)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_extracted_domain_model_gives_identical_logits(tmp_path, layout) -> None:
    torch.manual_seed(0)
    sigma = PanguModel(sigma_config().replace(expert_layout=layout)).eval()  # random experts: every expert differs
    ids = torch.randint(10, VOCAB, (2, 10))
    with torch.no_grad():
        full = sigma(ids, domain_ids=2).logits
        other = sigma(ids, domain_ids=1).logits
    sub = extract_domain(sigma, 2)
    assert sub.config.num_domains == 1 and sub.config.domain_id_offset == 2
    assert next(iter(sub.sparse_layers().values())).experts.num_experts == 2
    with torch.no_grad():
        assert torch.equal(sub(ids, domain_ids=2).logits, full)
        assert torch.equal(sub(ids).logits, full)
    assert not torch.allclose(full, other)  # the domains really differ

    restored = load_checkpoint(save_checkpoint(sub, tmp_path / "domain2"))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, full)
    full_count = sum(p.numel() for p in sigma.parameters())
    expert_count = sum(p.numel() for p in next(iter(sigma.sparse_layers().values())).experts.parameters())
    per_expert = expert_count // 6
    assert sum(p.numel() for p in restored.parameters()) == full_count - 2 * (6 - 2) * per_expert


def test_extracted_model_refuses_other_domains() -> None:
    sub = extract_domain(PanguModel(sigma_config()).eval(), 1)
    ids = torch.randint(10, VOCAB, (1, 5))
    try:
        sub(ids, domain_ids=0)
    except ValueError as error:
        assert "domain ids" in str(error)
    else:
        raise AssertionError("a foreign domain id was accepted")


@pytest.mark.parametrize("source, target, refused", [
    ("dense", "sigma", None),  # inheritance: every expert starts as its layer's dense FFN
    ("sigma", "sigma", None),
    ("dense", "dense", None),
    ("sigma", "dense", "is a PanGu-Σ (RRE) model, not this run's dense (PanGu-α) model"),
    ("dense", "wider sigma", "a dense model can start a sparse one of its own shape only (d_model 32 vs 64"),
    ("sigma", "wider sigma", "is another shape (blocks.0.attention.k_proj.bias: (32,) there, (64,) here, and"),
])
def test_a_start_that_cannot_seed_the_run_is_refused_at_launch(tmp_path, source, target, refused) -> None:
    """`pretrain --init-from` of a PanGu-Σ export with a dense preset used to fail on every rank, after launch,
    with "the weights do not match config.json" about an export whose config.json was fine."""
    from pangu_model.train import DataMismatch, check_init_from

    configs = {"dense": dense_config(), "sigma": sigma_config(),
               "wider sigma": sigma_config().replace(d_model=64, d_ff=128)}
    export = save_checkpoint(PanguModel(configs[source]), tmp_path / "export")
    if refused is None:
        check_init_from(str(export), configs[target])
    else:
        with pytest.raises(DataMismatch, match=re.escape(refused)):
            check_init_from(str(export), configs[target])
