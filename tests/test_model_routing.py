"""Random Routed Experts, grouped expert computation, MoGE and learned top-k gating."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pangu_model import PanguModel, get_config
from pangu_model.moe import (
    ExpertBank,
    LearnedTopKExperts,
    MixtureOfGroupedExperts,
    RandomRoutedExperts,
    balanced_routing_table,
    device_imbalance,
    random_routing_table,
)

VOCAB = 64


def small(router: str, **overrides):
    return get_config(
        "tiny", vocab_size=VOCAB, max_seq_len=32, d_model=32, num_heads=4, d_ff=64, num_layers=3, dropout=0.0,
        router=router, moe_layers=2, **overrides,
    )


def rre_config(**overrides):
    return small("rre", num_domains=4, experts_per_domain=3, **overrides)


# --- RRE -------------------------------------------------------------------------------------
def test_routing_tables_are_seeded_per_layer_and_balanced() -> None:
    first, second = PanguModel(rre_config()), PanguModel(rre_config())
    tables = [ffn.token_to_expert for ffn in first.sparse_layers().values()]
    again = [ffn.token_to_expert for ffn in second.sparse_layers().values()]
    assert all(torch.equal(a, b) for a, b in zip(tables, again))  # same seed → same table everywhere
    assert not torch.equal(tables[0], tables[1])  # one table per layer
    other_seed = PanguModel(rre_config(routing_seed=99)).sparse_layers()
    assert not torch.equal(next(iter(other_seed.values())).token_to_expert, tables[0])
    counts = torch.bincount(tables[0], minlength=3)
    assert counts.max() - counts.min() <= 1 and tables[0].min() >= 0 and tables[0].max() < 3
    assert "blocks.1.ffn.token_to_expert" in first.state_dict()  # saved with the model
    assert not any("token_to_expert" in name for name, _ in first.named_parameters())  # frozen


def test_routing_table_is_a_pure_function_of_its_seed() -> None:
    assert torch.equal(random_routing_table(1000, 16, seed=7), random_routing_table(1000, 16, seed=7))
    assert not torch.equal(random_routing_table(1000, 16, seed=7), random_routing_table(1000, 16, seed=8))
    assert torch.bincount(random_routing_table(1000, 16, seed=7)).tolist() == [63] * 8 + [62] * 8


def _load(table: torch.Tensor, counts: np.ndarray, slots: int) -> np.ndarray:
    return np.bincount(table.numpy(), weights=counts, minlength=slots)


def test_balanced_table_evens_a_skewed_corpus_better_than_the_random_table() -> None:
    vocab, slots = 4000, 16
    rng = np.random.default_rng(0)
    counts = np.floor(1e6 / np.arange(1, vocab + 1) ** 0.8)[rng.permutation(vocab)]  # Zipf, shuffled ids
    counts[rng.choice(vocab, 500, replace=False)] = 0  # ids the corpus never shows
    balanced = balanced_routing_table(counts, slots, seed=3)
    assert balanced.dtype == torch.long and balanced.min() >= 0 and balanced.max() < slots
    assert torch.equal(balanced, balanced_routing_table(torch.from_numpy(counts), slots, seed=3))  # pure
    for seed in range(5):
        random_load = _load(random_routing_table(vocab, slots, seed), counts, slots)
        balanced_load = _load(balanced_routing_table(counts, slots, seed), counts, slots)
        assert balanced_load.max() / balanced_load.mean() <= random_load.max() / random_load.mean()
        assert balanced_load.max() / balanced_load.mean() < 1.01 < 1.1 < random_load.max() / random_load.mean()
    # The unseen ids are spread by the smoothing count, not all put on the slot that ends up lightest.
    unseen = np.bincount(balanced.numpy()[counts == 0], minlength=slots)
    assert (unseen > 0).sum() >= slots // 2 and unseen.max() <= 0.3 * unseen.sum()
    # A single id heavier than a fair share gets a slot of its own; the rest stay even.
    giant = counts.copy()
    giant[0] = 10 * giant.sum() / slots
    load = _load(balanced_routing_table(giant, slots, seed=3), giant, slots)
    assert load.max() == giant[0] and np.sort(load)[:-1].max() / np.sort(load)[:-1].mean() < 1.01


def test_routing_table_kind_is_config_and_the_default_stays_random(tmp_path) -> None:
    from pangu_model import extract_domain, load_checkpoint, save_checkpoint

    default = rre_config()
    assert default.routing_table == "random" and default.routing_counts is None
    layers = PanguModel(default).sparse_layers()
    for index, (name, ffn) in zip((1, 2), layers.items()):  # num_layers 3, moe_layers 2: layers 1 and 2
        assert torch.equal(ffn.token_to_expert, random_routing_table(VOCAB, 3, default.routing_seed + index))
    with pytest.raises(ValueError, match="routing_counts"):
        rre_config(routing_table="balanced")

    counts = np.arange(VOCAB, dtype=np.int64) ** 2
    np.save(tmp_path / "counts.npy", counts)
    config = rre_config(routing_table="balanced", routing_counts=str(tmp_path / "counts.npy"))
    torch.manual_seed(0)
    model = PanguModel(config).eval()
    tables = {name: ffn.token_to_expert.clone() for name, ffn in model.sparse_layers().items()}
    for index, table in zip((1, 2), tables.values()):
        assert torch.equal(table, balanced_routing_table(counts, 3, config.routing_seed + index))
        assert not torch.equal(table, random_routing_table(VOCAB, 3, config.routing_seed + index))
    # The table is a saved buffer: an export loads it back without the counts it was built from.
    save_checkpoint(model, tmp_path / "export")
    (tmp_path / "counts.npy").unlink()
    loaded = load_checkpoint(tmp_path / "export")
    assert loaded.config.routing_table == "balanced"
    for name, table in tables.items():
        assert torch.equal(loaded.get_submodule(name).token_to_expert, table)
    ids = torch.randint(10, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, domain_ids=torch.tensor([0, 2])).logits,
                                   model(ids, domain_ids=torch.tensor([0, 2])).logits)
        sub = extract_domain(loaded, 2)  # extraction carries the table too
        torch.testing.assert_close(sub(ids, domain_ids=torch.tensor([2, 2])).logits,
                                   model(ids, domain_ids=torch.tensor([2, 2])).logits)
    for name, table in tables.items():
        assert torch.equal(sub.get_submodule(name).token_to_expert, table)


def test_domain_selects_its_expert_group() -> None:
    layer = RandomRoutedExperts(rre_config(), layer_index=2)
    tokens = torch.randint(0, VOCAB, (4, 10))
    domains = torch.tensor([0, 1, 2, 3])[:, None].expand(4, 10)
    experts = layer.route(tokens, domains)
    assert torch.equal(experts // 3, domains)
    assert torch.equal(experts % 3, layer.token_to_expert[tokens])
    per_token_domains = torch.randint(0, 4, (4, 10))
    assert torch.equal(layer.route(tokens, per_token_domains) // 3, per_token_domains)


def test_interleaved_layout_spreads_each_domain_over_every_expert_parallel_shard() -> None:
    """Contiguous ids put a domain's experts in one expert-parallel shard (a contiguous id range), so a
    domain-affine step sent all of a group's tokens to one rank; interleaved ids give every shard K/ep
    of every domain's experts."""
    domains, per_domain, ep = 4, 6, 2
    tokens = torch.arange(VOCAB)[None].expand(domains, VOCAB)
    rows = torch.arange(domains)[:, None].expand(domains, VOCAB)
    shard = domains * per_domain // ep
    for layout, shards_per_domain in (("contiguous", 1), ("interleaved", ep)):
        layer = RandomRoutedExperts(small("rre", num_domains=domains, experts_per_domain=per_domain,
                                          expert_layout=layout), layer_index=2)
        experts = layer.route(tokens, rows)
        for d in range(domains):
            used = experts[d].unique()
            assert len(used) == per_domain  # the domain's own K experts, whatever the layout
            assert len((used // shard).unique()) == shards_per_domain
            if layout == "interleaved":
                assert torch.equal(used % domains, torch.full_like(used, d))
                assert torch.equal(torch.bincount(used // shard, minlength=ep), torch.full((ep,), per_domain // ep))


def test_a_tokens_route_is_the_same_in_every_batch_and_context() -> None:
    layer = RandomRoutedExperts(rre_config(), layer_index=1)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (3, 16), generator=generator) for _ in range(4)]
    seen: dict[tuple[int, int], int] = {}
    for batch in batches:
        for domain in range(4):
            experts = layer.route(batch, torch.full_like(batch, domain))
            for token, expert in zip(batch.flatten().tolist(), experts.flatten().tolist()):
                assert seen.setdefault((token, domain), expert) == expert
    assert len(seen) > VOCAB  # many (token, domain) pairs were seen more than once


def test_rre_forward_is_deterministic_and_per_row_domains_work() -> None:
    torch.manual_seed(0)
    model = PanguModel(rre_config()).eval()
    ids = torch.randint(10, VOCAB, (2, 12))
    with torch.no_grad():
        per_row = model(ids, domain_ids=torch.tensor([1, 3])).logits
        per_token = model(ids, domain_ids=torch.tensor([1, 3])[:, None].expand(2, 12)).logits
        again = model(ids, domain_ids=torch.tensor([1, 3])).logits
        other = model(ids, domain_ids=torch.tensor([0, 3])).logits
    assert torch.equal(per_row, per_token) and torch.equal(per_row, again)
    assert not torch.allclose(per_row[0], other[0]) and torch.equal(per_row[1], other[1])


# --- grouped expert computation ---------------------------------------------------------------
def naive_experts(bank: ExpertBank, x, expert_index, token_index, weight):
    out = torch.zeros_like(x)
    for a in range(expert_index.numel()):  # the per-token loop the real code avoids
        e, t = int(expert_index[a]), int(token_index[a])
        h = F.gelu(x[t] @ bank.w_in[e].T + bank.b_in[e]) @ bank.w_out[e].T + bank.b_out[e]
        out[t] = out[t] + weight[a] * h
    return out


def test_grouped_expert_computation_equals_per_token_reference() -> None:
    torch.manual_seed(0)
    bank = ExpertBank(num_experts=6, d_model=8, d_ff=16)
    for p in bank.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(20, 8, requires_grad=True)
    # Top-2-like assignments, experts 2 and 5 left empty, tokens 18 and 19 unassigned.
    token_index = torch.arange(18).repeat(2)
    expert_index = torch.tensor([0, 1, 3, 4] * 9)[torch.randperm(36)]
    weight = torch.rand(36)
    grouped = bank(x, expert_index, token_index, weight)
    reference = naive_experts(bank, x, expert_index, token_index, weight)
    torch.testing.assert_close(grouped, reference)
    assert grouped[18:].abs().max() == 0

    grad_grouped = torch.autograd.grad(grouped.square().sum(), [x, bank.w_in])
    grad_reference = torch.autograd.grad(reference.square().sum(), [x, bank.w_in])
    for a, b in zip(grad_grouped, grad_reference):
        torch.testing.assert_close(a, b)


# --- MoGE ------------------------------------------------------------------------------------
def moge_layer(**overrides) -> MixtureOfGroupedExperts:
    torch.manual_seed(0)
    config = small("moge", num_experts=8, moge_groups=4, moge_top_k_per_group=1, aux_loss_coef=0.01, **overrides)
    layer = MixtureOfGroupedExperts(config, layer_index=2)
    for name, p in layer.named_parameters():
        if name != "expert_scale":
            torch.nn.init.normal_(p, 0, 0.3)
    return layer


def test_moge_device_imbalance_is_zero_by_construction() -> None:
    layer = moge_layer()
    x = torch.randn(3, 20, 32) * torch.linspace(0.1, 5, 32)  # skewed inputs
    layer(x)
    stats = layer.last_stats
    assert layer.device_imbalance() == 0.0
    per_group = stats.expert_load.reshape(4, 2).sum(dim=1)
    assert per_group.tolist() == [60, 60, 60, 60]
    assert stats.expert_load.max() > stats.expert_load.min()  # experts themselves are not balanced

    # The learned top-k router on the same input and expert count has no such guarantee.
    topk = LearnedTopKExperts(small("topk", num_experts=8, topk_k=4, capacity_factor=100.0), 2)
    torch.nn.init.normal_(topk.gate.weight, 0, 0.3)
    topk(x)
    assert device_imbalance(topk.last_stats.expert_load, 4, 60) > 0


def test_moge_weights_are_not_renormalised_and_aux_loss_has_gradient() -> None:
    layer = moge_layer()
    x = torch.randn(2, 10, 32)
    out, aux_loss = layer(x)
    assert aux_loss.requires_grad and aux_loss > 0
    (gate_grad,) = torch.autograd.grad(aux_loss, [layer.gate.weight], retain_graph=True)
    assert gate_grad.abs().max() > 0
    (scale_grad,) = torch.autograd.grad(out.sum(), [layer.expert_scale])
    assert scale_grad.abs().max() > 0

    probs = F.softmax(layer.gate(x.reshape(-1, 32)), dim=-1)
    selected = probs.view(-1, 4, 2).max(dim=-1).values.sum(dim=-1)
    assert (selected < 1 - 1e-4).all()  # the weights that multiply experts do not sum to one


def test_moge_shared_experts_are_added_ungated() -> None:
    layer = moge_layer(moge_shared_experts=2)
    with torch.no_grad():
        layer.experts.w_out.zero_()
        layer.experts.b_out.zero_()
    x = torch.randn(2, 5, 32)
    out, _ = layer(x)
    flat = x.reshape(-1, 32)
    expected = layer.shared_experts.expert(0, flat) + layer.shared_experts.expert(1, flat)
    torch.testing.assert_close(out.reshape(-1, 32), expected)


# --- learned top-k -----------------------------------------------------------------------------
def test_topk_capacity_drops_overflow_tokens_to_the_residual() -> None:
    torch.manual_seed(0)
    config = small("topk", num_experts=4, topk_k=1, capacity_factor=1.0, min_capacity=1)
    layer = LearnedTopKExperts(config, layer_index=2)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0  # positive inputs all prefer expert 0
        # A bare layer's bank is torch.empty (PanguModel initialises it): give it real weights.
        torch.nn.init.normal_(layer.experts.w_in, 0, 0.5)
        torch.nn.init.normal_(layer.experts.w_out, 0, 0.5)
    x = torch.rand(1, 16, 32) + 0.1
    out, aux_loss = layer(x)
    capacity = layer.capacity(16)
    assert capacity == 4
    # A zero FFN output is the pass-through: the block adds it to the residual stream.
    processed = out[0].abs().amax(dim=-1) > 0
    assert processed.tolist() == [True] * capacity + [False] * (16 - capacity)  # first come, first served
    assert layer.last_stats.dropped == 16 - capacity
    assert aux_loss > config.aux_loss_coef  # everything on one expert: above the balanced value α
    (gate_grad,) = torch.autograd.grad(aux_loss, [layer.gate.weight])
    assert gate_grad.abs().max() > 0

    roomy = LearnedTopKExperts(config.replace(capacity_factor=4.0), layer_index=2)
    roomy.load_state_dict(layer.state_dict())
    roomy(x)
    assert roomy.last_stats.dropped == 0


def test_topk_two_renormalises_and_prefers_first_choices() -> None:
    torch.manual_seed(1)
    config = small("topk", num_experts=4, topk_k=2, capacity_factor=0.5, min_capacity=1)
    layer = LearnedTopKExperts(config, layer_index=2)
    x = torch.randn(1, 12, 32)
    layer(x)
    capacity = layer.capacity(12)
    assert layer.last_stats.expert_load.max() <= capacity
    assert layer.last_stats.dropped == 24 - int(layer.last_stats.expert_load.sum())


def test_every_router_trains_through_the_full_model() -> None:
    for config in (
        rre_config(),
        small("moge", num_experts=4, moge_groups=2, moge_shared_experts=1),
        small("topk", num_experts=4, topk_k=2),
    ):
        torch.manual_seed(0)
        model = PanguModel(config)
        ids = torch.randint(10, VOCAB, (2, 9))
        out = model(ids[:, :-1], domain_ids=torch.tensor([0, 1]), labels=ids[:, 1:])
        out.loss.backward()
        experts = next(iter(model.sparse_layers().values())).experts
        assert experts.w_in.grad is not None and experts.w_in.grad.abs().max() > 0
        if config.router != "rre":
            assert out.aux_loss > 0
