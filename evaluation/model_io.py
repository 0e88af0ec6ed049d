"""Load what the evaluation needs from a checkpoint directory: the model and its tokenizer.

A checkpoint is `model.safetensors` + `config.json` (pangu_model.checkpoint). The tokenizer is taken
from, in order: the path given explicitly; `CHECKPOINT/tokenizer/`; the checkpoint directory itself
(a `tokenizer.json` or a single `*.model` in it); `CHECKPOINT/../tokenizer/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pangu_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from pangu_model.model import PanguModel
from tokenizer.artifacts import META_FILE
from tokenizer.pangu import PanguTokenizer


class CheckpointError(FileNotFoundError):
    pass


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and ((path / META_FILE).is_file() or len(list(path.glob("*.model"))) == 1)


def find_tokenizer(checkpoint: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> Path:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise CheckpointError(f"tokenizer {path} does not exist")
        return path
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / "tokenizer", checkpoint, checkpoint.parent / "tokenizer"):
        if _is_tokenizer_dir(candidate):
            return candidate
    raise CheckpointError(
        f"no tokenizer found for {checkpoint} (looked in {checkpoint / 'tokenizer'}, {checkpoint}, "
        f"{checkpoint.parent / 'tokenizer'}); pass the tokenizer directory explicitly"
    )


def load_model(checkpoint: str | os.PathLike[str], device: str = "cpu", dtype: torch.dtype | None = None) -> PanguModel:
    checkpoint = Path(checkpoint)
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint} is not a checkpoint: {', '.join(missing)} missing")
    return load_checkpoint(checkpoint, device=device, dtype=dtype).eval()


def load_for_eval(
    checkpoint: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    domain: int | None = None,
) -> tuple[PanguModel, PanguTokenizer]:
    """(model in eval mode, tokenizer); checks that the tokenizer fits the model's vocabulary.

    A PanGu-Σ model with several domains is evaluated as one domain's sub-model (`extract_domain`:
    the same outputs on that domain's inputs), since its routing needs a domain for every token.
    """
    model = load_model(checkpoint, device, dtype)
    if model.config.router == "rre" and model.config.num_domains > 1:
        if domain is None:
            raise CheckpointError(f"{checkpoint} is a PanGu-Σ model with {model.config.num_domains} domains "
                                  f"(ids from {model.config.domain_id_offset}): give the domain to evaluate")
        from pangu_model.inherit import extract_domain

        model = extract_domain(model, domain).eval()
    tok = PanguTokenizer.load(find_tokenizer(checkpoint, tokenizer))
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tok.vocab_size} pieces but the model only {model.config.vocab_size} embeddings"
        )
    return model, tok


__all__ = ["CheckpointError", "find_tokenizer", "load_for_eval", "load_model"]
