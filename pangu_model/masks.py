"""Documents packed into one row: position ids that restart after `<eot>`, and the attention layout.

A training row holds several documents joined by `<eot>` (SPEC §4). The `<eot>` closes its document,
so positions restart on the token after it, and no token may attend to an earlier document.
Documents are recovered from position ids alone (a document is a run of consecutive positions), so
callers that bring their own position ids get the matching mask for free.

Two attention backends serve the same mask (`attention_backend` picks one):

- ``"sdpa"``: `F.scaled_dot_product_attention` with `is_causal` when no row is packed (flash / fused
  kernels), otherwise a dense boolean [B, 1, Tq, Tk] mask. Deciding which costs one device→host sync
  per forward (not per layer). Applies PanGu-α's attention-probability dropout (0.1) in training.
  The CPU, evaluation and KV-cache decode path, exactly as before.
- ``"flex"``: FlexAttention with a block-sparse document-causal `BlockMask`, built once per forward
  straight from the document ids (no dense B×T×T mask, no sync) and shared by all layers. The
  default for training on CUDA.

Attention dropout on the flex path. Neither FlexAttention nor variable-length flash attention
(`torch.nn.attention.varlen`, which also needs host-side sequence counts) takes a dropout argument,
and a `score_mod` cannot express it (dropout acts after the softmax normalisation and rescales by
1/(1−p)). So the flex path trains **without** dropout on the attention probabilities; the embedding
dropout and the dropout on both residual branches (attention output and FFN output, p = config.dropout)
stay. That is the usual trade for packed-document training at this scale (Megatron-Core and torchtitan
default attention dropout to 0 for the same kernels) and it only changes the training-time noise:
in evaluation both backends compute the same function. A run that wants PanGu-α's attention dropout
exactly asks for ``"sdpa"`` (`PanguModel.attention_backend = "sdpa"`) and pays for the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

AttentionBackendName = Literal["auto", "sdpa", "flex"]
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")

# FlexAttention's sparse block (both dimensions); its CUDA kernels are tuned for 128.
FLEX_BLOCK_SIZE = 128


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
    """What the attention kernel needs: `is_causal` (one document, the fused/flash SDPA path), an explicit
    SDPA mask, or a FlexAttention block mask.

    `mask` is boolean [B, 1, Tq, Tk], True where a query may attend to a key. `block_mask` (a FlexAttention
    `BlockMask`) replaces both on the flex path.
    """

    mask: torch.Tensor | None
    is_causal: bool
    block_mask: Any = None


def attention_backend(
    device: torch.device | str,
    training: bool,
    dropout: float = 0.0,
    cached: bool = False,
    requested: str = "auto",
) -> str:
    """The attention kernel for one forward: ``"sdpa"`` or ``"flex"`` (see the module docstring).

    ``"auto"``: flex when training on CUDA without a KV cache (the hot loop: no device→host sync, no
    dense mask; attention-probability dropout is not applied there whatever `dropout` says), SDPA
    everywhere else (CPU, evaluation, generation), exactly as before. An explicit ``"flex"`` also
    serves evaluation (and CPU, eagerly, for tests); a KV cache always takes SDPA, whose decode path
    needs no mask at all. An explicit ``"sdpa"`` keeps attention dropout at the price of the dense mask.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; known: {', '.join(ATTENTION_BACKENDS)}")
    if cached or requested == "sdpa":
        return "sdpa"
    if requested == "flex":
        return "flex"
    return "flex" if torch.device(device).type == "cuda" and training else "sdpa"


def document_causal_mask(document_ids: torch.Tensor, query_length: int) -> torch.Tensor:
    """Block-diagonal causal mask for the last `query_length` tokens against all `Tk` tokens."""
    total = document_ids.shape[1]
    past = total - query_length
    key_index = torch.arange(total, device=document_ids.device)
    query_index = key_index[past:]
    causal = key_index[None, :] <= query_index[:, None]
    same_document = document_ids[:, past:, None] == document_ids[:, None, :]
    return (same_document & causal[None]).unsqueeze(1)


