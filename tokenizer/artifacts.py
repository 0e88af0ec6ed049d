"""The tokenizer directory contract (SPEC §2.1): `spm.model`, `spm.vocab`, `tokenizer.json`.

Files are written to temporary names and renamed; `tokenizer.json` goes last, so a directory with
it is complete.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import sentencepiece as spm

# The one atomic writer (temporary name, then rename); pangu_model reaches it through this module.
from cleaning.writers import write_bytes_atomic, write_json_atomic  # noqa: F401
from tokenizer.segment import JIEBA_VERSION
from tokenizer.specials import SPECIAL_NAMES, SPECIAL_PIECES

FORMAT = "pangu-tokenizer/1"
META_FILE = "tokenizer.json"
MODEL_FILE = "spm.model"
VOCAB_FILE = "spm.vocab"


def vocab_text(sp: spm.SentencePieceProcessor) -> str:
    """`piece<TAB>score` per line, as sentencepiece's trainer writes `.vocab` (scores printed like `%g`)."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def base_meta(sp: spm.SentencePieceProcessor, model_proto: bytes) -> dict[str, Any]:
    """What every tokenizer.json states, whoever wrote the model."""
    return {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "vocab_file": VOCAB_FILE,
        "vocab_size": sp.get_piece_size(),
        "special_tokens": {name: {"id": i, "piece": SPECIAL_PIECES[i]} for name, i in SPECIAL_NAMES.items()},
        "model_sha256": hashlib.sha256(model_proto).hexdigest(),
        "encoding": {
            "scheme": "pangu-alpha",
            "segmenter": "jieba.cut accurate mode (cut_all=False, HMM=True)",
            "jieba_version": JIEBA_VERSION,
            "in_segment_map": {" ": SPECIAL_PIECES[4], "\n": SPECIAL_PIECES[3]},
            "segment_joiner": " ",
            "decode": "sentencepiece decode; delete ' '; '\u2582' -> ' '; '\u2583' -> '\\n'",
        },
        "sentencepiece_version": spm.__version__,
    }


def write_tokenizer_dir(directory: Path, model_proto: bytes, meta: dict[str, Any], vocab: str | None = None) -> Path:
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / MODEL_FILE, model_proto)
    write_bytes_atomic(directory / VOCAB_FILE, (vocab if vocab is not None else vocab_text(sp)).encode("utf-8"))
    write_json_atomic(directory / META_FILE, {**meta, **base_meta(sp, model_proto)})
    return directory
