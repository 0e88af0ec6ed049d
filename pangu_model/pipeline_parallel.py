"""Pipeline parallelism for PanGu-α and PanGu-Σ with RRE experts (SPEC §5.1: pipeline stages across the
servers of a rack).

The model becomes a DeepSpeed `PipelineModule` of `LayerSpec`s, in PanguModel's order:

    word embedding (TiedLayerSpec "word_embedding") → position embedding + dropout → the L−1 blocks →
    final LayerNorm + query layer → tied head (TiedLayerSpec "word_embedding" again) → loss

The embeddings go with the first stage, the query layer and the head with the last; the L transformer
layers (the blocks and the query layer) are split over the stages as the caller says (the training program
passes `pangu_model.topology.stage_layers`, the rule the planner uses too; uneven where L does not divide).
The word embedding is one tied module on the first and the last stage: DeepSpeed broadcasts it from the
first stage at start and after a load, and all-reduces its gradient over the two stages before each
optimizer step, so both copies stay equal (and its norm is counted once, on the first stage).

With a `model` axis of more than one rank in the topology (tensor × pipeline parallelism) every stage is
built of tensor_parallel.py's layers: Megatron-style blocks and query layer, the vocabulary-parallel tied
embedding on the first and last stage, and the vocabulary-parallel cross-entropy on the last. Their tensor
group is the one DeepSpeed's grid makes for that axis (`StageTensorGroup`), so the layers' all-reduces and
DeepSpeed's own slice-group traffic (activations cut over the tensor ranks between stages) run in the same
group. DeepSpeed ties the embedding per tensor rank (the topology gives one tied group per data-parallel and
model coordinate), so rank r of the first stage and rank r of the last sum the gradient of the same
vocabulary rows; its clipping counts split parameters on every tensor rank, replicated ones on tensor rank
0 and the last stage's copy of the tied embedding not at all.

Why DeepSpeed's pipeline and not `torch.distributed.pipelining`: the trainer is a DeepSpeed engine already
(ZeRO over the data-parallel group, our parameter groups and lr schedule, its checkpoints), and
`PipelineEngine.train_batch` runs the 1F1B schedule (`TrainSchedule`) over plain `send`/`recv`, which gloo
has: it runs on CPU (tests/test_train_pipeline_parallel.py). Its limits are ours: ZeRO stage 0 or 1 only,
activations between stages are tensors (here the hidden state and the position ids, from which each stage
derives its attention mask), and the micro-batches of a step are the gradient-accumulation steps.

PanGu-Σ: a stage holds the experts of its sparse blocks whole (no expert parallelism, no ECSS), and the token
and domain ids its RRE layers route by travel with the hidden state from the first stage (they are integer
tensors: DeepSpeed sends them forward and no gradient back).

State dicts: a stage's parameters are named by DeepSpeed (`tied_modules.word_embedding.weight`,
`<layer index>.<name>`); `pangu_name` maps them to PanguModel's names, so a stage loads its part of the
dense model's initial weights (with tensor parallelism: its slices, as `PanguModel(tp=...)` names them) and
the export writes the file a single-stage run writes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PIPELINE_ROUTERS, PanguConfig
from .masks import AttentionLayout, attention_backend, attention_layout
from .model import Block, label_losses
from .tensor_parallel import (
    TensorParallel,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
)

TIED_EMBEDDING = "word_embedding"
# Layer specs before the first block: the tied word embedding, then the position embedding.
FIRST_BLOCK_SPEC = 2


# ---------------------------------------------------------------------------------------------
# The split: layers per stage, given by the caller (this library does not import deploy/)
# ---------------------------------------------------------------------------------------------
def spec_boundaries(stage_layer_counts: list[int]) -> list[int]:
    """DeepSpeed's `parts` for `pipeline_specs`: stage s builds specs [parts[s], parts[s + 1])."""
    parts, layers_before = [0], 0
    for count in stage_layer_counts[:-1]:
        layers_before += count
        parts.append(FIRST_BLOCK_SPEC + layers_before)
    parts.append(FIRST_BLOCK_SPEC + sum(stage_layer_counts) + 1)  # the query layer's spec is followed by the head's
    return parts


# ---------------------------------------------------------------------------------------------
# Stage layers: each takes and returns the tensors that travel between stages
# ---------------------------------------------------------------------------------------------
class StageLayouts:
    """The attention layout of the micro-batch a stage is computing, made once per stage forward (the SDPA
    path syncs with the host to make it; FlexAttention builds a block mask) and shared by its blocks. The
    position ids tensor is the key: it travels unchanged through a stage, and a new micro-batch brings a new
    one."""

    def __init__(self, config: PanguConfig) -> None:
        self.config = config
        self.requested = "auto"
        self._key: torch.Tensor | None = None
        self._layout: AttentionLayout | None = None

    def __call__(self, position_ids: torch.Tensor, training: bool) -> AttentionLayout:
        if self._key is not position_ids:
            backend = attention_backend(position_ids.device, training, self.config.dropout, requested=self.requested)
            self._layout = attention_layout(position_ids, position_ids.shape[1], backend)
            self._key = position_ids
        return self._layout


