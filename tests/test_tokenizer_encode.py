"""PanguTokenizer: ids equal to the reference scheme, round trip, batching, loading other layouts."""
from __future__ import annotations

import io
import unicodedata
from functools import lru_cache
from pathlib import Path

import jieba
import pytest
import sentencepiece as spm

from tests.test_tokenizer_common import clue_documents, clue_lines, edge_texts, trained_model_dir
from tokenizer.pangu import PanguTokenizer, TokenizerLoadError, reference_encode
from tokenizer.segment import FastSegmenter, reference_segment
from tokenizer.specials import SPECIAL_PIECES


@pytest.fixture(scope="module")
def tok() -> PanguTokenizer:
    t = PanguTokenizer.load(trained_model_dir())
    yield t
    t.close()


def _texts() -> list[str]:
    # Every other document keeps the module at a few seconds; the whole set is in the benchmark.
    return [text for _, text in clue_documents()[::2]] + edge_texts()


@lru_cache(maxsize=None)
def _reference_segments() -> tuple[str, ...]:
    return tuple(reference_segment(t) for t in _texts())


def test_segmenter_matches_jieba_on_real_text() -> None:
    seg = FastSegmenter()
    texts, expected = _texts(), _reference_segments()
    mismatches = [t for t, e in zip(texts, expected) if seg.segment(t) != e]
    assert not mismatches, mismatches[:3]
    # A second pass runs from the block cache and must give the same strings.
    assert [seg.segment(t) for t in texts] == list(expected)


def test_segment_scheme_maps_whitespace_inside_segments() -> None:
    seg = FastSegmenter()
    assert seg.segment("你好 世界\n再见") == "你好 ▂ 世界 ▃ 再见"
    assert seg.segment("a\r\nb") == "a \r▃ b"  # jieba keeps "\r\n" as one segment
    assert seg.segment("") == ""


def test_segmenter_follows_dictionary_changes() -> None:
    dt = jieba.dt
    seg = FastSegmenter()
    text = "量子纠缠态制备器性能优良"
    before = seg.segment(text)
    dt.check_initialized()  # the segmenter alone may leave it unloaded (the cached table)
    saved_total, saved_freq = dt.total, dict(dt.FREQ)
    try:
        jieba.add_word("纠缠态制备器", freq=100000)
        after = seg.segment(text)
        assert after == reference_segment(text)
        assert "纠缠态制备器" in after.split(" ") and after != before
    finally:
        dt.FREQ.clear()
        dt.FREQ.update(saved_freq)
        dt.total = saved_total
    assert seg.segment(text) == before == reference_segment(text)


def test_ids_equal_reference_on_real_and_edge_text(tok: PanguTokenizer) -> None:
    texts = _texts()
    assert any("😀" in t for t in texts) and any("\n" in t for t in texts) and any("  " in t for t in texts)
    assert any(tok.unk_id in tok.encode(t) for t in texts)  # rare characters outside the vocabulary
    for text, segmented in zip(texts, _reference_segments()):
        assert tok.encode(text) == tok.sp.encode(segmented), text[:80]
    for text in edge_texts():
        assert tok.encode(text) == reference_encode(tok.sp, text)


def test_encode_batch_in_workers_keeps_order_and_ids(tok: PanguTokenizer) -> None:
    texts = _texts()[:400] + edge_texts()
    expected = [reference_encode(tok.sp, t) for t in texts]
    # Small chunks so that several chunks are in flight per worker and order matters.
    assert tok.encode_batch(texts, workers=2, chunk_chars=5_000, chunk_docs=16) == expected
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch([], workers=2) == []
    # A terminal's Ctrl-C reaches the workers too: they leave it to the parent, which stops them (each printed a
    # KeyboardInterrupt traceback before `interrupted`)
    import signal

    pool = tok._pool_for(2)
    handlers = {pool._executor.submit(signal.getsignal, signal.SIGINT).result() for _ in range(4)}
    assert handlers == {signal.SIG_IGN}


def _normaliser_keeps(sp: spm.SentencePieceProcessor, text: str) -> bool:
    return all(c in " \n" or sp.normalize(c) == "▁" + c for c in set(text)) and "▂" not in text and "▃" not in text


def test_round_trip_exact_where_the_normaliser_keeps_the_text(tok: PanguTokenizer) -> None:
    checked = 0
    for text in _texts():
        ids = tok.encode(text)
        if tok.unk_id in ids or not _normaliser_keeps(tok.sp, text):
            continue
        assert tok.decode(ids) == text
        checked += 1
    assert checked > 300
    # The double spaces, blank lines and leading spaces survive.
    for text in ["  两个空格  ", "第一行\n\n第三行", "Hello World 你好"]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_of_specials(tok: PanguTokenizer) -> None:
    ids = tok.encode("你好") + [tok.eot_id, tok.pad_id]
    assert tok.decode(ids).startswith("你好")
    assert tok.decode(ids, skip_special_tokens=True) == "你好"


def _released_layout_model() -> bytes:
    """A model shaped like the PanGu-α release: the ten pieces at ids 0–9 but only <unk> typed as
    special; everything else (<s>, </s>, <pad>, …) is a plain user-defined piece."""
    lines = [line for lines in clue_lines().values() for line in lines[:300]]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(reference_segment(x) for x in lines), model_writer=out, vocab_size=3000,
        character_coverage=0.99, model_type="unigram", normalization_rule_name="nmt_nfkc",
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, user_defined_symbols=list(SPECIAL_PIECES[1:]),
        minloglevel=2,
    )
    return out.getvalue()


