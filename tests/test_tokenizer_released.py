"""`pangu tokenizer released`: the released PanGu-α tokenizer from the pcl_pangu wheel, ids equal to the
release's own `JIEBATokenizer` (imported from the downloaded wheel at test time, never copied)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sample_data.sources.packages import download, read_member
from tokenizer.pangu import PanguTokenizer
from tokenizer.released import RELEASED_MODEL_MEMBER, RELEASED_PACKAGE, RELEASED_VOCAB_MEMBER, write_released_tokenizer


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return download(RELEASED_PACKAGE)
    except Exception as exc:  # not a skip: the registry is reachable wherever the tests run
        pytest.fail(f"could not download {RELEASED_PACKAGE.spec} from PyPI: {exc}")


@pytest.fixture(scope="module")
def released_jieba(wheel: Path, tmp_path_factory: pytest.TempPathFactory):
    """The release's `JIEBATokenizer`, from the wheel's own files."""
    root = tmp_path_factory.mktemp("pcl_tokenizer")
    (root / "vocab.model").write_bytes(read_member(wheel, RELEASED_MODEL_MEMBER))
    (root / "vocab.vocab").write_bytes(read_member(wheel, RELEASED_VOCAB_MEMBER))
    source = root / "tokenization_jieba.py"
    source.write_bytes(read_member(wheel, "pcl_pangu/tokenizer/tokenization_jieba.py"))
    spec = importlib.util.spec_from_file_location("pcl_tokenization_jieba", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.JIEBATokenizer(str(root / "vocab"))


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flows.cli import main

    out = tmp_path_factory.mktemp("released") / "tok"
    assert main(["tokenizer", "released", "--output", str(out)]) == 0
    return out


def _texts() -> list[str]:
    from tests.realtext import abstracts, app_descriptions

    return [*abstracts()[:150], *app_descriptions()[:100],
            "PanGu-α 是 2021 年发布的\n中文  语言模型，  支持 zero-shot。\n\n第二段：100% OK!",
            "  前导空格与\t制表符\r\n以及 emoji 😀 和全角，标点。"]


def test_layout_and_provenance(released_dir: Path) -> None:
    meta = json.loads((released_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 40000
    assert meta["source"]["package"] == RELEASED_PACKAGE.spec
    assert (released_dir / "spm.model").is_file() and (released_dir / "spm.vocab").is_file()
    tok = PanguTokenizer.load(released_dir)
    assert [tok.id_to_piece(i) for i in range(10)] == [
        "<unk>", "<s>", "</s>", "\u2583", "\u2582", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>"]


def test_ids_equal_released_jieba_tokenizer(released_dir: Path, released_jieba) -> None:
    tok = PanguTokenizer.load(released_dir)
    texts = _texts()
    assert len(texts) > 200
    for text in texts:
        assert tok.encode(text) == released_jieba.encode(text), text[:60]
    # batched (worker processes) agrees as well, and decoding matches the release's decode
    assert [list(x) for x in tok.encode_batch(texts[:40])] == [released_jieba.encode(t) for t in texts[:40]]
    for text in texts[:40]:
        ids = released_jieba.encode(text)
        assert tok.decode(ids) == released_jieba.decode(ids)
    tok.close()


def test_vocab_file_is_the_release_s(released_dir: Path, wheel: Path) -> None:
    assert (released_dir / "spm.vocab").read_bytes() == read_member(wheel, RELEASED_VOCAB_MEMBER)
    assert (released_dir / "spm.model").read_bytes() == read_member(wheel, RELEASED_MODEL_MEMBER)


def test_library_call_writes_the_same(tmp_path: Path, released_dir: Path) -> None:
    out = write_released_tokenizer(tmp_path / "again")
    assert (out / "spm.model").read_bytes() == (released_dir / "spm.model").read_bytes()
