"""`PanguTokenizer`: the jieba + sentencepiece tokenizer of PanGu-α (SPEC §4).

Encoding: jieba (accurate mode) → " " to "▂" and "\\n" to "▃" inside each segment → segments joined
by single spaces → sentencepiece. Decoding: sentencepiece → ASCII spaces deleted → "▂" to " ",
"▃" to "\\n". `reference_encode` is that definition written literally; the tokenizer returns the same
ids for every input, faster (`tokenizer.segment.FastSegmenter`, batched sentencepiece calls, and
worker processes in `encode_batch`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from tokenizer.artifacts import META_FILE, MODEL_FILE, write_tokenizer_dir
from tokenizer.parallel import ChunkEncoder, EncoderPool, chunk_texts
from tokenizer.segment import FastSegmenter, reference_segment
from tokenizer.specials import EOT, NEWLINE, NEWLINE_PIECE, PAD, SPACE, SPACE_PIECE, SPECIAL_NAMES, SPECIAL_PIECES, UNK


_DECODE = str.maketrans({" ": None, SPACE_PIECE: " ", NEWLINE_PIECE: "\n"})


class TokenizerLoadError(ValueError):
    """The path holds no usable tokenizer: missing, not a sentencepiece model, or another layout."""


def reference_encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """The PanGu-α encoding of one document, literally (the ground truth of every test)."""
    return sp.encode(reference_segment(text))


def _resolve_model_file(source: Path) -> tuple[Path, dict[str, Any]]:
    if not source.exists():
        raise TokenizerLoadError(f"no tokenizer at {source}")
    if source.is_file():
        return source, {}
    meta_path = source / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TokenizerLoadError(f"{meta_path} is not valid JSON: {exc}") from exc
        return source / meta.get("model_file", MODEL_FILE), meta
    # A directory without our JSON, e.g. the PanGu-α release (`vocab.model` beside `vocab.vocab`).
    models = sorted(source.glob("*.model"))
    if len(models) != 1:
        raise TokenizerLoadError(f"{source} has no {META_FILE} and {len(models)} *.model files (need exactly one)")
    return models[0], {}


def load_sentencepiece(model_proto: bytes, origin: str = "<bytes>") -> spm.SentencePieceProcessor:
    """A processor from serialized model bytes, with a clear error for anything else."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except Exception as exc:  # sentencepiece raises RuntimeError or OSError depending on the damage
        raise TokenizerLoadError(f"{origin} is not a sentencepiece model ({exc})") from exc
    return sp


def check_layout(sp: spm.SentencePieceProcessor, origin: str = "model") -> None:
    """Raise unless the ten special pieces of PanGu-α sit at ids 0–9 (their sentencepiece type may vary)."""
    if sp.get_piece_size() <= len(SPECIAL_PIECES):
        raise TokenizerLoadError(f"{origin} has only {sp.get_piece_size()} pieces")
    wrong = [
        f"id {i} is {sp.id_to_piece(i)!r}, expected {piece!r}"
        for i, piece in enumerate(SPECIAL_PIECES)
        if sp.id_to_piece(i) != piece
    ]
    if wrong:
        raise TokenizerLoadError(f"{origin} is not in the PanGu-α vocabulary layout: " + "; ".join(wrong))


class PanguTokenizer:
    """jieba + sentencepiece, PanGu-α scheme. Thread-compatible, not thread-safe (caches)."""

    def __init__(self, model_proto: bytes, meta: dict[str, Any] | None = None, origin: str = "<bytes>") -> None:
        self.sp = load_sentencepiece(model_proto, origin)
        check_layout(self.sp, origin)
        self.model_proto = model_proto
        self.meta = meta or {}
        self.origin = origin
        self._encoder = ChunkEncoder(self.sp, FastSegmenter())
        self._pool: EncoderPool | None = None

    @classmethod
    def load(cls, source: str | Path) -> "PanguTokenizer":
        """From a tokenizer directory (ours, or any dir with exactly one `*.model`) or a `.model` file."""
        model_path, meta = _resolve_model_file(Path(source))
        if not model_path.is_file():
            raise TokenizerLoadError(f"model file {model_path} is missing")
        return cls(model_path.read_bytes(), meta, origin=str(model_path))

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_NAMES)

    unk_id = UNK
    pad_id = PAD
    eot_id = EOT

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model bytes: what a packed shard records to know which tokenizer made it."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    # -- encoding -----------------------------------------------------------------------------
    def segment(self, text: str) -> str:
        """The string sentencepiece sees for `text` (jieba words joined by spaces)."""
        return self._encoder.segmenter.segment(text)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(self._encoder.segmenter.segment(text))

    def encode_batch(
        self,
        texts: Iterable[str],
        workers: int | None = None,
        chunk_chars: int = 256_000,
        chunk_docs: int = 2048,
    ) -> list[list[int]]:
        """Ids of every text, in order. `workers` > 1 encodes chunks in worker processes."""
        return list(self.encode_stream(texts, workers, chunk_chars, chunk_docs))

    def encode_stream(
        self,
        texts: Iterable[str],
        workers: int | None = None,
        chunk_chars: int = 256_000,
        chunk_docs: int = 2048,
    ) -> Iterator[list[int]]:
        """Like `encode_batch`, lazily: memory stays bounded by a few chunks per worker."""
        chunks = chunk_texts(texts, chunk_chars, chunk_docs)
        if not workers or workers <= 1:
            for chunk in chunks:
                yield from self._encoder.ids(chunk)
            return
        for result in self._pool_for(workers).map_ids(chunks):
            yield from result

    def encode_chunks_as_arrays(
        self, chunks: Iterable[list[str]], workers: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per chunk: all ids as one int32 array and each document's length (for the packer)."""
        if not workers or workers <= 1:
            for chunk in chunks:
                yield self._encoder.arrays(chunk)
            return
        yield from self._pool_for(workers).map_arrays(chunks)

    def _pool_for(self, workers: int) -> EncoderPool:
        if self._pool is None or self._pool.workers != workers:
            self.close()
            self._pool = EncoderPool(self.model_proto, workers)
        return self._pool

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Control pieces (`<s>`, `</s>`, `<pad>`) decode to nothing; the other special
        pieces decode as their names (`<eot>`), as in the PanGu-α release, unless skipped."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # "▃"/"▂" are text, and `<unk>` ("⁇") marks where text was: keep them.
            ids = [i for i in ids if i >= len(SPECIAL_PIECES) or i in (UNK, NEWLINE, SPACE)]
        return self.sp.decode(ids).translate(_DECODE)

    # -- lifecycle ----------------------------------------------------------------------------
    def save(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write `spm.model`, `spm.vocab` and `tokenizer.json` into `directory`."""
        return write_tokenizer_dir(Path(directory), self.model_proto, {**self.meta, **(meta or {})})

    def close(self) -> None:
        """Stop the worker processes, if any (they also stop when the tokenizer is collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "PanguTokenizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self.model_proto, "meta": self.meta, "origin": self.origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["meta"], state["origin"])

    def __repr__(self) -> str:
        return f"PanguTokenizer({self.origin!r}, vocab_size={self.vocab_size})"
