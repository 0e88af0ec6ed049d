"""Load what the evaluation needs from a checkpoint directory: the model and its tokenizer.

A checkpoint is `model.safetensors` + `config.json` (pangu_model.checkpoint). The tokenizer is taken
from, in order: the path given explicitly; `CHECKPOINT/tokenizer/`; the checkpoint directory itself
(a `tokenizer.json` or a single `*.model` in it); `CHECKPOINT/../tokenizer/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pangu_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, load_config
from pangu_model.config import PanguConfig
from pangu_model.model import PanguModel
from tokenizer.artifacts import META_FILE
from tokenizer.pack import DOMAINS_FILE
from tokenizer.pangu import PanguTokenizer, TokenizerLoadError


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


def imported_from(checkpoint: str | os.PathLike[str]) -> dict | None:
    """What `pangu model import` recorded of a released checkpoint the export was made from, if it was."""
    from pangu_model.released import PROVENANCE_FILE

    return _json_beside(checkpoint, PROVENANCE_FILE)


def _json_beside(checkpoint: str | os.PathLike[str], name: str) -> dict | None:
    """The JSON file `name` of an export, None when it has none; a damaged one is one clear error."""
    path = Path(checkpoint) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from None


def model_config(checkpoint: str | os.PathLike[str]) -> PanguConfig:
    """The checkpoint's config.json, once the directory is known to be a checkpoint."""
    checkpoint = Path(checkpoint)
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint} is not a checkpoint: {', '.join(missing)} missing")
    return load_config(checkpoint)


def check_device(device: str) -> str:
    """`device` when the model can be loaded on it here: cpu, cuda or cuda:N of a GPU PyTorch sees.
    Anything else is refused in one line before any weights are read (safetensors and the pinned-memory
    copy would fail later, with a traceback or a message that blames the export)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise ValueError(f"--device {device!r}: the model runs on cpu, cuda or cuda:N, not {parsed.type}")
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "PyTorch sees no GPU here"
        raise ValueError(f"--device {device!r}: CUDA is not available ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        seen = "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        raise ValueError(f"--device {device!r}: this machine has {seen}")
    return device


def load_model(checkpoint: str | os.PathLike[str], device: str = "cpu", dtype: torch.dtype | None = None) -> PanguModel:
    model_config(checkpoint)
    return load_checkpoint(checkpoint, device=check_device(device), dtype=dtype).eval()


def read_domains(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The export's `domains.json` (domain names ↔ ids and training tokens per domain, the tokenizer's
    fingerprint), if it has one."""
    return _json_beside(checkpoint, DOMAINS_FILE)


def trained_tokenizer_sha256(checkpoint: str | os.PathLike[str]) -> str | None:
    """The fingerprint (`PanguTokenizer.fingerprint`) of the tokenizer that packed the export's training data,
    as its `domains.json` records it (the data contract, `tokenizer.pack`); None when it records none (an
    imported release, an older export)."""
    from tokenizer.pack import packed_with

    return packed_with(read_domains(checkpoint) or {})


def choose_domain(checkpoint: str | os.PathLike[str], config: PanguConfig,
                  domain: int | str | None = None) -> dict[str, Any] | None:
    """Which domain's sub-model of a PanGu-Σ export to evaluate: {"id", "name", "chosen_by"}; None for a
    model that needs no domain (one domain).

    `domain` is an id or a name of the export's `domains.json`; without one, the domain with the most
    training tokens (the sub-model that saw the most data). A domain given for a model without domain
    experts (dense PanGu-α, or experts routed by token) is refused: it would otherwise be ignored."""
    if config.router != "rre":
        if domain is not None:
            kind = ("a dense PanGu-α model (no experts)" if config.router == "dense" else
                    f"a {config.router} mixture of experts, routed by token, not by domain")
            raise ValueError(f"--domain {str(domain)!r}: {checkpoint} is {kind}; --domain chooses the experts of a "
                             f"PanGu-Σ domain: leave it out")
        return None
    if config.num_domains <= 1 and domain is None:
        return None
    first, last = config.domain_id_offset, config.domain_id_offset + config.num_domains - 1
    contract = read_domains(checkpoint) or {}
    names = {int(i): name for i, name in contract.get("id_to_name", {}).items()}
    known = ", ".join(f"{i} {n}" for i, n in sorted(names.items()) if first <= i <= last) or f"ids {first}–{last}"
    if domain is None:
        tokens = {stats["id"]: stats.get("tokens", 0) for stats in contract.get("domains", {}).values()
                  if first <= stats["id"] <= last}
        if not tokens:
            raise CheckpointError(f"{checkpoint} is a PanGu-Σ model with {config.num_domains} domains and no "
                                  f"{DOMAINS_FILE} to choose one from: give the domain to evaluate ({known})")
        chosen = max(sorted(tokens), key=lambda i: tokens[i])
        return {"id": chosen, "name": names.get(chosen), "chosen_by": "most training tokens"}
    text = str(domain).strip()
    if text.removeprefix("-").isdigit():
        chosen = int(text)
    else:
        by_name = {n: i for i, n in names.items()}
        if text not in by_name:
            raise CheckpointError(f"--domain {text!r} is not one of this model's domains ({known})")
        chosen = by_name[text]
    if not first <= chosen <= last:
        raise CheckpointError(f"--domain {chosen} is outside this model's domains ({known})")
    if config.num_domains <= 1:
        return None  # its only domain: the whole model is that domain's sub-model
    return {"id": chosen, "name": names.get(chosen), "chosen_by": "given"}


