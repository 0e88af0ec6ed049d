"""A Hugging Face `transformers` tokenizer around `PanguTokenizer` (same ids, same text).

`save_pretrained` writes the sentencepiece model (`spm.model`) and our metadata
(`pangu_tokenizer.json`; HF reserves `tokenizer.json` for fast tokenizers) beside HF's own config,
so `PanguHFTokenizer.from_pretrained(dir)` and `PanguTokenizer.load(dir)` both read the directory.
Text is never split on special-token strings (`split_special_tokens=True`): a literal "<eot>" in text
is text, exactly as in `PanguTokenizer.encode`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from cleaning.writers import write_bytes_atomic, write_json_atomic
from tokenizer.artifacts import MODEL_FILE, base_meta
from tokenizer.pangu import PanguTokenizer
from tokenizer.specials import SPECIAL_PIECES, BOS, EOT, MASK, PAD, SEP, UNK

HF_META_FILE = "pangu_tokenizer.json"


class PanguHFTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.pangu = PanguTokenizer.load(vocab_file)
        kwargs.setdefault("unk_token", SPECIAL_PIECES[UNK])
        kwargs.setdefault("bos_token", SPECIAL_PIECES[BOS])
        # PanGu-α ends every training document with <eot>; generation stops there.
        kwargs.setdefault("eos_token", SPECIAL_PIECES[EOT])
        kwargs.setdefault("pad_token", SPECIAL_PIECES[PAD])
        kwargs.setdefault("sep_token", SPECIAL_PIECES[SEP])
        kwargs.setdefault("mask_token", SPECIAL_PIECES[MASK])
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("special_tokens_pattern", "none")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.pangu.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.pangu.id_to_piece(i): i for i in range(self.pangu.vocab_size)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.pangu.sp.encode(self.pangu.segment(text), out_type=str)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # The base class would split on special-token strings first; PanGu never does.
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        return self._tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        # sentencepiece maps a piece outside the vocabulary (an unknown character) to <unk>.
        return self.pangu.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.pangu.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.pangu.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        directory = Path(save_directory)
        if not directory.is_dir():
            raise NotADirectoryError(f"{save_directory} is not a directory")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        model_path = directory / f"{prefix}{MODEL_FILE}"
        write_bytes_atomic(model_path, self.pangu.model_proto)
        meta_path = directory / f"{prefix}{HF_META_FILE}"
        meta = {k: v for k, v in self.pangu.meta.items() if k not in ("model_file", "vocab_file")}
        write_json_atomic(meta_path, {**meta, **base_meta(self.pangu.sp, self.pangu.model_proto), "model_file": model_path.name})
        return (str(model_path), str(meta_path))


def load_hf(path: str | os.PathLike[str]) -> PanguHFTokenizer:
    """`from_pretrained` on a saved HF directory, or a wrapper around one of our tokenizer directories."""
    path = Path(path)
    if (path / "tokenizer_config.json").is_file():
        return PanguHFTokenizer.from_pretrained(str(path))
    model_file = path / MODEL_FILE if path.is_dir() else path
    if path.is_dir() and (path / "tokenizer.json").is_file():
        model_file = path / json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("model_file", MODEL_FILE)
    return PanguHFTokenizer(vocab_file=str(model_file))
