"""PanGu-α / PanGu-Σ decoder in plain PyTorch.

Layout (SPEC §5.1, our reading of "L−1 normal blocks → final LayerNorm → query layer → tied head"):

    h = dropout(word_emb[ids] + pos_emb[pos])
    for each of the L−1 blocks:                    pre-LN: h += attn(LN(h)); h += ffn(LN(h))
    h = final_LN(h)
    query layer:  kv = LN_a(h); q = top_query_emb[pos]   (q is *not* layer-normed)
                  h += attn(q, kv); h += ffn(LN_f(h))     (residual from h)
    logits = h @ word_emb.T                          (no LayerNorm after the query layer)

This follows the released MindSpore code, where the backbone applies its final LayerNorm before
`top_query_layer` and the head multiplies the query layer's output by the word table directly.
The top `moe_layers` layers (the query layer among them) swap their FFN for a sparse one (moe.py).
With a tensor-parallel group (`tp`, tensor_parallel.py) the dense layers split Megatron-style (the experts
of the sparse layers are replicated over the group).

Kernels (GPU speed; the CPU path is unchanged): `PanguModel.attention_backend` ("auto" | "sdpa" |
"flex", see masks.py: training on CUDA uses FlexAttention with a block-sparse document mask and no
attention-probability dropout) and `PanguModel.set_expert_backend` ("auto" | "loop" | "grouped", see
moe.py). Neither the attention layout nor the routing nor the domain-id check syncs with the host in a
CUDA training forward. TF32, autocast and `torch.compile` live in speed.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PanguConfig
from .masks import ATTENTION_BACKENDS, AttentionLayout, attention_backend, attention_layout, position_ids_from_eot
from .moe import EXPERT_BACKENDS, DenseFFN, ExpertBank, MixtureOfGroupedExperts, build_ffn
from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    as_tensor_parallel,
    copy_to_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)

IGNORE_INDEX = -100

_compiled_flex_attention = None


def flex_attention_kernel(device: torch.device):
    """FlexAttention for `device`: compiled on CUDA (eager FlexAttention materialises the full score
    matrix there), eager elsewhere (the CPU runs it for tests, forward only). Compiled once per process;
    inside a `torch.compile`d block Dynamo inlines it."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex_attention
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention  # the CPU; or already inside a compiled block, which compiles it with the rest
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus their positions (for the mask)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    position_ids: torch.Tensor | None = None
    next_position: torch.Tensor | None = None  # [B]: position of the next token (0 after an <eot>)

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls(keys=[None] * num_layers, values=[None] * num_layers)

    @property
    def length(self) -> int:
        return 0 if self.position_ids is None else self.position_ids.shape[1]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            key = torch.cat([self.keys[layer], key], dim=2)
            value = torch.cat([self.values[layer], value], dim=2)
        self.keys[layer], self.values[layer] = key, value
        return key, value


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, what the optimiser sees
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    # Each label's loss, detached ([B·T], 0 where ignored): the per-domain losses are summed from it, without
    # a second pass over the logits
    token_loss: torch.Tensor | None = None