def load_tokenizer(checkpoint: str | os.PathLike[str], config: PanguConfig,
                   tokenizer: str | os.PathLike[str] | None = None) -> PanguTokenizer:
    """The tokenizer of `checkpoint` (`find_tokenizer`), refused unless the model (`config`) has an embedding
    for each of its pieces and, when the export records which tokenizer its data was packed with, unless it
    is that one: another tokenizer of the same size gives the model other ids for the same text, and the
    scores and text were garbage without a word. (Training checks the packed data the same way:
    `pangu_model.train.data_tokenizer`.)"""
    path = find_tokenizer(checkpoint, tokenizer)
    try:
        tok = PanguTokenizer.load(path)
    except TokenizerLoadError as exc:
        raise CheckpointError(str(exc)) from exc
    usable = config.tokenizer_pieces or config.vocab_size
    if tok.vocab_size > usable:
        raise CheckpointError(
            f"tokenizer has {tok.vocab_size} pieces but the model only {usable} token embeddings"
        )
    trained = trained_tokenizer_sha256(checkpoint)
    if trained and tok.fingerprint != trained:  # any tokenizer, given or bundled: a bundled one can be replaced too
        advice = ("leave --tokenizer out to use the export's own" if tokenizer is not None else
                  "the export's own tokenizer was replaced: give the one it was trained with (--tokenizer)")
        raise CheckpointError(f"tokenizer {path} (sha256 {tok.fingerprint[:12]}…) is not the one {checkpoint} was "
                              f"trained with (sha256 {trained[:12]}…, in its {DOMAINS_FILE}): {advice}")
    return tok


def check_model_options(checkpoint: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None,
                        device: str = "cpu", domain: int | str | None = None) -> None:
    """Refuses what `load_for_eval` would, without reading the weights: a directory that is not a checkpoint,
    a device this machine cannot load on, a domain the model does not have (or any domain for a model
    without domains), a tokenizer that is missing or does not fit. An evaluation checks this before it
    hashes the checkpoint, fetches data or writes anything."""
    config = model_config(checkpoint)
    check_device(device)
    choose_domain(checkpoint, config, domain)
    load_tokenizer(checkpoint, config, tokenizer)


def load_for_eval(
    checkpoint: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    domain: int | str | None = None,
) -> tuple[PanguModel, PanguTokenizer]:
    """(model in eval mode, tokenizer); checks that the tokenizer fits the model.

    A PanGu-Σ model with several domains is evaluated as one domain's sub-model (`extract_domain`:
    the same outputs on that domain's inputs), since its routing needs a domain for every token; which
    one is `choose_domain`'s answer. Every refusal comes before the weights are read.
    """
    config = model_config(checkpoint)
    check_device(device)
    chosen = choose_domain(checkpoint, config, domain)
    tok = load_tokenizer(checkpoint, config, tokenizer)
    model = load_model(checkpoint, device, dtype)
    if chosen is not None:
        from pangu_model.inherit import extract_domain

        model = extract_domain(model, chosen["id"]).eval()
    return model, tok


__all__ = ["CheckpointError", "check_device", "check_model_options", "choose_domain", "find_tokenizer", "load_for_eval",
           "load_model", "load_tokenizer", "model_config", "read_domains", "trained_tokenizer_sha256"]
