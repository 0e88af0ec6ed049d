"""One typed configuration for every PanGu-family model, plus the named presets.

The same object is the Prefect flow parameter and the CLI argument (SPEC §2), so it is a pydantic
model: it validates, serialises to `config.json`, and renders as a form.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RouterName = Literal["dense", "rre", "moge", "topk"]
# Routers that pipeline parallelism runs: dense PanGu-α and PanGu-Σ's RRE, which have no auxiliary loss
# that would have to be carried from every stage to the last one's loss. Here, not in pipeline_parallel.py,
# so that validating a config or planning a layout does not import DeepSpeed.
PIPELINE_ROUTERS: tuple[RouterName, ...] = ("dense", "rre")

# The fields that fix a model's dense weight shapes: two configs equal in these hold tensors of one shape
# (a dense export can seed a PanGu-Σ run; a sparse preset has a dense counterpart of the same shape).
SHAPE_FIELDS = ("vocab_size", "max_seq_len", "d_model", "num_layers", "num_heads", "d_ff")

# The fields only some routers read. config.json leaves out those of the routers a model does not use:
# an RRE model's file said `num_experts: 8` beside its 40 × 16 experts, which a reader (or a tool that sizes
# a mixture of experts from `num_experts`) takes for the model's count. Loading fills them with defaults.
_ROUTER_FIELDS: dict[str, tuple[str, ...]] = {
    "rre": ("num_domains", "experts_per_domain", "routing_seed", "expert_layout", "routing_table",
            "routing_counts", "domain_id_offset"),
    "moge": ("num_experts", "moge_groups", "moge_top_k_per_group", "moge_shared_experts", "aux_loss_coef"),
    "topk": ("num_experts", "topk_k", "capacity_factor", "min_capacity", "aux_loss_coef"),
}
_SPARSE_FIELDS = ("moe_layers", "expert_d_ff")

# Token conventions of the released PanGu-α tokenizer (SPEC §4).
EOT_TOKEN_ID = 9
PAD_TOKEN_ID = 6


class PanguConfig(BaseModel):
    """Shape and behaviour of a PanGu-α (dense) or PanGu-Σ / MoE (sparse) decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    vocab_size: int = Field(40000, gt=0, description="Embedding rows (the tokenizer's pieces, maybe padded).")
    tokenizer_pieces: int | None = Field(
        None, gt=0, description="Pieces of the tokenizer the model was trained with; ids from here to vocab_size "
        "are padding and get no probability (never generated, never scored). None: every id is a piece.",
    )
    max_seq_len: int = Field(1024, gt=0, description="Rows and the position / query tables.")
    d_model: int = Field(1024, gt=0)
    num_layers: int = Field(24, ge=1, description="Including the query layer on top.")
    num_heads: int = Field(16, gt=0)
    d_ff: int = Field(4096, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    eot_token_id: int = EOT_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID
    gradient_checkpointing: bool = False

    # --- sparse layers -------------------------------------------------------------------
    router: RouterName = "dense"
    moe_layers: int = Field(0, ge=0, description="The top N layers whose FFN becomes sparse.")
    expert_d_ff: int | None = Field(None, description="Expert FFN width; defaults to d_ff.")
    aux_loss_coef: float = Field(0.01, ge=0.0, description="α of the load-balancing loss.")

    # Random Routed Experts (PanGu-Σ): experts = num_domains × experts_per_domain.
    num_domains: int = Field(40, gt=0)
    experts_per_domain: int = Field(16, gt=0)
    routing_seed: int = 1234
    expert_layout: Literal["contiguous", "interleaved"] = Field(
        "contiguous", description="Where a domain's experts sit among a layer's expert ids: 'contiguous' "
        "(domain d's k-th expert is d·K + k: an expert-parallel shard, a contiguous id range, holds whole "
        "domains) or 'interleaved' (k·D + d: every shard holds K/ep experts of every domain, so a step of "
        "one domain loads every rank of the expert-parallel group alike; moe.rre_expert_ids).",
    )
    routing_table: Literal["random", "balanced"] = Field(
        "random", description="Token id → expert table of every RRE layer: 'random' (a seeded permutation dealt "
        "round-robin: equal vocabulary per expert) or 'balanced' (Hash-Layers' balanced assignment: ids by "
        "descending corpus frequency to the least loaded expert, from routing_counts). Either way the table is "
        "a buffer saved with the weights: a loaded checkpoint keeps the table it was trained with.",
    )
    routing_counts: str | None = Field(
        None, description="Balanced table: the token counts it is built from — a packed token directory "
        "(tokenizer.pack output; counts over all its shards) or a .npy of counts per token id.",
    )
    domain_id_offset: int = Field(
        0, ge=0, description="Domain ids seen by forward() are shifted by this (extracted models)."
    )

    # MoGE and learned top-k: a flat pool of experts.
    num_experts: int = Field(8, gt=0)
    moge_groups: int = Field(4, gt=0)
    moge_top_k_per_group: int = Field(1, gt=0)
    moge_shared_experts: int = Field(0, ge=0)
    topk_k: int = Field(1, gt=0)
    capacity_factor: float = Field(1.25, gt=0.0)
    min_capacity: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> "PanguConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.tokenizer_pieces is not None and self.tokenizer_pieces > self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {self.tokenizer_pieces} "
                             "pieces: its ids would have no embedding")
        if self.moe_layers > self.num_layers:
            raise ValueError(f"moe_layers {self.moe_layers} > num_layers {self.num_layers}")
        if self.router == "dense" and self.moe_layers:
            raise ValueError("router 'dense' with moe_layers > 0: pick a sparse router")
        if self.router == "moge":
            if self.num_experts % self.moge_groups:
                raise ValueError("MoGE needs num_experts divisible by moge_groups")
            if self.moge_top_k_per_group > self.num_experts // self.moge_groups:
                raise ValueError("moge_top_k_per_group exceeds the experts in a group")
        if self.router == "rre" and self.routing_table == "balanced" and not self.routing_counts:
            raise ValueError("routing_table 'balanced' needs routing_counts: a packed token directory or a .npy "
                             "of token counts")
        if self.router == "topk" and self.topk_k > self.num_experts:
            raise ValueError("topk_k exceeds num_experts")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def expert_width(self) -> int:
        return self.expert_d_ff or self.d_ff

    @property
    def total_experts(self) -> int:
        """Experts in one sparse layer."""
        if self.router == "dense":
            return 0
        if self.router == "rre":
            return self.num_domains * self.experts_per_domain
        return self.num_experts

    @property
    def experts_active_per_token(self) -> int:
        """Routed experts one token runs through in a sparse layer (shared experts excluded)."""
        return {"dense": 0, "rre": 1, "topk": self.topk_k}.get(
            self.router, self.moge_groups * self.moge_top_k_per_group
        )

    def is_sparse_layer(self, layer_index: int) -> bool:
        return self.router != "dense" and layer_index >= self.num_layers - self.moe_layers

    def saved_fields(self) -> dict[str, object]:
        """The fields as config.json holds them: all but those only the other routers read (their defaults
        come back on loading, and this model does not read them)."""
        used = set(_ROUTER_FIELDS.get(self.router, ())) | (set(_SPARSE_FIELDS) if self.router != "dense" else set())
        unused = {name for names in _ROUTER_FIELDS.values() for name in names} | set(_SPARSE_FIELDS)
        return self.model_dump(exclude=unused - used)

    def replace(self, **changes: object) -> "PanguConfig":
        """A validated copy with some fields changed."""
        return PanguConfig.model_validate({**self.model_dump(), **changes})