def label_losses(logits: torch.Tensor, labels: torch.Tensor, pad_token_id: int, tp: TensorParallel | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each label's cross-entropy in fp32, [B·T]; whether it counts, [B·T]): `<pad>` and -100 labels do not
    count and have loss 0. The language-model loss is their mean over the labels that count, and the per-domain
    losses their sums (`metrics.domain_loss_sums`). With `tp` the logits are this rank's vocabulary columns
    (a collective over its group)."""
    labels = labels.masked_fill(labels == pad_token_id, IGNORE_INDEX).reshape(-1)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if tp is not None:
        losses = vocab_parallel_cross_entropy(flat, labels, tp, IGNORE_INDEX, reduction="none")
    else:
        losses = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses, labels != IGNORE_INDEX


class Attention(nn.Module):
    """Multi-head attention whose queries and keys/values may come from different inputs.

    With `tp` (tensor_parallel.py) each rank computes `num_heads / tp.size` whole heads: query/key/value
    column-parallel, the output projection row-parallel."""

    def __init__(self, config: PanguConfig, layer_index: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.tp = tp = as_tensor_parallel(tp)
        self.num_heads = config.num_heads if tp is None else tp.part(config.num_heads, "num_heads")
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        d = config.d_model
        if tp is None:
            self.q_proj = nn.Linear(d, d)
            self.k_proj = nn.Linear(d, d)
            self.v_proj = nn.Linear(d, d)
            self.out_proj = nn.Linear(d, d)
        else:  # the inputs enter the parallel region once, in forward
            self.q_proj = ColumnParallelLinear(d, d, tp, copy_input=False)
            self.k_proj = ColumnParallelLinear(d, d, tp, copy_input=False)
            self.v_proj = ColumnParallelLinear(d, d, tp, copy_input=False)
            self.out_proj = RowParallelLinear(d, d, tp)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query_source: torch.Tensor,
        key_value_source: torch.Tensor,
        layout: AttentionLayout,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.tp is not None:
            same = query_source is key_value_source
            key_value_source = copy_to_tensor_parallel_region(key_value_source, self.tp)
            query_source = key_value_source if same else copy_to_tensor_parallel_region(query_source, self.tp)
        q = self._heads(self.q_proj(query_source))
        k = self._heads(self.k_proj(key_value_source))
        v = self._heads(self.v_proj(key_value_source))
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        out_dtype = q.dtype
        if layout.block_mask is not None:
            # FlexAttention keeps its softmax statistics in fp32 on every device. It has no dropout:
            # the attention probabilities are not dropped on this path (masks.py explains the choice).
            y = flex_attention_kernel(q.device)(q, k, v, block_mask=layout.block_mask)
            batch, _, length, _ = y.shape
            y = y.to(out_dtype).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
            return self.out_proj(y)
        if q.device.type != "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            # The CPU math kernel does its softmax in the input dtype; PanGu-α wants fp32 softmax.
            # (CUDA flash / memory-efficient kernels already accumulate the softmax in fp32.)
            q, k, v = q.float(), k.float(), v.float()
        dropout = self.dropout if self.training else 0.0
        # Dropout on this rank's heads draws from a stream of its own (the rest of the model draws the same
        # masks on every rank of a tensor group).
        rng = self.tp.local_rng(q.device) if self.tp is not None and dropout > 0 else contextlib.nullcontext()
        with rng:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=layout.mask,
                is_causal=layout.is_causal,
                dropout_p=dropout,
            )
        batch, _, length, _ = y.shape
        y = y.to(out_dtype).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(y)


class Block(nn.Module):
    """Pre-LN transformer block. As the query layer, queries come from an outside tensor instead."""

    def __init__(self, config: PanguConfig, layer_index: int, expert_shard: tuple[int, int] | None = None,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_index, tp)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = build_ffn(config, layer_index, expert_shard, tp)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        layout: AttentionLayout,
        token_ids: torch.Tensor,
        domain_ids: torch.Tensor,
        query: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.attention_norm(hidden)
        attended = self.attention(normed if query is None else query, normed, layout, cache)
        hidden = hidden + self.residual_dropout(attended)
        ffn_out, aux_loss = self.ffn(self.ffn_norm(hidden), token_ids, domain_ids)
        return hidden + self.residual_dropout(ffn_out), aux_loss


class PanguModel(nn.Module):
    """`expert_shard` (rank, size): RRE layers hold only that shard of their experts (training with the
    experts spread over ranks); the rest of the model, and each expert's weights, are as without it.

    `attention_backend` ("auto", "sdpa" or "flex"; `masks.attention_backend`) picks the attention kernel
    per forward; set it on the instance to force one (e.g. "sdpa" to keep PanGu-α's attention dropout on
    the GPU, at the cost of a dense mask and one sync per forward).

    `tp` (a `tensor_parallel.TensorParallel` group of more than one rank) splits the model Megatron-style:
    attention by heads, the dense FFNs by their inner width, the word embedding and the tied head by the
    vocabulary; sparse FFNs (PanGu-Σ's experts) are not split: each rank of the group holds them whole and
    computes them on the same, replicated input. `logits` are then this rank's vocabulary columns and the loss
    is computed from them (`vocab_parallel_cross_entropy`); parameter names are the dense model's
    (`tensor_parallel.shard_state_dict` / `gather_state_dict` convert). Without it the model is the dense
    one, unchanged."""

    attention_backend: str = "auto"

    def __init__(self, config: PanguConfig, expert_shard: tuple[int, int] | None = None,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp = as_tensor_parallel(tp)
        d = config.d_model
        if tp is None:
            self.word_embedding = nn.Embedding(config.vocab_size, d)
        else:
            self.word_embedding = VocabParallelEmbedding(config.vocab_size, d, tp)
        self.position_embedding = nn.Embedding(config.max_seq_len, d)
        self.top_query_embedding = nn.Embedding(config.max_seq_len, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, expert_shard, tp) for i in range(config.num_layers - 1))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.query_layer = Block(config, config.num_layers - 1, expert_shard, tp)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Embeddings and linears N(0, σ); output projections N(0, σ/√(2L)); biases 0; LN (1, 0)."""
        for name, module in self.named_modules():
            self.reset_module(name, module)

    def reset_module(self, name: str, module: nn.Module) -> None:
        """`reset_parameters` for one module's own tensors, drawing from the global stream as the whole
        pass does: calling it for every module in `named_modules()` order is `reset_parameters()`
        (`pangu_model.materialize` builds a model one module at a time this way)."""
        std = self.config.init_std
        output_std = std / math.sqrt(2 * self.config.num_layers)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            is_output = name.endswith(("attention.out_proj", "ffn.fc_out"))
            nn.init.normal_(module.weight, 0.0, output_std if is_output else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ExpertBank):
            # One draw from the global stream per bank, then a generator per expert seeded by its
            # global index: a shard of the bank initialises exactly its rows of the whole bank,
            # and the rest of the model sees the same stream either way.
            base = int(torch.randint(0, 2**62, (1,), device="cpu"))
            device = module.w_in.device
            generator = None if device.type == "meta" else torch.Generator(device=device)
            for row in range(0 if generator is None else module.num_experts):
                generator.manual_seed(base + module.first_expert + row)
                nn.init.normal_(module.w_in[row], 0.0, std, generator=generator)
                nn.init.normal_(module.w_out[row], 0.0, output_std, generator=generator)
            nn.init.zeros_(module.b_in)
            nn.init.zeros_(module.b_out)
        elif isinstance(module, MixtureOfGroupedExperts):
            nn.init.ones_(module.expert_scale)

    def set_attention_backend(self, backend: str) -> "PanguModel":
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")
        self.attention_backend = backend
        return self

    def set_expert_backend(self, backend: str) -> "PanguModel":
        """Force the routed-experts kernel of every `ExpertBank` ("auto", "loop" or "grouped"; moe.py)."""
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(EXPERT_BACKENDS)}")
        for module in self.modules():
            if isinstance(module, ExpertBank):
                module.expert_backend = backend
        return self

    @property
    def layers(self) -> list[Block]:
        """All L layers bottom-up, the query layer last."""
        return [*self.blocks, self.query_layer]

    def _domain_ids(self, domain_ids: torch.Tensor | int | None, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token domain ids [B, T] from None, an int, per-row [B] or per-token [B, T]."""
        if domain_ids is None:
            if self.config.router == "rre" and self.config.num_domains > 1:
                raise ValueError("an RRE model with several domains needs domain_ids")
            domain_ids = self.config.domain_id_offset
        if isinstance(domain_ids, int):
            # Filled on the device: a host int copied to a CUDA device would wait for the stream.
            domain_ids = torch.full((), domain_ids, device=input_ids.device, dtype=torch.long)
        domain_ids = torch.as_tensor(domain_ids, device=input_ids.device, dtype=torch.long)
        if domain_ids.dim() == 1:
            domain_ids = domain_ids[:, None]
        if self.config.router == "rre":
            first = self.config.domain_id_offset
            last = first + self.config.num_domains - 1
            out_of_range = ((domain_ids < first) | (domain_ids > last)).any()
            message = f"domain ids must lie in [{first}, {last}] for this model"
            if domain_ids.device.type == "cuda":
                # Checked on the device, no sync: a bad id stops the run with a device-side assert.
                torch._assert_async(~out_of_range, message)
            elif bool(out_of_range):
                raise ValueError(message)
        return domain_ids.expand_as(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        domain_ids: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Logits [B, T, V]; with `labels` [B, T] also the loss (`<pad>` and -100 are ignored).

        Without `position_ids`, positions restart after every `<eot>`; either way the attention mask
        is derived from the positions, so packed documents never see each other.
        """
        config = self.config
        query_length = input_ids.shape[1]
        if position_ids is None:
            start = cache.next_position if cache is not None else None
            position_ids = position_ids_from_eot(input_ids, config.eot_token_id, start)
        all_position_ids = position_ids
        if cache is not None:
            if cache.position_ids is not None:
                all_position_ids = torch.cat([cache.position_ids, position_ids], dim=1)
            cache.position_ids = all_position_ids
            cache.next_position = torch.where(
                input_ids[:, -1] == config.eot_token_id, torch.zeros_like(position_ids[:, -1]), position_ids[:, -1] + 1
            )
        backend = attention_backend(
            input_ids.device, self.training, config.dropout, cached=cache is not None, requested=self.attention_backend
        )
        layout = attention_layout(all_position_ids, query_length, backend)
        domains = self._domain_ids(domain_ids, input_ids)

        hidden = self.embedding_dropout(self.word_embedding(input_ids) + self.position_embedding(position_ids))
        aux_loss = hidden.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            hidden, block_aux = self._run_block(block, hidden, layout, input_ids, domains, None, cache)
            aux_loss = aux_loss + block_aux
        hidden = self.final_norm(hidden)
        query = self.top_query_embedding(position_ids)
        hidden, block_aux = self._run_block(self.query_layer, hidden, layout, input_ids, domains, query, cache)
        aux_loss = aux_loss + block_aux
        if self.tp is not None:  # this rank's vocabulary columns
            hidden = copy_to_tensor_parallel_region(hidden, self.tp)
        logits = F.linear(hidden, self.word_embedding.weight)  # tied head
        pieces = config.tokenizer_pieces
        if pieces is not None and pieces < config.vocab_size:
            # Rows padded past the tokenizer's pieces (for speed) are not tokens: no probability mass.
            logits = logits.masked_fill(self._padding_ids(logits), float("-inf"))

        output = ModelOutput(logits=logits, aux_loss=aux_loss)
        if labels is not None:
            losses, counted = label_losses(logits, labels, config.pad_token_id, self.tp)
            output.lm_loss = losses.sum() / counted.sum()  # the mean over the labels that count
            output.token_loss = losses.detach()
            output.loss = output.lm_loss + aux_loss
        return output

    def _padding_ids(self, logits: torch.Tensor) -> torch.Tensor:
        first = 0 if self.tp is None else self.word_embedding.vocab_start  # this rank's first column
        return torch.arange(first, first + logits.shape[-1], device=logits.device) >= self.config.tokenizer_pieces

    def _run_block(
        self,
        block: Block,
        hidden: torch.Tensor,
        layout: AttentionLayout,
        token_ids: torch.Tensor,
        domain_ids: torch.Tensor,
        query: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.gradient_checkpointing and self.training and cache is None:
            return checkpoint(block, hidden, layout, token_ids, domain_ids, query, None, use_reentrant=False)
        return block(hidden, layout, token_ids, domain_ids, query, cache)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.num_layers)

    def sparse_layers(self) -> dict[str, nn.Module]:
        """Qualified name → sparse FFN module of every routed layer."""
        return {
            name: module
            for name, module in self.named_modules()
            if not isinstance(module, DenseFFN) and name.endswith(".ffn")
        }


__all__ = ["PanguModel", "ModelOutput", "KVCache"]
