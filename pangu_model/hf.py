"""PanGu models in the Hugging Face `transformers` ecosystem (Auto classes, `generate`, lm-eval's `--model hf`).

    import pangu_model.hf                                   # registers model_type "pangu" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(DIR)       # DIR written by `pangu model export-hf EXPORT --output DIR`
    tok = AutoTokenizer.from_pretrained(DIR)                # tokenizer.hf.PanguHFTokenizer

One model implementation: `PanguForCausalLM` holds our `PanguModel` as `.model` (weights in safetensors
named `model.<our name>`), so its logits are ours. `PanguHFConfig` carries every `PanguConfig` field
(plus `default_domain_id`, below); `to_pangu_config()` gives the PanguConfig back.

- Labels follow the transformers convention (unshifted; the model shifts them); the loss is the LM loss
  plus the sparse layers' auxiliary loss, as our training sees it.
- KV cache: `PanguCache`, our `KVCache` with the few methods `generate` asks of a cache. The model asks
  `generate` for no `DynamicCache`; it makes its own on the first forward and hands it back in
  `past_key_values`. Greedy `generate` equals `pangu_model.generate`.
- `attention_mask` (2-D, 1 = token, 0 = padding) is turned into position ids: a padding run is a document
  of its own, so real tokens never attend to padding and their positions start at 0 after left padding.
  Left-padded batches (`generate`) and right-padded ones (lm-eval's log-likelihoods) give every real
  token the logits it gets unpadded. Positions also restart after `<eot>`, as in our model.
- PanGu-Σ with several domains: `domain_ids` (an int or one per row) picks the expert group; without it
  the config's `default_domain_id` is used, which `export_hf` sets to `evaluation.model_io.choose_domain`'s
  answer (the domain with the most training tokens, or the one asked for).

`export_hf` writes config.json (`model_type: pangu`, `architectures`), generation_config.json,
model.safetensors, the tokenizer (`PanguHFTokenizer.save_pretrained`) and domains.json if the export has one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .ops import deepspeed_accelerator_follows_torch

# transformers imports DeepSpeed where it is installed, whose accelerator probe would warn on a CPU machine
# ("unable to detect it") in every export and load: the training program's choice is made first.
deepspeed_accelerator_follows_torch()

from transformers import (  # noqa: E402 - after the accelerator is chosen
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import PanguConfig
from .model import IGNORE_INDEX, KVCache, PanguModel

MODEL_TYPE = "pangu"
_PANGU_FIELDS = tuple(PanguConfig.model_fields)


class PanguHFConfig(PretrainedConfig):
    """A `PanguConfig` as a transformers config: the same field names, plus the usual aliases."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "max_position_embeddings": "max_seq_len",
        "intermediate_size": "d_ff",
        "layer_norm_epsilon": "layer_norm_eps",
    }

    def __init__(self, default_domain_id: int | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        fields = {name: kwargs.pop(name) for name in list(kwargs) if name in _PANGU_FIELDS}
        pangu = PanguConfig.model_validate(fields)  # validates, and fills the defaults
        for name, value in pangu.saved_fields().items():  # not the fields only other routers read
            if name != "pad_token_id":
                setattr(self, name, value)
        self.default_domain_id = default_domain_id
        self.use_cache = use_cache
        kwargs.setdefault("eos_token_id", pangu.eot_token_id)
        kwargs.setdefault("bos_token_id", None)
        # The head multiplies by the word table itself (no separate lm_head): nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(pad_token_id=pangu.pad_token_id, **kwargs)

    @classmethod
    def from_pangu(cls, config: PanguConfig, **kwargs: Any) -> "PanguHFConfig":
        return cls(**config.model_dump(), **kwargs)

    def to_pangu_config(self) -> PanguConfig:
        return PanguConfig.model_validate({name: getattr(self, name) for name in _PANGU_FIELDS if hasattr(self, name)})


class PanguCache(KVCache):
    """Our KV cache with what `generate` asks of a cache object (it is not a `transformers.Cache`)."""

    is_compileable = False

    @classmethod
    def for_model(cls, config: PanguConfig) -> "PanguCache":
        return cls(keys=[None] * config.num_layers, values=[None] * config.num_layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, *args: Any, **kwargs: Any):  # pragma: no cover - only asked of compileable caches
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` picks."""
        for store in (self.keys, self.values):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = tensor.index_select(0, beam_idx.to(tensor.device))
        if self.position_ids is not None:
            self.position_ids = self.position_ids.index_select(0, beam_idx.to(self.position_ids.device))
            self.next_position = self.next_position.index_select(0, beam_idx.to(self.next_position.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.keys[0].shape[0] if self.keys[0] is not None else 0).repeat_interleave(repeats)
        self.reorder_cache(index)


def positions_with_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Position ids [B, T]: restart at every `<eot>` (our model's rule) and wherever the mask switches between
    padding and tokens, so that a padding run is a document of its own (the mask is derived from positions)."""
    batch, length = input_ids.shape
    mask = attention_mask.to(torch.bool)
    index = torch.arange(length, device=input_ids.device).expand(batch, length)
    starts = torch.zeros_like(mask)
    starts[:, 0] = True
    starts[:, 1:] = (input_ids[:, :-1] == eot_token_id) | (mask[:, 1:] != mask[:, :-1])
    document_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - document_start


class PanguPreTrainedModel(PreTrainedModel):
    config_class = PanguHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # PanguModel initialises itself (SPEC §5.1) when it is built; loading replaces every tensor.
        pass


class PanguForCausalLM(PanguPreTrainedModel, GenerationMixin):
    """Causal LM around `PanguModel` (`self.model`): same weights, same logits."""

    def __init__(self, config: PanguHFConfig, model: PanguModel | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else PanguModel(config.to_pangu_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own cache (PanguCache), made by the first forward

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.word_embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.word_embedding = value

    def get_output_embeddings(self) -> None:
        return None  # the head is the word table itself (F.linear in PanguModel.forward)

    def _domains(self, domain_ids: Any) -> Any:
        if domain_ids is not None:
            return domain_ids
        pangu = self.model.config
        if pangu.router == "rre" and pangu.num_domains > 1:
            if self.config.default_domain_id is None:
                raise ValueError("this PanGu-Σ model has several domains and no default_domain_id: pass domain_ids")
            return int(self.config.default_domain_id)
        return None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: PanguCache | Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        domain_ids: torch.Tensor | int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("PanguForCausalLM takes input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PanguForCausalLM takes a 2-D attention_mask (1 = token, 0 = padding)")
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        cache = past_key_values
        if cache is not None and not isinstance(cache, PanguCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # an empty transformers cache: ours replaces it
            else:
                raise ValueError("PanguForCausalLM keeps its keys and values in a PanguCache, not "
                                 f"{type(cache).__name__}")
        if cache is None and use_cache:
            cache = PanguCache.for_model(self.model.config)
        past = cache.length if cache is not None else 0

        if position_ids is None and attention_mask is not None:
            mask = attention_mask[:, -input_ids.shape[1]:]
            if past == 0 and not bool(mask.all()):
                position_ids = positions_with_padding(input_ids, mask, self.model.config.eot_token_id)
            elif past > 0 and not bool(mask.all()):
                raise ValueError("padding after the cached tokens is not supported: pad on the left")
            # past > 0 with new tokens unpadded: the cache continues each row's positions.

        out = self.model(input_ids, position_ids=position_ids, domain_ids=self._domains(domain_ids), cache=cache)
        loss = None
        if labels is not None:
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            if attention_mask is not None:
                valid = attention_mask[:, -labels.shape[1]:].to(torch.bool)
                shifted[:, :-1] = shifted[:, :-1].masked_fill(~valid[:, 1:], IGNORE_INDEX)
            shifted = shifted.masked_fill(shifted == self.model.config.pad_token_id, IGNORE_INDEX)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
            ) + out.aux_loss
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: PanguCache | None = None,
        attention_mask: torch.Tensor | None = None,
        domain_ids: torch.Tensor | int | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        return {
            "input_ids": input_ids[:, past:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "domain_ids": domain_ids,
            "use_cache": True if use_cache is None else use_cache,
        }

    def _reorder_cache(self, past_key_values: PanguCache, beam_idx: torch.LongTensor) -> PanguCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


def register() -> None:
    """Register `pangu` with AutoConfig, AutoModelForCausalLM and AutoTokenizer (idempotent)."""
    from tokenizer.hf import PanguHFTokenizer

    AutoConfig.register(MODEL_TYPE, PanguHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(PanguHFConfig, PanguForCausalLM, exist_ok=True)
    AutoTokenizer.register(PanguHFConfig, tokenizer_class=PanguHFTokenizer, exist_ok=True)


register()


def _is_transformers_directory(directory: Path) -> bool:
    """What `export_hf` writes: a transformers config.json of model_type "pangu" (it names `architectures` and
    `transformers_version`; an export's config.json names its `format_version` instead)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("model_type") == MODEL_TYPE and "transformers_version" in config
            and "format_version" not in config)


def export_hf(
    export: str | os.PathLike[str],
    output: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    domain: int | str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `export` (model.safetensors + config.json + tokenizer, our format) as a transformers directory.
    A bad export, output, domain or tokenizer is refused before the weights are read or anything is written."""
    from cleaning.outputs import check_replaceable
    from evaluation.model_io import choose_domain, find_tokenizer, load_model, load_tokenizer, model_config
    from evaluation.report import require_output_dir
    from tokenizer.hf import load_hf
    from tokenizer.pack import DOMAINS_FILE

    export, output = Path(export), Path(output)
    pangu_config = model_config(export)  # one clear error for a directory that is not an export
    if output.resolve() == export.resolve():
        raise ValueError(f"--output {output} is the export itself: pick another directory")
    require_output_dir(output)
    check_replaceable(output, "a transformers directory", _is_transformers_directory)
    chosen = choose_domain(export, pangu_config, domain)
    # As evaluation loads it: pieces the model has embeddings for, and the tokenizer the export was trained with
    load_tokenizer(export, pangu_config, tokenizer).close()
    hf_tokenizer = load_hf(find_tokenizer(export, tokenizer))
    model = load_model(export, dtype=dtype)

    hf_tokenizer.model_max_length = model.config.max_seq_len
    config = PanguHFConfig.from_pangu(model.config, default_domain_id=None if chosen is None else chosen["id"])
    config.architectures = [PanguForCausalLM.__name__]
    if dtype is not None:
        config.dtype = dtype
    hf_model = PanguForCausalLM(config, model=model)  # the loaded weights: no second, random copy
    hf_model.generation_config = GenerationConfig(
        eos_token_id=model.config.eot_token_id, pad_token_id=model.config.pad_token_id, do_sample=False)
    output.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(output))
    hf_tokenizer.save_pretrained(str(output))
    # transformers writes the weights through a temporary file, mode 0600: give them config.json's mode (the
    # umask's), so that whoever may read the directory may read them
    mode = (output / "config.json").stat().st_mode & 0o777
    for weights in output.glob("*.safetensors"):
        weights.chmod(mode)
    if (export / DOMAINS_FILE).is_file():
        shutil.copyfile(export / DOMAINS_FILE, output / DOMAINS_FILE)
    return output


__all__ = ["PanguCache", "PanguForCausalLM", "PanguHFConfig", "export_hf", "positions_with_padding", "register"]