_ALPHA_SHAPES: dict[str, dict[str, int]] = {
    # SPEC §5.1 table: layers include the query layer ...
    "350m": dict(num_layers=24, d_model=1024, d_ff=4096, num_heads=16),
    "2.6b": dict(num_layers=32, d_model=2560, d_ff=10240, num_heads=32),
    # 13B as released: 39 transformer layers plus the query layer, 40 blocks, 12.80B (the paper rounds it
    # to 13.1B; 41 blocks would give 13.11B but hold no released checkpoint). PanGu-Σ on this shape:
    # 1.0850T and a domain's sub-model 38.0B (SPEC §5.2).
    "13b": dict(num_layers=40, d_model=5120, d_ff=20480, num_heads=40),
    "200b": dict(num_layers=64, d_model=16384, d_ff=65536, num_heads=128),
}

_TINY_SHAPE = dict(num_layers=4, d_model=64, d_ff=256, num_heads=4, max_seq_len=128)

PRESETS: dict[str, PanguConfig] = {
    "tiny": PanguConfig(name="tiny", **_TINY_SHAPE),
    **{name: PanguConfig(name=name, **shape) for name, shape in _ALPHA_SHAPES.items()},
    "sigma-tiny": PanguConfig(
        name="sigma-tiny", router="rre", moe_layers=2, num_domains=4, experts_per_domain=2, **_TINY_SHAPE
    ),
    # SPEC §5.2, our reading: the 13B shape (40 blocks, above) with RRE in the top 8 layers, 40 domains × 16
    # experts; inheriting from a 13b checkpoint needs the same shape. Interleaved expert ids: with ep 8 each
    # rank holds 2 experts of every domain, so a domain-affine step loads the 8 ranks of a node alike.
    "sigma-1t": PanguConfig(
        name="sigma-1t", router="rre", moe_layers=8, num_domains=40, experts_per_domain=16,
        expert_layout="interleaved",
        **_ALPHA_SHAPES["13b"],
    ),
}


def get_config(preset: str | PanguConfig, **overrides: object) -> PanguConfig:
    """A preset by name (or a config passed through), with optional field overrides."""
    if isinstance(preset, PanguConfig):
        config = preset
    else:
        key = preset.lower()
        if key not in PRESETS:
            raise KeyError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
        config = PRESETS[key]
    return config.replace(**overrides) if overrides else config
