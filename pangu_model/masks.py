"""Documents packed into one row: position ids that restart after `<eot>`, and the attention layout.

A training row holds several documents joined by `<eot>` (SPEC §4). The `<eot>` closes its document,
so positions restart on the token after it, and no token may attend to an earlier document.
Documents are recovered from position ids alone (a document is a run of consecutive positions), so
callers that bring their own position ids get the matching mask for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def position_ids_from_eot(
    input_ids: torch.Tensor, eot_token_id: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions [B, T] that restart at 0 after every `<eot>`.

    `start` [B] continues the first document of each row from an earlier chunk (KV-cache decoding).
    """
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(batch, length)
    starts_document = torch.zeros_like(input_ids, dtype=torch.bool)
    starts_document[:, 1:] = input_ids[:, :-1] == eot_token_id
    starts_document[:, 0] = True
    document_start = torch.where(starts_document, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = index - document_start
    if start is not None:
        in_first_document = document_start == 0
        positions = positions + torch.where(in_first_document, start[:, None], torch.zeros_like(positions))
    return positions


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index [B, T] of every token: a new document begins wherever positions do not count up by one."""
    starts_document = torch.ones_like(position_ids, dtype=torch.bool)
    starts_document[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts_document.long().cumsum(dim=1)


@dataclass(frozen=True)
class AttentionLayout:
    """What SDPA needs: either `is_causal` (one document, the fused/flash path) or an explicit mask.

    `mask` is boolean [B, 1, Tq, Tk], True where a query may attend to a key.
    """

    mask: torch.Tensor | None
    is_causal: bool


def document_causal_mask(document_ids: torch.Tensor, query_length: int) -> torch.Tensor:
    """Block-diagonal causal mask for the last `query_length` tokens against all `Tk` tokens."""
    total = document_ids.shape[1]
    past = total - query_length
    key_index = torch.arange(total, device=document_ids.device)
    query_index = key_index[past:]
    causal = key_index[None, :] <= query_index[:, None]
    same_document = document_ids[:, past:, None] == document_ids[:, None, :]
    return (same_document & causal[None]).unsqueeze(1)


def attention_layout(position_ids: torch.Tensor, query_length: int) -> AttentionLayout:
    """Choose the cheapest correct SDPA call for queries at the end of `position_ids` [B, Tk].

    One device→host sync per forward (not per layer) decides whether any row is packed.
    """
    document_ids = document_ids_from_positions(position_ids)
    # Document ids only grow along a row, so first == last means the row holds one document.
    packed = bool((document_ids[:, -1] != document_ids[:, 0]).any())
    past = position_ids.shape[1] - query_length
    if not packed and past == 0:
        return AttentionLayout(mask=None, is_causal=True)
    if not packed and query_length == 1:
        return AttentionLayout(mask=None, is_causal=False)
    return AttentionLayout(mask=document_causal_mask(document_ids, query_length), is_causal=False)
