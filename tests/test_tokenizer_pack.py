"""Packing: MMIDIDX shards read back, <eot> per document, domains, bad input, resume."""
from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from tests.test_tokenizer_common import clue_documents, session_dir, trained_model_dir, write_corpus
from tokenizer.config import PackConfig
from tokenizer.corpus import CorpusError
from tokenizer.indexed import IndexedReader, IndexedWriter
from tokenizer.pack import pack_corpus
from tokenizer.pangu import PanguTokenizer, TokenizerLoadError, reference_encode

RARE = "𪚥𠀀龘靐"  # outside a 4,000-piece vocabulary trained at 99.5 % coverage


def _docs() -> list[tuple[str | None, str | None]]:
    docs: list[tuple[str | None, str | None]] = [(d, t) for d, t in clue_documents()[::25]]
    docs[3] = ("news", "   \n\t ")           # whitespace only: skipped, counted
    docs[5] = ("web", "")                      # empty: skipped, counted
    docs[7] = (None, "没有领域的文档。" + RARE)   # no domain → default_domain, unknown characters
    docs[9] = ("web", "控制\x00字符\x07在\x1b[31m这里")
    docs[11] = ("web", "\u200b")                # nothing left after normalisation: skipped, counted
    docs[15] = ("web", "\x00\x01\x02")          # control characters only: <unk> pieces, kept
    docs[13] = ("news", None)                   # null text
    return docs


@lru_cache(maxsize=None)
def packed() -> tuple[Path, Path, dict]:
    corpus = write_corpus(session_dir() / "pack-corpus", _docs(), shards=3)
    out = session_dir() / "pack-out"
    summary = pack_corpus(PackConfig(input=str(corpus), output=str(out), tokenizer=str(trained_model_dir()),
                                     workers=2, chunk_chars=20_000))
    return corpus, out, summary


def test_shards_read_back_as_reference_ids_with_eot() -> None:
    _, out, summary = packed()
    tok = PanguTokenizer.load(trained_model_dir())
    names = {int(i): n for i, n in summary["id_to_name"].items()}
    kept = [(d or "unknown", t) for d, t in _docs() if t and t.strip() and reference_encode(tok.sp, t)]
    got = []
    for stem in summary["shards"]:
        reader = IndexedReader(out / stem)
        domains = np.load(out / f"{stem}.domains.npy")
        assert reader.dtype == np.dtype("<u2") and len(domains) == len(reader)
        got += [(names[int(d)], reader[i].tolist()) for i, d in enumerate(domains)]
    assert [d for d, _ in got] == [d for d, _ in kept]
    for (_, ids), (_, text) in zip(got, kept):
        assert ids == reference_encode(tok.sp, text) + [9]
    assert summary["documents"] == len(kept) and summary["tokens"] == sum(len(i) for _, i in got)


def test_domains_json_counts() -> None:
    _, out, summary = packed()
    on_disk = json.loads((out / "domains.json").read_text(encoding="utf-8"))
    assert on_disk["domains"] == summary["domains"]
    domains = summary["domains"]
    assert domains["news"]["empty_documents"] == 2 and domains["web"]["empty_documents"] == 2
    assert domains["web"]["control_char_documents"] == 2
    assert domains["unknown"]["documents"] == 1 and domains["unknown"]["unk_tokens"] >= len(RARE) - 1
    tok = PanguTokenizer.load(trained_model_dir())
    unk = sum(reference_encode(tok.sp, t).count(0) for _, t in _docs() if t)
    assert sum(d["unk_tokens"] for d in domains.values()) == unk > 0
    assert sorted(d["id"] for d in domains.values()) == list(range(len(domains)))
    assert abs(sum(d["token_share"] for d in domains.values()) - 1) < 1e-9


def test_idx_is_megatron_mmidxidx() -> None:
    _, out, summary = packed()
    raw = (out / f"{summary['shards'][0]}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_count = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code) == (1, 8) and doc_count == count + 1
    sizes = np.frombuffer(raw, "<i4", count, 34)
    pointers = np.frombuffer(raw, "<i8", count, 34 + 4 * count)
    docs = np.frombuffer(raw, "<i8", doc_count, 34 + 12 * count)
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(sizes)[:-1]]) * 2).tolist()
    assert docs.tolist() == list(range(count + 1))
    assert len(raw) == 34 + 12 * count + 8 * doc_count
    assert (out / f"{summary['shards'][0]}.bin").stat().st_size == 2 * int(sizes.sum())