def test_loads_released_layout_and_rejects_others(tmp_path) -> None:
    model = _released_layout_model()
    release = tmp_path / "release"
    release.mkdir()
    (release / "vocab.model").write_bytes(model)
    tok = PanguTokenizer.load(release)  # a directory with one *.model and no tokenizer.json
    sp = tok.sp
    assert [sp.id_to_piece(i) for i in range(10)] == list(SPECIAL_PIECES)
    assert not sp.is_control(6)  # <pad> is a user-defined piece here, a control piece in ours
    text = "他是苹果公司的创始人。\n  第二行"
    assert tok.encode(text) == reference_encode(sp, text)
    assert tok.decode(tok.encode("你好 世界")) == "你好 世界"

    other = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["甲乙丙丁 戊己庚辛"] * 50), model_writer=other, vocab_size=20,
        model_type="bpe", minloglevel=2,
    )
    (tmp_path / "other.model").write_bytes(other.getvalue())
    with pytest.raises(TokenizerLoadError, match="not in the PanGu-α vocabulary layout"):
        PanguTokenizer.load(tmp_path / "other.model")


def test_clear_errors_for_files_that_are_not_models(tmp_path) -> None:
    bogus = tmp_path / "spm.model"
    bogus.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(TokenizerLoadError, match="not a sentencepiece model"):
        PanguTokenizer.load(bogus)
    with pytest.raises(TokenizerLoadError, match="no tokenizer"):
        PanguTokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="not valid JSON"):
        PanguTokenizer.load(tmp_path)


def test_pickles_without_its_pool(tok: PanguTokenizer) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("北京欢迎你") == tok.encode("北京欢迎你")
    assert unicodedata.is_normalized("NFKC", "北京")  # sanity: the test text is NFKC-stable



_DICTIONARY_DIGEST = """
import hashlib, json, sys
import jieba
from tokenizer import segment
if sys.argv[1] == "jieba":
    jieba.dt.initialize()
else:
    if sys.argv[1] == "cached":
        def refuse(*args, **kwargs):
            raise AssertionError("jieba's own dictionary loading ran")
        jieba.Tokenizer.initialize = refuse
    segment.load_dictionary()
items = sorted(jieba.dt.FREQ.items())
print(json.dumps({"digest": hashlib.sha256(repr(items).encode()).hexdigest(), "total": jieba.dt.total,
                  "entries": len(items), "segmented": segment.fast_segment("微博客服务在北京天安门广场")}))
"""


def test_dictionary_from_the_array_cache_is_jiebas_own(tmp_path) -> None:
    # The first process builds the cache (through jieba's loader); the next one loads jieba's default
    # dictionary from it without jieba's loader, and gets the very same words, frequencies and total.
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PANGU_HOME": str(tmp_path)}

    def digest(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _DICTIONARY_DIGEST, mode], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    jiebas = digest("jieba")
    assert not list((tmp_path / "cache").glob("jieba-prefix-dictionary-*.npz"))
    first = digest("first")
    cache = list((tmp_path / "cache").glob("jieba-prefix-dictionary-*.npz"))
    assert len(cache) == 1
    cached = digest("cached")
    assert cached == first == jiebas and cached["entries"] > 400_000
    assert cached["segmented"] == "微 博客 服务 在 北京天安门广场"


_SEGMENTER_TABLE = """
import hashlib, json, sys
import jieba
from tokenizer import segment
from tests.test_tokenizer_encode import _texts
if sys.argv[1] == "jieba":
    jieba.dt.initialize()  # the table is then derived from jieba.dt, as for any dictionary
if sys.argv[1] == "cached":
    def refuse(*args, **kwargs):
        raise AssertionError("jieba's dictionary was loaded")
    jieba.Tokenizer.initialize = refuse
    segment.load_dictionary = refuse
seg = segment.FastSegmenter()
out = [seg.segment(t) for t in _texts()[:200]]
table = sorted(seg._logp.items(), key=lambda kv: kv[0])
print(json.dumps({"table": hashlib.sha256(repr(table).encode()).hexdigest(), "entries": len(table),
                  "no_word": seg._no_word, "segmented": out, "loaded": jieba.dt.initialized}))
"""


def test_segmenter_takes_its_word_table_from_the_cache_without_loading_jiebas_dictionary(tmp_path) -> None:
    # A process that only segments (a corpus worker, a tokenizer worker) gets the same word table as
    # the one derived from jieba's own dictionary, and the same segments, without filling jieba.dt.
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PANGU_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _SEGMENTER_TABLE, mode], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        return json.loads(out)

    jieba_run = start("jieba")  # never writes the word table's cache: beside the run that builds it
    first = result(start("first"))  # builds the cache (through jieba's loader)
    assert list((tmp_path / "cache").glob("jieba-word-logp-*.npz"))
    cached, jiebas = result(start("cached")), result(jieba_run)
    assert not cached["loaded"] and first["loaded"] and jiebas["loaded"]
    assert cached["table"] == first["table"] == jiebas["table"] and cached["entries"] > 400_000
    assert cached["no_word"] == first["no_word"] == jiebas["no_word"]
    assert cached["segmented"] == jiebas["segmented"] == [reference_segment(t) for t in _texts()[:200]]
