"""Scoring: perplexity ranking with shared-prefix batching, and generation.

Perplexity ranking. Every candidate of an example is scored as `<eot> + context + text_i`, where the
context (the in-context demonstrations, if any) and each candidate text are encoded separately and
the loss is summed over the tokens of `text_i` (the whole filled template: the paper's and
OpenCompass's choice). `<eot>` opens the row, as documents open after `<eot>` in training, so the first
token of the text is scored too. Three normalisations are kept:

- `mean_token`: summed loss / tokens scored (the primary one, "lowest mean token loss");
- `char_norm`: summed loss / characters of the scored text (lm-eval's `acc_norm` normalises by length);
- `sum`: summed loss (lm-eval's `acc`, unnormalised).

Shared-prefix batching: the candidates' token sequences usually share a long prefix (the
demonstrations, `这是关于`, a C3 question, a CHID passage up to the blank). That prefix runs once
through the model with the KV cache; the cache is expanded to one row per candidate and only the
candidate-specific tails run, as one padded batch. Without sharing, each candidate is a full row.
Both give the same numbers (tested, and asserted by benchmarks/eval_throughput.py).

Windows longer than the model's `max_seq_len` (the model reads all tokens but the last, which is only
predicted): the shared part loses tokens on the left (first the demonstrations) and, only if a tail
alone is too long, every tail is cut on the right. Scored tokens
that fall outside the window are not counted, for every candidate alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from pangu_model.generate import pick_next, seeded_generator
from pangu_model.model import KVCache, PanguModel

EOT_ID = 9
NEWLINE_ID = 3
VARIANTS = ("mean_token", "char_norm", "sum")


@dataclass
class CandidateScore:
    loss: float  # summed negative log-likelihood (nats) of the scored tokens
    tokens: int  # tokens scored
    chars: int  # characters of the scored text
    greedy: bool  # every scored token is the argmax of its prediction

    def variant(self, name: str) -> float:
        """The ranking key (lower is better) of one normalisation."""
        if name == "mean_token":
            return self.loss / max(self.tokens, 1)
        if name == "char_norm":
            return self.loss / max(self.chars, 1)
        if name == "sum":
            return self.loss
        raise ValueError(f"unknown normalisation {name!r}")


def rank(scores: Sequence[CandidateScore]) -> dict[str, int]:
    """Index of the best candidate under each normalisation (ties: the first)."""
    return {name: min(range(len(scores)), key=lambda i: scores[i].variant(name)) for name in VARIANTS}


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


@dataclass
class _Plan:
    shared: list[int]  # the shared window tokens (kept part)
    tails: list[list[int]]  # per candidate, the tokens after the shared part (possibly cut on the right)
    scored_from: int  # index in `shared` of the first scored token (scored tokens of the common part)


def _plan(context: Sequence[int], texts: Sequence[Sequence[int]], max_len: int) -> _Plan:
    # every tail keeps at least its last token (the model reads it not: it is only predicted)
    common = min(_common_prefix(texts), max(min((len(t) for t in texts), default=0) - 1, 0))
    shared = list(context) + list(texts[0][:common])
    region_start = len(context)  # the scored part of `shared` starts here
    tails = [list(t[common:]) for t in texts]
    # The model reads shared + tail[:-1] (the last token is only predicted): that must fit max_len.
    longest = max((len(t) for t in tails), default=0)
    if longest > max_len:
        tails = [t[:max_len] for t in tails]
        longest = max_len
    keep = max(1, max_len + 1 - max(longest, 1))
    if len(shared) > keep:
        drop = len(shared) - keep
        shared = shared[drop:]
        region_start -= drop
    # the first window token has no prediction: scored tokens start at index >= 1
    return _Plan(shared, tails, max(region_start, 1))


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL and greedy flag: logits [..., V] predicting targets [...]."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll, logprobs.argmax(dim=-1) == targets


@torch.inference_mode()
def score_candidates(
    model: PanguModel,
    context: Sequence[int],
    texts: Sequence[Sequence[int]],
    chars: Sequence[int] | None = None,
    *,
    share_prefix: bool = True,
    min_shared: int = 0,
    pad_id: int = 6,
) -> list[CandidateScore]:
    """Scores of the candidate token sequences `texts`, each conditioned on `context` (non-empty,
    normally starting with `<eot>`). `chars[i]` is the character count of the text `texts[i]` came from.

    `share_prefix` runs the shared prefix once (KV cache); `min_shared` turns it off for one call when the
    prefix is shorter than that many tokens or there is one candidate (a second forward call then costs
    more than it saves). The numbers do not depend on either."""
    if not context:
        raise ValueError("context must hold at least one token (e.g. <eot>)")
    device = next(model.parameters()).device
    chars = list(chars) if chars is not None else [len(t) for t in texts]
    plan = _plan(context, texts, model.config.max_seq_len)
    shared = torch.tensor([plan.shared], device=device)
    n = len(texts)
    longest = max((len(t) for t in plan.tails), default=0)
    if share_prefix and min_shared and (len(plan.shared) < min_shared or n < 2):
        share_prefix = False

    # losses of the scored tokens inside the shared part (identical for every candidate)
    if share_prefix:
        cache = model.new_cache()
        shared_logits = model(shared, cache=cache).logits[0]  # [S, V]
        common_nll, common_greedy = _shared_losses(shared_logits, plan)
        tail_nll = [0.0] * n
        tail_greedy = [True] * n
        if longest:
            rows = torch.full((n, longest), pad_id, dtype=torch.long, device=device)
            for i, tail in enumerate(plan.tails):
                if tail:
                    rows[i, : len(tail)] = torch.tensor(tail, device=device)
            logits = shared_logits[-1].expand(n, -1)[:, None]  # predicts tail[0]
            if longest > 1:
                _expand_cache(cache, n)
                tail_logits = model(rows[:, :-1], cache=cache).logits  # [n, L-1, V]
                logits = torch.cat([logits, tail_logits], dim=1)
            nll, greedy = _token_losses(logits, rows)
            for i, tail in enumerate(plan.tails):
                k = len(tail)
                tail_nll[i] = float(nll[i, :k].double().sum())
                tail_greedy[i] = bool(greedy[i, :k].all())
    else:
        width = len(plan.shared) + longest
        rows = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        for i, tail in enumerate(plan.tails):
            rows[i, : len(plan.shared) + len(tail)] = torch.tensor(plan.shared + tail, device=device)
        logits = model(rows[:, :-1]).logits  # [n, W-1, V]
        nll, greedy = _token_losses(logits, rows[:, 1:])  # position j predicts token j+1
        s = len(plan.shared)
        common_nll = float(nll[0, plan.scored_from - 1: s - 1].double().sum()) if s > plan.scored_from else 0.0
        common_greedy = bool(greedy[0, plan.scored_from - 1: s - 1].all()) if s > plan.scored_from else True
        tail_nll, tail_greedy = [], []
        for i, tail in enumerate(plan.tails):
            k = len(tail)
            tail_nll.append(float(nll[i, s - 1: s - 1 + k].double().sum()))
            tail_greedy.append(bool(greedy[i, s - 1: s - 1 + k].all()))

    common_tokens = max(len(plan.shared) - plan.scored_from, 0)
    return [
        CandidateScore(loss=common_nll + tail_nll[i], tokens=common_tokens + len(plan.tails[i]),
                       chars=chars[i], greedy=common_greedy and tail_greedy[i])
        for i in range(n)
    ]


def _shared_losses(shared_logits: torch.Tensor, plan: _Plan) -> tuple[float, bool]:
    s = len(plan.shared)
    if s <= plan.scored_from:
        return 0.0, True
    targets = torch.tensor(plan.shared[plan.scored_from:], device=shared_logits.device)
    nll, greedy = _token_losses(shared_logits[plan.scored_from - 1: s - 1], targets)
    return float(nll.double().sum()), bool(greedy.all())


def _expand_cache(cache: KVCache, n: int) -> None:
    """A one-row cache → n identical rows (views; the next forward concatenates new keys onto them)."""
    cache.keys = [k.expand(n, *k.shape[1:]) if k is not None else None for k in cache.keys]
    cache.values = [v.expand(n, *v.shape[1:]) if v is not None else None for v in cache.values]
    cache.position_ids = cache.position_ids.expand(n, -1)
    cache.next_position = cache.next_position.expand(n)


# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_ids(
    model: PanguModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (EOT_ID,),
    stop_check=None,
) -> list[int]:
    """New token ids after `prompt` (one row), stopping after a token in `stop_ids` (not returned), on
    `stop_check(new_ids)` returning True, at `max_new_tokens` or at `max_seq_len`.

    The decoding loop of `pangu_model.generate` (same logit filtering, same seeded generator, KV cache),
    with several stop tokens and a text stop condition; with `stop_ids=(<eot>,)` it returns exactly
    what `pangu_model.generate` appends (tested).
    """
    device = next(model.parameters()).device
    config = model.config
    stop = set(stop_ids)
    ids = torch.tensor([list(prompt)], device=device)
    budget = min(max_new_tokens, config.max_seq_len - ids.shape[1])
    generator = seeded_generator(device, do_sample, seed)
    cache = model.new_cache()
    step = ids
    out: list[int] = []
    for _ in range(max(budget, 0)):
        token = pick_next(model(step, cache=cache).logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        value = int(token)
        if value in stop:
            break
        out.append(value)
        if stop_check is not None and stop_check(out):
            break
        step = token[:, None]
    return out


def truncate_left(ids: list[int], limit: int) -> list[int]:
    return ids if len(ids) <= limit else ids[len(ids) - limit:]


def perplexity(total_loss: float, tokens: int) -> float:
    return math.exp(total_loss / max(tokens, 1))


__all__ = ["CandidateScore", "VARIANTS", "generate_ids", "rank", "score_candidates", "truncate_left"]
