"""Autoregressive generation: greedy or sampled (temperature, top-k, top-p), with a KV cache.

Rows stop independently at `<eot>`; a finished row is padded with `<pad>` until every row is done.
Sampling draws from a private seeded generator, so the same seed gives the same text.
"""

from __future__ import annotations

import torch

from .model import PanguModel


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to −inf every logit outside the top-k and outside the smallest set with mass ≥ top_p."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row from last-position logits [B, V]: argmax, or a seeded sample."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def seeded_generator(device: torch.device, do_sample: bool, seed: int | None) -> torch.Generator | None:
    if not do_sample:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


@torch.no_grad()
def generate(
    model: PanguModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    domain_ids: torch.Tensor | int | None = None,
    use_cache: bool = True,
    stop_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt ids [B, T] (one document per row, equal lengths) → prompt + continuation [B, T + n].

    Generation stops at `max_seq_len`, at `stop_token_id` (default: the config's `<eot>`) in every row,
    or after `max_new_tokens`.
    """
    config = model.config
    stop_token_id = config.eot_token_id if stop_token_id is None else stop_token_id
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    max_new_tokens = min(max_new_tokens, config.max_seq_len - input_ids.shape[1])
    generator = seeded_generator(input_ids.device, do_sample, seed)

    was_training = model.training
    model.eval()
    try:
        sequences = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = model.new_cache() if use_cache else None
        step_input = input_ids
        for _ in range(max(max_new_tokens, 0)):
            logits = model(step_input if use_cache else sequences, domain_ids=domain_ids, cache=cache).logits[:, -1]
            next_token = pick_next(logits, do_sample, temperature, top_k, top_p, generator)
            next_token = torch.where(finished, torch.full_like(next_token, config.pad_token_id), next_token)
            sequences = torch.cat([sequences, next_token[:, None]], dim=1)
            finished |= next_token == stop_token_id
            if bool(finished.all()):
                break
            step_input = next_token[:, None]
        return sequences
    finally:
        model.train(was_training)