class StageTensorGroup:
    """The tensor-parallel context of a stage's layers (`tp`), given to their specs empty and filled in by
    `PanguPipeline` before DeepSpeed builds them: DeepSpeed makes its grid, and with it the group of the
    topology's `model` axis, inside `PipelineModule.__init__`, after the specs are handed over. The layers
    thus split over the grid's own group rather than a second group of the same ranks."""

    def __init__(self) -> None:
        self.tp: TensorParallel | None = None


def _tp(tensor: StageTensorGroup | None) -> TensorParallel | None:
    return None if tensor is None else tensor.tp


class _LookupWithPositions:
    """As the first spec the tied word table is called itself, (input ids, position ids) → (word vectors,
    position ids): DeepSpeed saves a tied module in the stage checkpoint only where it is called directly (the
    last stage calls it through `forward_fn` as the head and gets the first stage's weights after a load).
    PanGu-Σ's inputs hold the domain ids too: (input ids, position ids, domain ids) → (word vectors, position
    ids, input ids, domain ids), the routing ids that travel with the hidden state to every stage."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, *domain_ids = inputs
        words = super().forward(input_ids)  # type: ignore[misc]
        return (words, position_ids, input_ids, *domain_ids) if domain_ids else (words, position_ids)


class WordEmbedding(_LookupWithPositions, nn.Embedding):
    """The tied word table."""


class VocabParallelWordEmbedding(_LookupWithPositions, VocabParallelEmbedding):
    """The tied word table split over the vocabulary (tensor × pipeline parallelism)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tensor: StageTensorGroup) -> None:
        super().__init__(num_embeddings, embedding_dim, tensor.tp)


