"""A tiny model learns on CPU; activation checkpointing changes memory, not maths."""

import torch

from pangu_model import PanguModel, get_config

EOT, PAD = 9, 6
FIRST_FREE_ID = 10  # ids 0-9 are the special tokens of SPEC §4

SENTENCES = [
    "鹏程实验室发布了盘古大模型。",
    "今天北京天气晴朗，适合出门散步。",
    "机器学习需要大量高质量的中文语料。",
    "他在图书馆里读了一本关于历史的书。",
]


def encode(sentences: list[str]) -> tuple[torch.Tensor, int]:
    """Character-level ids packed into one row per pair of documents, `<eot>` after each document."""
    characters = sorted({ch for sentence in sentences for ch in sentence})
    vocab = {ch: FIRST_FREE_ID + i for i, ch in enumerate(characters)}
    documents = [[vocab[ch] for ch in sentence] + [EOT] for sentence in sentences]
    rows = [documents[0] + documents[1], documents[2] + documents[3]]
    width = max(map(len, rows))
    padded = [row + [PAD] * (width - len(row)) for row in rows]
    return torch.tensor(padded), FIRST_FREE_ID + len(characters)


def train(config, rows: torch.Tensor, steps: int, domain_ids=None) -> list[float]:
    torch.manual_seed(0)
    model = PanguModel(config).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = model(rows[:, :-1], domain_ids=domain_ids, labels=rows[:, 1:])
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        losses.append(out.lm_loss.item())
    return losses


def test_tiny_models_overfit_chinese_sequences() -> None:
    rows, vocab_size = encode(SENTENCES)
    base = get_config("tiny", vocab_size=vocab_size, max_seq_len=64, d_model=32, num_heads=4, d_ff=128, num_layers=2)
    dense = train(base, rows, steps=40)
    assert dense[-1] < 0.5 * dense[0], dense
    sparse_config = base.replace(router="rre", moe_layers=1, num_domains=2, experts_per_domain=2)
    sparse = train(sparse_config, rows, steps=40, domain_ids=torch.tensor([0, 1]))
    assert sparse[-1] < 0.5 * sparse[0], sparse


def test_pad_is_excluded_from_the_loss() -> None:
    rows, vocab_size = encode(SENTENCES)
    model = PanguModel(get_config("tiny", vocab_size=vocab_size, max_seq_len=64, d_model=32, num_heads=4,
                                  d_ff=64, num_layers=2, dropout=0.0))
    labels = rows[:, 1:]
    assert (labels == PAD).any()
    out = model(rows[:, :-1], labels=labels)
    logits = out.logits.reshape(-1, vocab_size)
    keep = labels.reshape(-1) != PAD
    expected = torch.nn.functional.cross_entropy(logits[keep], labels.reshape(-1)[keep])
    torch.testing.assert_close(out.lm_loss, expected)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    rows, vocab_size = encode(SENTENCES)
    config = get_config("tiny", vocab_size=vocab_size, max_seq_len=64, d_model=32, num_heads=4, d_ff=64,
                        num_layers=3, router="moge", moe_layers=1, num_experts=4, moge_groups=2)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PanguModel(config.replace(gradient_checkpointing=checkpointing)).train()
        torch.manual_seed(1)  # same dropout masks in both runs
        model(rows[:, :-1], labels=rows[:, 1:]).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_dropout_is_active_in_training_only() -> None:
    rows, vocab_size = encode(SENTENCES)
    model = PanguModel(get_config("tiny", vocab_size=vocab_size, max_seq_len=64, d_model=32, num_heads=4,
                                  d_ff=64, num_layers=2))
    assert model.config.dropout == 0.1
    model.train()
    assert not torch.equal(model(rows).logits, model(rows).logits)
    model.eval()
    assert torch.equal(model(rows).logits, model(rows).logits)