def document_mask_mod(document_ids: torch.Tensor, query_length: int):
    """FlexAttention `mask_mod`: the same predicate as `document_causal_mask`, evaluated per (q, kv).

    Indices are clamped into the row so that a kernel evaluating the padded tail of its last block
    never reads out of bounds (those scores are discarded by the kernel's length check anyway)."""
    total = document_ids.shape[1]
    past = total - query_length

    def mask_mod(b, h, q_idx, kv_idx):
        query = (q_idx + past).clamp(max=total - 1)
        key = kv_idx.clamp(max=total - 1)
        return (key <= query) & (document_ids[b, query] == document_ids[b, key])

    return mask_mod


def _dense_to_ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] 0/1 block matrix → (blocks per row, their column indices first), as BlockMask wants."""
    blocks = blocks.to(torch.int32)
    counts = blocks.sum(dim=-1).to(torch.int32)
    indices = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def document_block_tables(
    document_ids: torch.Tensor, query_length: int, block_size: int = FLEX_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) [B, 1, Tq/bs, Tk/bs] int8 block tables of the document-causal mask, from block ends.

    Equal to what `create_block_mask` derives from the dense mask, without building it: document ids
    never decrease along a row and take every value in between, so a (query block, key block) tile
    holds an allowed pair iff its key block starts before its last query and the document of key
    `kmax` reaches the first query at or after `kmax`; it is full iff every key precedes every query
    and one document spans both blocks, and no tile that overhangs the row is full.
    """
    batch, total = document_ids.shape
    past = total - query_length
    device = document_ids.device
    q_blocks = -(-query_length // block_size)
    k_blocks = -(-total // block_size)
    q_first = past + torch.arange(q_blocks, device=device) * block_size  # absolute positions
    q_last = (q_first + block_size - 1).clamp(max=total - 1)
    k_first = torch.arange(k_blocks, device=device) * block_size
    k_last = (k_first + block_size - 1).clamp(max=total - 1)

    def doc(index: torch.Tensor) -> torch.Tensor:  # [rows, cols] positions → [B, rows, cols] documents
        return document_ids[:, index.reshape(-1)].view(batch, *index.shape)

    qf, ql = q_first[:, None], q_last[:, None]
    kf, kl = k_first[None, :], k_last[None, :]
    reach = torch.maximum(qf, kl)  # first query at or after the key block's last key
    any_allowed = (kf <= ql)[None] & (doc(reach) == doc(kl.expand_as(reach)))
    complete = ((ql - qf + 1 == block_size) & (kl - kf + 1 == block_size))[None]
    full = (kl <= qf)[None] & (doc(kf.expand(q_blocks, k_blocks)) == doc(ql.expand(q_blocks, k_blocks))) & complete
    partial = any_allowed & ~full
    return partial.unsqueeze(1).to(torch.int8), full.unsqueeze(1).to(torch.int8)


def document_block_mask(document_ids: torch.Tensor, query_length: int, block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention `BlockMask` of the document-causal mask: one per forward, shared by every layer.

    Block-level tensor ops only (O(B·(T/bs)²) work, no dense mask, no device→host sync)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = document_block_tables(document_ids, query_length, block_size)
    kv_num_blocks, kv_indices = _dense_to_ordered(partial)
    full_kv_num_blocks, full_kv_indices = _dense_to_ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=document_mask_mod(document_ids, query_length),
        seq_lengths=(query_length, document_ids.shape[1]),
    )


def attention_layout(position_ids: torch.Tensor, query_length: int, backend: str = "sdpa") -> AttentionLayout:
    """Choose the cheapest correct attention call for queries at the end of `position_ids` [B, Tk].

    ``"sdpa"``: one device→host sync per forward (not per layer) decides whether any row is packed.
    ``"flex"``: no sync; a document-causal block mask serves packed and unpacked rows alike.
    """
    document_ids = document_ids_from_positions(position_ids)
    if backend == "flex":
        return AttentionLayout(mask=None, is_causal=False, block_mask=document_block_mask(document_ids, query_length))
    if backend != "sdpa":
        raise ValueError(f"attention_layout needs a resolved backend ('sdpa' or 'flex'), got {backend!r}")
    # Document ids only grow along a row, so first == last means the row holds one document.
    packed = bool((document_ids[:, -1] != document_ids[:, 0]).any())
    past = position_ids.shape[1] - query_length
    if not packed and past == 0:
        return AttentionLayout(mask=None, is_causal=True)
    if not packed and query_length == 1:
        return AttentionLayout(mask=None, is_causal=False)
    return AttentionLayout(mask=document_causal_mask(document_ids, query_length), is_causal=False)
