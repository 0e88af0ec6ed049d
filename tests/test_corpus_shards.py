"""Large inputs are cut into bounded shards: byte ranges of JSON lines, row groups of Parquet.

A build that cuts a file into parts must give the same corpus as one that reads it whole: the
same ids (line and row numbers are the file's), the same kept documents, the same duplicates.
"""
from __future__ import annotations

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cleaning.build import CorpusBuild
from cleaning.config import CorpusConfig
from cleaning.document import Rejection
from cleaning.inputs import hash_and_split
from cleaning.readers import RecordReader
from cleaning.stages import run_local
from tests.realtext import long_documents

RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


def _records(n: int = 60) -> list[dict]:
    docs = long_documents(n)
    records = [{"text": t, "source": "science"} for t in docs]
    records[40]["text"] = docs[3]  # an exact copy in a later part
    records[50]["text"] = docs[7][:60] + "这里多了一句话。" + docs[7][60:]  # a near copy
    records.insert(20, {"text": 42})  # a malformed record, rejected with a reason
    return records


def _write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _config(shard_bytes: int) -> CorpusConfig:
    return CorpusConfig.model_validate({"rules": RULES_ONLY, "shard_bytes": shard_bytes, "dedup": {"partitions": 2}})


def _rows(out) -> dict[str, dict]:
    tables = [pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]
    tables += [pq.read_table(p) for p in sorted((out / "rejected").glob("*.parquet"))]
    rows = {}
    for table in tables:
        for row in table.to_pylist():
            rows[row["id"]] = {"kept": "reason" not in row, "reason": row.get("reason"), "dup_of": row.get("dup_of"),
                               "text": row["text"]}
    return rows


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_file_cut_into_parts_builds_the_same_corpus_as_read_whole(tmp_path, kind):
    records = _records()
    raw = tmp_path / "raw"
    if kind == "jsonl":
        _write_jsonl(raw / "crawl" / "big.jsonl", records)
    else:
        raw.joinpath("crawl").mkdir(parents=True)
        good = [r for r in records if isinstance(r["text"], str)]
        pq.write_table(pa.Table.from_pylist(good), raw / "crawl" / "big.parquet", row_group_size=7)
    whole = run_local(CorpusBuild([str(raw)], str(tmp_path / "whole"), _config(1 << 30)))
    parted = run_local(CorpusBuild([str(raw)], str(tmp_path / "parted"), _config(8 * 1024)))

    assert len(whole["inputs"]) == 1 and whole["inputs"][0]["part"] is None
    parts = [i["part"] for i in parted["inputs"]]
    assert len(parts) >= 4, parts
    assert all(i["uri"] == whole["inputs"][0]["uri"] and i["content_hash"] == whole["inputs"][0]["content_hash"]
               for i in parted["inputs"])
    # The parts tile the file: each starts where the one before stopped, and counts the records before it.
    assert parts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert len(list((tmp_path / "parted" / "data").glob("*.parquet"))) == len(parts)

    assert parted["totals"] == whole["totals"]
    assert parted["rejected_by_rule"] == whole["rejected_by_rule"]
    assert parted["rejected_by_rule"]["exact_duplicate"] >= 1
    assert parted["rejected_by_rule"]["near_duplicate"] >= 1
    assert _rows(tmp_path / "parted") == _rows(tmp_path / "whole")


def test_parts_are_cut_after_a_newline_and_count_the_lines_before(tmp_path):
    lines = [json.dumps({"text": "甲" * (i * 37 % 300)}, ensure_ascii=False) for i in range(200)]
    lines.insert(50, "x" * 5000)  # a line longer than a part: it stays one line
    data = ("\n".join(lines)).encode()  # no newline at the end
    path = tmp_path / "a.jsonl"
    path.write_bytes(data)
    digest, size, parts = hash_and_split(str(path), 1000, chunk=333)  # cuts often fall in the next chunk
    whole_digest, whole_size, none = hash_and_split(str(path), 0)
    assert (digest, size) == (whole_digest, whole_size) and none == []
    assert parts[0][:3] == (0, parts[0][1], 0) and parts[-1][1] == size
    for (start, stop, before, nbytes), following in zip(parts, parts[1:] + [None]):
        assert nbytes == stop - start > 0
        assert start == 0 or data[start - 1:start] == b"\n"
        assert before == data[:start].count(b"\n")
        if following:
            assert stop - start >= 1000 or b"\n" not in data[start + 1000 - 1:stop - 1]
    # Reading the parts one after another gives the lines of the file, numbered as in the file.
    reader = RecordReader()
    numbered = [(r.doc if isinstance(r, Rejection) else r).meta["line"] for part in parts
                for r in reader.read(str(path), part=part)]
    assert numbered == list(range(1, 202))
    assert [(r.reason, r.doc.meta["line"]) for part in parts for r in reader.read(str(path), part=part)
            if isinstance(r, Rejection)] == [("corrupt_json", 51)]


def test_compressed_files_plain_text_and_a_json_document_stay_whole(tmp_path):
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in long_documents(40))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(lines.encode()))
    (tmp_path / "b.txt").write_text("\n\n".join(long_documents(40)), encoding="utf-8")
    # one JSON array, pretty-printed: a cut between two of its lines would leave two halves of one value
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in long_documents(40)], ensure_ascii=False,
                                                indent=2), encoding="utf-8")
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.jsonl.bz2", "b.txt", "c.json"):
        digest, size, parts = hash_and_split(str(tmp_path / name), 1024)
        assert size > 4 * 1024 and parts == []