class PositionEmbedding(nn.Module):
    """(word vectors, position ids, routing ids...) → (dropout(word vectors + position vectors), position ids,
    routing ids...)."""

    def __init__(self, config: PanguConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        words, position_ids, *routing = inputs
        return self.embedding_dropout(words + self.position_embedding(position_ids)), position_ids, *routing


def _routing_ids(routing: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(token ids, domain ids) that travel between PanGu-Σ's stages; (None, None) for PanGu-α's."""
    return (routing[0], routing[1]) if routing else (None, None)


class PipelineBlock(Block):
    """A block taking and returning (hidden, position ids) and, for PanGu-Σ, the token and domain ids its
    experts route by."""

    def __init__(self, config: PanguConfig, layer_index: int, layouts: StageLayouts,
                 tensor: StageTensorGroup | None = None) -> None:
        super().__init__(config, layer_index, tp=_tp(tensor))
        self.layouts = [layouts]  # in a list: a plain attribute, not part of the module tree
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        hidden, position_ids, *routing = inputs
        token_ids, domain_ids = _routing_ids(routing)
        layout = self.layouts[0](position_ids, self.training)
        run = super().forward
        # The aux loss is zero for the routers a pipeline runs (dense, RRE).
        if self.gradient_checkpointing and self.training:
            hidden, _ = checkpoint(run, hidden, layout, token_ids, domain_ids, None, None, use_reentrant=False)
        else:
            hidden, _ = run(hidden, layout, token_ids, domain_ids)
        return hidden, position_ids, *routing


class QueryLayer(nn.Module):
    """Final LayerNorm, then the query layer (queries from the top query embedding): (hidden, position ids)
    → hidden. Attribute names are PanguModel's."""

    def __init__(self, config: PanguConfig, layouts: StageLayouts, tensor: StageTensorGroup | None = None) -> None:
        super().__init__()
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.top_query_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.query_layer = Block(config, config.num_layers - 1, tp=_tp(tensor))
        self.layouts = [layouts]
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, position_ids, *routing = inputs
        token_ids, domain_ids = _routing_ids(routing)
        layout = self.layouts[0](position_ids, self.training)
        hidden = self.final_norm(hidden)
        query = self.top_query_embedding(position_ids)
        if self.gradient_checkpointing and self.training:
            hidden, _ = checkpoint(self.query_layer, hidden, layout, token_ids, domain_ids, query, None,
                                   use_reentrant=False)
        else:
            hidden, _ = self.query_layer(hidden, layout, token_ids, domain_ids, query)
        return hidden


def tied_head(tokenizer_pieces: int | None, embedding: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """Last spec: logits from the word table (PanguModel's tied head), padded rows masked out. From a
    vocabulary-parallel table they are this rank's vocabulary columns, as PanguModel's with `tp`."""
    first = 0
    if isinstance(embedding, VocabParallelEmbedding):
        hidden = copy_to_tensor_parallel_region(hidden, embedding.tp)  # its gradient sums every rank's columns'
        first = embedding.vocab_start
    logits = F.linear(hidden, embedding.weight)
    if tokenizer_pieces is not None and tokenizer_pieces < first + logits.shape[-1]:
        padding = torch.arange(first, first + logits.shape[-1], device=logits.device) >= tokenizer_pieces
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


class _TiedHead:
    """`tied_head` with the model's piece count bound (a picklable callable for TiedLayerSpec's forward_fn)."""

    def __init__(self, tokenizer_pieces: int | None) -> None:
        self.tokenizer_pieces = tokenizer_pieces

    def __call__(self, embedding: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
        return tied_head(self.tokenizer_pieces, embedding, hidden)


# ---------------------------------------------------------------------------------------------
# The loss on the last stage, with the per-domain sums the trainer logs
# ---------------------------------------------------------------------------------------------
class PipelineLoss:
    """`loss_fn(logits, (labels, domain ids))`: PanguModel's cross-entropy (`<pad>` and -100 ignored), and
    on the side the summed token loss and token count per domain (`domain_loss_sums`) of every micro-batch
    since the last `drain()`: the last stage is the only one that sees the logits. With `tp` (set by
    `PanguPipeline` under tensor parallelism) the logits are this rank's vocabulary columns and both come from
    one `vocab_parallel_cross_entropy` (`model.label_losses`), a collective over the tensor group."""

    def __init__(self, num_domains: int, pad_token_id: int) -> None:
        self.num_domains = max(1, num_domains)
        self.pad_token_id = pad_token_id
        self.domain_sums: torch.Tensor | None = None
        self.tp: TensorParallel | None = None

    def __call__(self, logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from .metrics import domain_loss_sums

        labels, domain_ids = targets
        losses, counted = label_losses(logits, labels, self.pad_token_id, self.tp)
        sums = domain_loss_sums(losses.detach(), labels, domain_ids, self.num_domains, self.pad_token_id)
        self.domain_sums = sums if self.domain_sums is None else self.domain_sums + sums
        return losses.sum() / counted.sum()

    def drain(self, device: torch.device) -> torch.Tensor:
        """[domains, 2] sums since the last drain (zeros on a stage that computes no loss), then reset."""
        sums = self.domain_sums
        self.domain_sums = None
        return torch.zeros(self.num_domains, 2, dtype=torch.float64, device=device) if sums is None else sums


# ---------------------------------------------------------------------------------------------
# The pipeline module
# ---------------------------------------------------------------------------------------------
def pipeline_specs(config: PanguConfig, tensor: StageTensorGroup | None = None) -> tuple[list[Any], StageLayouts]:
    """PanguModel as a list of layer specs (built only on the stage that owns each), and the layout memo
    its attention layers share. With `tensor` the layers are tensor-parallel ones over its group (filled in
    before they are built)."""
    if config.router not in PIPELINE_ROUTERS:
        raise ValueError(f"pipeline parallelism is implemented for routers {', '.join(PIPELINE_ROUTERS)}, not "
                         f"{config.router}")
    layouts = StageLayouts(config)
    table = (WordEmbedding, config.vocab_size, config.d_model) if tensor is None else \
        (VocabParallelWordEmbedding, config.vocab_size, config.d_model, tensor)
    specs: list[Any] = [
        TiedLayerSpec(TIED_EMBEDDING, *table),
        LayerSpec(PositionEmbedding, config),
    ]
    specs += [LayerSpec(PipelineBlock, config, i, layouts, tensor) for i in range(config.num_layers - 1)]
    specs += [
        LayerSpec(QueryLayer, config, layouts, tensor),
        TiedLayerSpec(TIED_EMBEDDING, *table, forward_fn=_TiedHead(config.tokenizer_pieces)),
    ]
    return specs, layouts


class PanguPipeline(PipelineModule):
    """This rank's stage of PanGu-α or PanGu-Σ (`stage_layer_counts`: transformer layers per stage), on
    DeepSpeed's pipeline engine.

    `topology` is a DeepSpeed `ProcessTopology` with axes data, pipe, model (pangu_model/topology.py's
    `Layout.deepspeed_topology()`, so the data-parallel, pipeline and tensor groups are the topology's). A
    `model` axis of more than one rank makes the stage tensor-parallel over the grid's group of that axis:
    `tp` (also set on `loss_fn`), None without.

    Dropout: before each training micro-batch the stage seeds torch from `micro_batch_seed(micro)` (the
    trainer sets it per step with `start_step`), so a resumed run draws the masks of an uninterrupted one."""

    def __init__(self, config: PanguConfig, topology: Any, loss_fn: PipelineLoss, stage_layer_counts: list[int]) -> None:
        if len(stage_layer_counts) != topology.get_dim("pipe") or sum(stage_layer_counts) != config.num_layers:
            raise ValueError(f"layers per stage {stage_layer_counts} do not split {config.num_layers} layers over "
                             f"{topology.get_dim('pipe')} stages")
        self._tensor = StageTensorGroup() if topology.get_dim("model") > 1 else None
        specs, self._layouts = pipeline_specs(config, self._tensor)
        self._parts = spec_boundaries(stage_layer_counts)
        super().__init__(layers=specs, topology=topology, loss_fn=loss_fn, partition_method="pangu")
        self.tp = _tp(self._tensor)
        loss_fn.tp = self.tp
        self.config = config
        self.micro_batch_seed: Callable[[int], int] | None = None
        self._micro = 0

    def _partition_layers(self, method: str = "pangu") -> None:
        """DeepSpeed's hook for the split: the one given, not one of its balancing methods, so the
        planner and the run agree."""
        self.parts = list(self._parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _build(self) -> None:
        """DeepSpeed's hook that makes this stage's layers, called once its grid exists: their tensor group is
        the grid's slice group (the topology's `model` axis)."""
        if self._tensor is not None:
            self._tensor.tp = TensorParallel.of(self._grid.get_slice_parallel_group())
        super()._build()

    def start_step(self, micro_batch_seed: Callable[[int], int]) -> None:
        self.micro_batch_seed = micro_batch_seed
        self._micro = 0

    def forward(self, forward_input: Any) -> Any:
        if self.training and self.micro_batch_seed is not None:
            torch.manual_seed(self.micro_batch_seed(self._micro))
            self._micro += 1
        return super().forward(forward_input)

    def set_attention_backend(self, backend: str) -> "PanguPipeline":
        from .masks import ATTENTION_BACKENDS

        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")
        self._layouts.requested = backend
        return self

    @property
    def layers(self) -> list[nn.Module]:
        """This stage's transformer layers (for `speed.maybe_compile`)."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def load_pangu_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this stage's part of a PanguModel state dict (which may hold more; with `tp`, a PanguModel's
        of the same tensor rank: its slices)."""
        own = self.state_dict()
        self.load_state_dict({name: state[pangu_name(name, self.config.num_layers)] for name in own}, strict=True)


def pangu_name(pipeline_name: str, num_layers: int) -> str:
    """PanguModel's name of a `PanguPipeline` state-dict entry."""
    head, _, rest = pipeline_name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        if key != TIED_EMBEDDING:
            raise KeyError(pipeline_name)
        return f"word_embedding.{rest}"
    spec = int(head)
    if spec == 1 or spec == FIRST_BLOCK_SPEC + num_layers - 1:  # the position embedding; the query layer
        return rest
    if FIRST_BLOCK_SPEC <= spec < FIRST_BLOCK_SPEC + num_layers - 1:
        return f"blocks.{spec - FIRST_BLOCK_SPEC}.{rest}"
    raise KeyError(pipeline_name)


def stage_module_names(config: PanguConfig, stage: int, stage_layer_counts: list[int]) -> Callable[[str], bool]:
    """Whether a PanguModel module (qualified name) belongs to `stage`: what `build_model_on` keeps when it
    builds only a stage's part of the initial weights."""
    counts, stages = stage_layer_counts, len(stage_layer_counts)
    first = sum(counts[:stage])
    blocks = {f"blocks.{i}" for i in range(first, min(first + counts[stage], config.num_layers - 1))}
    own: set[str] = set()
    if stage == 0:
        own |= {"word_embedding", "position_embedding", "embedding_dropout"}
    if stage == stages - 1:
        own |= {"word_embedding", "final_norm", "top_query_embedding", "query_layer"}

    def keep(name: str) -> bool:
        top = name.split(".", 1)[0]
        return top in own or ".".join(name.split(".")[:2]) in blocks

    return keep


def micro_batches(batches: list[dict[str, torch.Tensor]], routing: bool = False
                  ) -> Iterator[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """The (inputs, targets) pairs `PipelineEngine.train_batch` / `eval_batch` read: the first stage takes
    the inputs, the last the targets. `routing` (PanGu-Σ): the inputs hold the per-token domain ids too, which
    the experts of every stage route by."""
    for batch in batches:
        inputs = (batch["input_ids"], batch["position_ids"])
        if routing:
            inputs += (batch["domain_ids"].expand_as(batch["input_ids"]),)
        yield inputs, (batch["labels"], batch["domain_ids"])


__all__ = [
    "PIPELINE_ROUTERS",
    "PanguPipeline",
    "PipelineLoss",
    "StageTensorGroup",
    "micro_batches",
    "pangu_name",
    "pipeline_specs",
    "spec_boundaries",
    "stage_module_names",
]
