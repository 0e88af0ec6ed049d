"""Packed documents, the `<eot>` mask, and the query layer."""

import torch
import torch.nn.functional as F

from pangu_model import PanguModel, get_config
from pangu_model.masks import attention_layout, document_ids_from_positions, position_ids_from_eot

EOT = 9


def tiny_model(**overrides) -> PanguModel:
    torch.manual_seed(0)
    config = get_config(
        "tiny", vocab_size=64, max_seq_len=32, d_model=32, num_heads=4, d_ff=64, num_layers=3, dropout=0.0,
        **overrides,
    )
    return PanguModel(config).eval()


def test_positions_restart_after_eot() -> None:
    ids = torch.tensor([[20, 21, EOT, 30, 31, 32, EOT, 40]])
    assert position_ids_from_eot(ids, EOT).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    continued = position_ids_from_eot(ids, EOT, start=torch.tensor([5]))
    assert continued.tolist() == [[5, 6, 7, 0, 1, 2, 3, 0]]
    assert document_ids_from_positions(continued).tolist() == [[1, 1, 1, 2, 2, 2, 2, 3]]


def test_layout_uses_is_causal_for_one_document_and_a_mask_for_packed_rows() -> None:
    single = attention_layout(torch.arange(6)[None], 6)
    assert single.is_causal and single.mask is None
    packed = attention_layout(torch.tensor([[0, 1, 2, 0, 1, 2]]), 6)
    assert not packed.is_causal
    mask = packed.mask[0, 0]
    assert mask[4, 3] and mask[4, 4] and not mask[4, 2] and not mask[4, 5] and not mask[1, 3]


def test_packed_row_equals_documents_run_separately() -> None:
    model = tiny_model()
    docs = [torch.tensor([20, 21, 22, EOT]), torch.tensor([30, 31, EOT]), torch.tensor([40, 41, 42, 43, 44])]
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        packed_logits = model(packed).logits[0]
        separate = torch.cat([model(doc[None]).logits[0] for doc in docs])
        unmasked = model(packed, position_ids=torch.arange(packed.shape[1])[None]).logits[0]
    torch.testing.assert_close(packed_logits, separate)
    assert not torch.allclose(unmasked[4:], separate[4:], atol=1e-4)  # the mask is what makes them equal


def test_a_token_cannot_attend_across_eot() -> None:
    model = tiny_model()
    row = torch.tensor([[20, 21, 22, EOT, 30, 31, 32, 33]])
    changed = row.clone()
    changed[0, :3] = torch.tensor([50, 51, 52])  # rewrite the first document only
    with torch.no_grad():
        before, after = model(row).logits, model(changed).logits
    torch.testing.assert_close(before[0, 4:], after[0, 4:])
    assert not torch.allclose(before[0, :3], after[0, :3])

    # Gradient check: nothing of the second document depends on the first document's embeddings.
    embeddings = model.word_embedding(row).detach().requires_grad_(True)
    hook = model.word_embedding.register_forward_hook(lambda *_: embeddings)
    try:
        model(row).logits[0, 4:].sum().backward()
    finally:
        hook.remove()
    assert embeddings.grad[0, :4].abs().max() == 0
    assert embeddings.grad[0, 4:].abs().max() > 0


def test_query_layer_shape_and_queries_are_not_layer_normed() -> None:
    model = tiny_model()
    config = model.config
    assert model.top_query_embedding.weight.shape == (config.max_seq_len, config.d_model)
    assert len(model.layers) == config.num_layers and model.layers[-1] is model.query_layer
    row = torch.tensor([[20, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        # Sharpen the query layer's attention so that a change of the query is clearly visible.
        model.query_layer.attention.q_proj.weight *= 20.0
        model.query_layer.attention.k_proj.weight *= 20.0
        before = model(row).logits
        model.top_query_embedding.weight[3] *= 3.0  # a LayerNorm in front would make this a no-op
        after = model(row).logits
    changed = (before - after).abs().amax(dim=-1)[0]
    assert changed[3] > 1e-4
    assert changed[[0, 1, 2, 4, 5]].max() == 0  # the query of position 3 is used at position 3 only


def test_forward_follows_the_documented_layout() -> None:
    """blocks → final LN → query layer (q from the table, k/v from LN(h), residual from h) → tied head."""
    model = tiny_model()
    row = torch.tensor([[20, 21, 22, 23, 24]])
    positions = torch.arange(5)[None]
    with torch.no_grad():
        hidden = model.word_embedding(row) + model.position_embedding(positions)
        for block in model.blocks:
            normed = block.attention_norm(hidden)
            hidden = hidden + attend(block, normed, normed)
            hidden = hidden + block.ffn(block.ffn_norm(hidden))[0]
        hidden = model.final_norm(hidden)
        layer = model.query_layer
        hidden = hidden + attend(layer, model.top_query_embedding(positions), layer.attention_norm(hidden))
        hidden = hidden + layer.ffn(layer.ffn_norm(hidden))[0]
        expected = hidden @ model.word_embedding.weight.T
        torch.testing.assert_close(model(row).logits, expected)


def attend(block, query_source: torch.Tensor, key_value_source: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention written out, fp32, causal."""
    attention = block.attention
    heads, head_dim = attention.num_heads, attention.head_dim

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1, heads, head_dim).transpose(1, 2)

    q = split(attention.q_proj(query_source))
    k = split(attention.k_proj(key_value_source))
    v = split(attention.v_proj(key_value_source))
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    length = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = F.softmax(scores.float(), dim=-1) @ v
    return attention.out_proj(out.transpose(1, 2).reshape(1, length, heads * head_dim))


def test_init_scales_output_projections() -> None:
    torch.manual_seed(0)
    model = PanguModel(get_config("tiny", num_layers=8, d_model=128, num_heads=4, d_ff=512, vocab_size=1000))
    out_std = model.blocks[0].attention.out_proj.weight.std().item()
    in_std = model.blocks[0].attention.q_proj.weight.std().item()
    assert abs(in_std - 0.02) < 0.002
    assert abs(out_std - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert model.blocks[0].ffn.fc_out.bias.abs().max() == 0
    assert abs(model.word_embedding.weight.std().item() - 0.02) < 0.002