def test_writer_round_trip_and_abort(tmp_path) -> None:
    with IndexedWriter(tmp_path / "x", np.int32) as w:
        w.add_documents(np.array([5, 6, 7, 70000], dtype=np.int64), np.array([3, 1]))
    r = IndexedReader(tmp_path / "x")
    assert r[0].tolist() == [5, 6, 7] and r[1].tolist() == [70000] and r.dtype == np.dtype("<i4")
    w = IndexedWriter(tmp_path / "y")
    with pytest.raises(ValueError, match="outside the range"):
        w.add_documents(np.array([70000]), np.array([1]))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def test_resume_skips_finished_shards_and_redoes_changed_ones(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus", [(d, t) for d, t in clue_documents()[::60]], shards=3)
    config = PackConfig(input=str(corpus), output=str(tmp_path / "out"), tokenizer=str(trained_model_dir()))
    first = pack_corpus(config)
    assert [r["skipped"] for r in first["shard_results"]] == [False] * 3
    before = (tmp_path / "out" / "part-00001.bin").read_bytes()
    assert [r["skipped"] for r in pack_corpus(config)["shard_results"]] == [True] * 3
    # An interrupted shard (no marker) and a changed input are packed again; the rest are kept.
    (tmp_path / "out" / "part-00001.done.json").unlink()
    write_corpus(tmp_path / "other", [("news", "全新的第三个分片。")], shards=1)
    (tmp_path / "other" / "data" / "part-00000.parquet").replace(corpus / "data" / "part-00002.parquet")
    again = pack_corpus(config)
    assert [r["skipped"] for r in again["shard_results"]] == [True, False, False]
    assert (tmp_path / "out" / "part-00001.bin").read_bytes() == before
    assert again["domains"] != first["domains"] and again["shard_results"][2]["documents"] == 1
    assert not list((tmp_path / "out").glob(".*.tmp"))
    # A shard file cut short or replaced after its marker (a disk that filled, a copy that stopped) is packed
    # again: the marker records each file's size (a truncated .bin with its marker used to pass as packed).
    bin_file = tmp_path / "out" / "part-00001.bin"
    bin_file.write_bytes(before[: len(before) // 2])
    assert [r["skipped"] for r in pack_corpus(config)["shard_results"]] == [True, False, True]
    assert bin_file.read_bytes() == before


def test_packing_a_smaller_corpus_into_the_same_output_removes_the_shards_it_no_longer_has(tmp_path) -> None:
    """They stayed beside the new ones (unlisted in domains.json, but read as data by whatever lists the folder)."""
    documents = [(d, t) for d, t in clue_documents()[::60]]
    out = tmp_path / "out"
    tokenizer = str(trained_model_dir())
    pack_corpus(PackConfig(input=str(write_corpus(tmp_path / "big", documents, shards=3)), output=str(out),
                           tokenizer=tokenizer))
    (out / "notes.txt").write_text("the user's")  # not a token shard: left alone
    smaller = pack_corpus(PackConfig(input=str(write_corpus(tmp_path / "small", documents[:5], shards=1)),
                                     output=str(out), tokenizer=tokenizer))
    assert smaller["removed_shards"] == ["part-00001", "part-00002"] and smaller["shards"] == ["part-00000"]
    assert sorted(p.name for p in out.iterdir()) == [
        "domain_map.json", "domains.json", "notes.txt", "part-00000.bin", "part-00000.domains.npy",
        "part-00000.done.json", "part-00000.idx"]
    assert smaller["documents"] == 5 and len(IndexedReader(out / "part-00000")) == 5


def test_a_rerun_removes_what_a_killed_packer_left(tmp_path) -> None:
    """The temporaries of a shard whose packer was killed are gone after the rerun, even where the
    rerun does not pack that shard again (another run finished it meanwhile)."""
    from tests.test_temporaries import left_by_a_killed_writer

    corpus = write_corpus(tmp_path / "corpus", [(d, t) for d, t in clue_documents()[::90]], shards=2)
    config = PackConfig(input=str(corpus), output=str(tmp_path / "out"), tokenizer=str(trained_model_dir()))
    pack_corpus(config)
    left = [left_by_a_killed_writer(tmp_path / "out" / name) for name in ("part-00000.bin", "part-00000.idx")]
    for path in left:
        path.write_bytes(b"partial")
    assert [r["skipped"] for r in pack_corpus(config)["shard_results"]] == [True, True]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_domain_ids_stay_fixed_when_new_domains_arrive(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "c", [("news", "新闻。"), ("web", "网页。")], shards=1)
    config = PackConfig(input=str(corpus), output=str(tmp_path / "o"), tokenizer=str(trained_model_dir()),
                        domain_ids={"web": 7})
    assert pack_corpus(config)["id_to_name"] == {"7": "web", "8": "news"}
    write_corpus(tmp_path / "c", [("news", "新闻。"), ("web", "网页。"), ("ebooks", "书。")], shards=1)
    assert pack_corpus(config)["id_to_name"] == {"7": "web", "8": "news", "9": "ebooks"}


def test_bad_inputs_give_clear_errors(tmp_path) -> None:
    (tmp_path / "empty" / "data").mkdir(parents=True)
    with pytest.raises(CorpusError, match="no corpus shards"):
        pack_corpus(PackConfig(input=str(tmp_path / "empty"), output=str(tmp_path / "o"),
                               tokenizer=str(trained_model_dir())))
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    corpus = write_corpus(tmp_path / "c", [("news", "新闻。")], shards=1)
    with pytest.raises(TokenizerLoadError, match="not a sentencepiece model"):
        pack_corpus(PackConfig(input=str(corpus), output=str(tmp_path / "o"), tokenizer=str(bogus), workers=2))
