"""Nothing stops a build, nothing is lost (issue #13 §2): bad records, damaged files, failing steps,
colliding ids and a failed accounting check, each against the whole build (no orchestrator)."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cleaning import filters
from cleaning.build import AccountingError, CorpusBuild
from cleaning.stages import run_local
from cleaning.document import Document, Rejection
from cleaning.readers import ReadFault, RecordReader, ShardReadError
from tests.realtext import long_documents
from tests.test_corpus_build import config, read_rows, write_jsonl


def line(record) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def with_escape(record, escape: str) -> str:
    """A JSONL line whose "\x07" characters are written as the JSON escape `escape` (e.g. \\ud800)."""
    return line(record).replace("\\u0007", escape)


def outputs(out):
    return read_rows(out / "data"), read_rows(out / "rejected")


def assert_accounted(manifest, out):
    kept, rejected = outputs(out)
    totals = manifest["totals"]
    assert (totals["kept"], totals["rejected"]) == (len(kept), len(rejected))
    assert totals["input"] == len(kept) + len(rejected)
    return kept, rejected


# -- malformed records ----------------------------------------------------------------------------
def test_lone_surrogate_in_json_text_is_rejected_and_the_build_completes(tmp_path):
    """`\\ud800` is valid JSON but not encodable Unicode: t2s (OpenCC) and Parquet both choke on it."""
    docs = long_documents(3)
    raw = tmp_path / "raw" / "web.jsonl"
    raw.parent.mkdir()
    raw.write_text(line({"id": "a", "text": docs[0]})
                   + with_escape({"id": "bad", "text": docs[1][:50] + "\x07" + docs[1][50:]}, "\\ud800")
                   + line({"id": "c", "text": docs[2]}), encoding="utf-8")
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw.parent)], str(out), config()))  # t2s is on
    kept, rejected = assert_accounted(manifest, out)
    assert sorted(r["id"] for r in kept) == ["a", "c"]
    [bad] = rejected
    assert bad["id"] == "bad" and bad["reason"] == "invalid_unicode"
    assert "U+D800" in bad["detail"] and "line 2" in bad["detail"]
    assert "\\ud800" in bad["text"]  # kept for inspection, escaped so that it can be stored


def test_malformed_records_are_each_rejected_with_a_reason(tmp_path):
    text = long_documents(1)[0]
    lines = [
        line({"id": "ok", "text": text}),
        "[1, 2]\n", '"just a string"\n', "null\n", "42\n",  # JSON, but not objects
        line({"id": "int", "text": 7}), line({"id": "list", "text": ["a", "b"]}),
        line({"id": "dict", "text": {"zh": text}}), line({"id": "bool", "text": True}),
        '{"id": "raw-control", "text": "abc\x01def"}\n',  # a raw control character: not JSON
        line({"id": "nul", "text": "二进制\x00数据" + text}),  # escaped NUL: binary data
        with_escape({"id": "\x07", "text": text}, "\\udfff"),  # lone surrogate in the id
        line({"id": "no-text", "body": text}),
    ]
    path = tmp_path / "raw" / "mixed.jsonl"
    path.parent.mkdir()
    path.write_text("".join(lines), encoding="utf-8")
    out = list(RecordReader().read(str(path)))
    reasons = [o.reason if isinstance(o, Rejection) else "doc" for o in out]
    assert reasons == ["doc"] + ["corrupt_json"] * 4 + ["invalid_text"] * 4 + \
        ["corrupt_json", "control_characters", "invalid_unicode", "missing_text"]
    assert all(f"line {i}" in o.detail for i, o in enumerate(out, start=1) if isinstance(o, Rejection))
    assert "is int, not a string" in out[5].detail and "control character" in out[9].detail
    assert "NUL" in out[10].detail and "'id' holds U+DFFF" in out[11].detail

    # The same file through the build: every rejection is written (surrogate included), none lost.
    manifest = run_local(CorpusBuild([str(path.parent)], str(tmp_path / "corpus"), config()))
    kept, rejected = assert_accounted(manifest, tmp_path / "corpus")
    assert manifest["totals"]["input"] == len(lines) and [r["id"] for r in kept] == ["ok"]
    assert "\\udfff" in {r["id"] for r in rejected}


# -- a step that raises -----------------------------------------------------------------------------
def test_exception_in_a_step_rejects_that_document_and_the_shard_goes_on(tmp_path, monkeypatch):
    docs = long_documents(6)
    write_jsonl(tmp_path / "raw" / "news.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)])
    real = filters.MinLength.check_batch

    def fragile(self, docs):  # the step raises on any batch holding d3
        if any(doc.id == "d3" for doc in docs):
            raise ValueError("boom on d3")
        return real(self, docs)

    monkeypatch.setattr(filters.MinLength, "check_batch", fragile)
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(tmp_path / "raw")], str(out), config()))
    kept, rejected = assert_accounted(manifest, out)
    assert sorted(r["id"] for r in kept) == ["d0", "d1", "d2", "d4", "d5"]
    [failed] = rejected
    assert failed["id"] == "d3" and failed["reason"] == "error:min_length"
    assert failed["detail"] == "ValueError: boom on d3"
    assert manifest["rejected_by_rule"] == {"error:min_length": 1}
    assert manifest["sources"]["news"]["rejected"] == {"error:min_length": 1}


def test_a_batch_step_that_raises_is_retried_one_document_at_a_time(monkeypatch):
    """A batch step (model-based filters) fails for the whole batch; only the culprit is rejected,
    and a transform that had rewritten documents before failing does not rewrite them twice."""
    from cleaning import pipeline
    from cleaning.steps import Step, Transform

    class Exclaim(Transform):
        name = "exclaim"

        def transform(self, text):
            if "炸" in text:
                raise RuntimeError("cannot convert")
            return text + "！"

    class Batchy(Step):
        name = "batchy"

        def check_batch(self, docs):
            if any(d.id == "bad-batch" for d in docs):
                raise MemoryError("model ran out of memory")
            return [None] * len(docs)

    monkeypatch.setattr(pipeline, "build_steps", lambda rules: [Exclaim(), Batchy()])
    chain = pipeline.CleaningChain(config())
    docs = [Document(id=i, text=t, domain="d", source="s")
            for i, t in [("a", "甲"), ("b", "乙炸"), ("c", "丙"), ("bad-batch", "丁"), ("e", "戊")]]
    out = list(chain.run(docs))
    verdicts = {o.doc.id if isinstance(o, Rejection) else o.id: o for o in out}
    assert len(out) == 5
    assert verdicts["b"].reason == "error:exclaim" and verdicts["b"].doc.text == "乙炸"
    assert verdicts["bad-batch"].reason == "error:batchy" and "MemoryError" in verdicts["bad-batch"].detail
    assert [verdicts[i].text for i in ("a", "c", "e")] == ["甲！", "丙！", "戊！"]
    assert chain.counts.to_json()["rejected"] == {"s": {"error:exclaim": 1, "error:batchy": 1}}
    assert chain.counts.kept["s"] == 3


def test_sources_with_the_same_rules_go_through_their_steps_in_one_batch(monkeypatch):
    """Documents of sources that share rules meet each step together (the vectorised model filters
    see whole batches); a source with rules of its own gets its own steps; counts stay per source."""
    from cleaning import pipeline
    from cleaning.config import CorpusConfig
    from cleaning.steps import Step

    seen: list[list[str]] = []

    class Recorder(Step):
        name = "recorder"

        def check_batch(self, docs):
            seen.append([d.id for d in docs])
            return [None if "keep" in d.id else "dropped" for d in docs]

    monkeypatch.setattr(pipeline, "build_steps", lambda rules: [Recorder()])
    cfg = CorpusConfig.model_validate({"rules": {"min_chars": 100}, "sources": {"own": {"min_chars": 5}}})
    chain = pipeline.CleaningChain(cfg, batch_size=8)
    sources = ["news", "web", "own", "news", "book", "own", "web", "news"]
    docs = [Document(id=f"{i}-{'keep' if i % 3 else 'drop'}", text="文", domain="d", source=s)
            for i, s in enumerate(sources)]
    out = list(chain.run(docs))
    assert seen == [["0-drop", "1-keep", "3-drop", "4-keep", "6-drop", "7-keep"], ["2-keep", "5-keep"]]
    assert len(out) == 8
    assert dict(chain.counts.kept) == {"web": 1, "book": 1, "news": 1, "own": 2}
    assert chain.counts.to_json()["rejected"] == {"news": {"recorder": 2}, "web": {"recorder": 1}}


# -- ids ------------------------------------------------------------------------------------------
def test_same_base_name_in_two_directories_gives_distinct_ids_and_no_self_dup_of(tmp_path):
    docs = long_documents(5)
    records = [{"text": t, "domain": "web"} for t in docs]  # no explicit ids: generated ones
    for crawl in ("crawl2019", "crawl2020"):  # the same file in two snapshots
        write_jsonl(tmp_path / "raw" / crawl / "part-00000.jsonl", records)
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(tmp_path / "raw")], str(out), config()))
    kept, rejected = assert_accounted(manifest, out)
    all_ids = [r["id"] for r in kept + rejected]
    assert len(all_ids) == len(set(all_ids)) == 10
    assert sorted(r["id"] for r in kept) == [f"crawl2019/part-00000.jsonl:{i}" for i in range(1, 6)]
    assert {r["reason"] for r in rejected} == {"exact_duplicate"}
    for r in rejected:
        assert r["id"].startswith("crawl2020/") and r["dup_of"] == r["id"].replace("crawl2020", "crawl2019")
    assert manifest["ids"]["colliding_ids"] == 0
    assert sorted(i["name"] for i in manifest["inputs"]) == ["crawl2019/part-00000.jsonl", "crawl2020/part-00000.jsonl"]

    # Given as two arguments, the root is their common directory: the same ids.
    again = run_local(CorpusBuild([str(tmp_path / "raw" / "crawl2019"), str(tmp_path / "raw" / "crawl2020")],
                                  str(tmp_path / "again"), config()))
    assert sorted(r["id"] for r in read_rows(tmp_path / "again" / "data")) == sorted(r["id"] for r in kept)
    assert again["totals"] == manifest["totals"]


def test_a_new_file_whose_relative_name_an_earlier_file_keeps_is_named_by_its_uri(tmp_path):
    """Built from `raw/a` and `raw/b`, `raw/b/part-0.jsonl` was named `b/part-0.jsonl`. Built again from `raw/b`
    alone, which now holds `raw/b/b/part-0.jsonl`: the old file keeps its name, and the new file, whose relative
    name is that same `b/part-0.jsonl`, is named by its full URI, so that no two files give the same ids."""
    from cleaning.inputs import expand_inputs, input_names

    for folder in ("a", "b", "b/b"):
        write_jsonl(tmp_path / "raw" / folder / "part-0.jsonl", [{"text": "x", "domain": "web"}])
    first = [str(tmp_path / "raw" / "a"), str(tmp_path / "raw" / "b")]
    earlier = input_names(first, expand_inputs([first[1]]))
    old, = [uri for uri, name in earlier.items() if name == "b/part-0.jsonl"]
    now = [str(tmp_path / "raw" / "b")]
    names = input_names(now, expand_inputs(now), earlier={old: earlier[old]})
    new, = [uri for uri in names if uri != old]
    assert names == {old: "b/part-0.jsonl", new: new} and new.endswith("raw/b/b/part-0.jsonl")
    assert input_names(now, expand_inputs(now)) == {old: "part-0.jsonl", new: "b/part-0.jsonl"}  # with no history


def test_an_output_inside_the_input_directory_is_not_read_back_as_input(tmp_path):
    """`pangu corpus build nest --output nest/out`, run twice: the second run read the first's data/,
    rejected/ and _work/ files as 62 inputs (4,053 documents in where there were 1,100). A refresh whose
    versions root lies in the input directory, and a second refresh, likewise."""
    from cleaning.versions import refresh

    nest = tmp_path / "nest"
    write_jsonl(nest / "news.jsonl", [{"text": t, "domain": "news"} for t in long_documents(6)])
    logged: list[str] = []
    first = run_local(CorpusBuild([str(nest)], str(nest / "out"), config()))
    again = run_local(CorpusBuild([str(nest)], str(nest / "out"), config()), log=logged.append)
    assert [i["name"] for i in again["inputs"]] == ["news.jsonl"]
    assert again["totals"] == first["totals"] and again["totals"]["input"] == 6
    assert any(m.startswith("left out ") and "under the corpus output" in m for m in logged), logged
    (nest / "out").rename(tmp_path / "out")  # another corpus in the input directory would be input
    versions = [refresh([str(nest)], str(nest / "versions"), config()) for _ in range(2)]
    assert versions[1]["version"] == versions[0]["version"] and not versions[1]["built"]
    assert versions[0]["totals"]["input"] == 6


def test_a_file_name_that_is_not_utf8_is_reported_and_the_other_inputs_built(tmp_path):
    """A file named with the byte 0xFF stopped the whole build with "'utf-8' codec can't encode character
    '\\udcff'", naming no file."""
    raw = tmp_path / "raw"
    write_jsonl(raw / "news.jsonl", [{"text": t, "domain": "news"} for t in long_documents(3)])
    (raw / "bad\udcffname.jsonl").write_bytes((raw / "news.jsonl").read_bytes())  # the name's bytes: b"bad\xffname"
    manifest = run_local(CorpusBuild([str(raw)], str(tmp_path / "out"), config()))
    errors = {i["name"]: i.get("error") for i in manifest["inputs"]}
    assert errors == {"news.jsonl": None, "bad\ufffdname.jsonl":
                      f"file name is not valid UTF-8: file://{raw}/bad\ufffdname.jsonl: rename it to read it"}
    assert manifest["totals"]["input"] == 3


def test_colliding_explicit_ids_are_reported_and_both_documents_kept(tmp_path):
    docs = long_documents(4)
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"id": "same", "text": docs[0]}, {"id": "a2", "text": docs[1]}])
    write_jsonl(tmp_path / "raw" / "b.jsonl", [{"id": "b1", "text": docs[2]}, {"id": "same", "text": docs[3]}])
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(tmp_path / "raw")], str(out), config()))
    kept, _ = assert_accounted(manifest, out)
    assert sorted(r["id"] for r in kept) == ["a2", "b1", "same", "same"]  # not merged
    report = manifest["ids"]
    assert (report["colliding_ids"], report["extra_documents"]) == (1, 1)
    assert report["examples"] == [{"id": "same", "where": ["a.jsonl, line 1", "b.jsonl, line 2"]}]


def test_id_collisions_are_found_range_by_range(tmp_path):
    """The check holds one range of the key space at a time; the answer does not depend on it."""
    from cleaning import ids

    shards = [[f"s{s}-{i}" for i in range(50)] + ["shared", f"pair-{s // 2}"] for s in range(6)]
    files = []
    for s, names in enumerate(shards):
        files.append(str(tmp_path / f"{s}.npy"))
        ids.save_keys(files[-1], [ids.id_key(n) for n in names])
    whole = ids.find_collisions(files + [None], total=312)
    ranged = ids.find_collisions(files + [None], total=312, budget=20)
    assert (whole.ids, whole.documents) == (ranged.ids, ranged.documents) == (4, 5 + 3)
    assert whole.examples == ranged.examples and whole.examples[ids.id_key("shared")] == list(range(6))


# -- damaged files ---------------------------------------------------------------------------------
def _parquet_with_damaged_group(path, texts, group_rows=10, damaged=1):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "domain": ["web"] * len(texts)}), buf, row_group_size=group_rows)
    blob = bytearray(buf.getvalue())
    meta = pq.ParquetFile(io.BytesIO(bytes(blob))).metadata
    chunk = meta.row_group(damaged).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    for k in range(start + 20, start + chunk.total_compressed_size - 20):
        blob[k] = (blob[k] * 7 + 13) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(blob))
    return path


def test_parquet_with_a_corrupt_row_group_keeps_the_other_groups_and_counts_the_loss(tmp_path):
    texts = long_documents(30)
    path = _parquet_with_damaged_group(tmp_path / "raw" / "web.parquet", texts)
    read = list(RecordReader().read(str(path)))
    docs = [r for r in read if isinstance(r, Document)]
    [fault] = [r for r in read if isinstance(r, ReadFault)]
    assert [d.text for d in docs] == texts[:10] + texts[20:]
    assert docs[10].id == "web.parquet:21"  # rows after the damage keep their own numbers
    assert fault.rows == 10 and "row group 1 (rows 11-20)" in str(fault)

    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(path.parent)], str(out), config()))
    assert_accounted(manifest, out)
    [entry] = manifest["inputs"]
    assert entry["status"] == "damaged" and entry["documents"] == 20 and "row group 1" in entry["error"]
    assert entry["unreadable"]["rows"] == 10 and entry["unreadable"]["parts"] == 1
    assert manifest["unreadable"] == {"parts": 1, "rows": 10, "bytes": 0}


def test_parquet_row_whose_text_does_not_decode_is_rejected_alone(tmp_path):
    raw = [b"\xe6\x96\x87\xe6\x9c\xac", b"\xff\xfe bad", b"\xe5\xa5\xbd"]
    values = pa.array(raw, type=pa.binary()).view(pa.string())  # Parquet does not check UTF-8
    pq.write_table(pa.table({"text": values}), tmp_path / "x.parquet")
    out = list(RecordReader().read(str(tmp_path / "x.parquet")))
    assert [type(o) for o in out] == [Document, Rejection, Document]
    assert out[1].reason == "invalid_utf8" and out[1].doc.id == "x.parquet:2" and "row 2" in out[1].detail


def test_compression_is_detected_from_the_bytes_not_the_name(tmp_path):
    """gzip, zstd (`.jsonl.zst`, as large corpora ship), bzip2 and xz are read whatever the name says; a
    zstd file cut short keeps the lines before the cut (the library's own reader ends there quietly); a
    zip archive is refused with one message."""
    docs = long_documents(12)
    raw = tmp_path / "raw"
    raw.mkdir()

    def payload(prefix: str, texts: list[str]) -> bytes:
        return "".join(line({"id": f"{prefix}{i}", "text": t}) for i, t in enumerate(texts)).encode()

    (raw / "gzipped.jsonl").write_bytes(gzip.compress(payload("g", docs[:2])))  # gzip under a plain name
    (raw / "plain.jsonl.gz").write_bytes(payload("p", docs[2:4]))  # plain text under a .gz name
    frames = [zstandard.ZstdCompressor().compress(payload(f"z{k}-", docs[4 + k:5 + k])) for k in range(2)]
    (raw / "shard.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as appending writers leave them
    (raw / "zstd.jsonl").write_bytes(zstandard.ZstdCompressor().compress(payload("u", docs[6:7])))
    (raw / "dump.jsonl.bz2").write_bytes(bz2.compress(payload("b", docs[7:8])))
    (raw / "notes.txt.xz").write_bytes(lzma.compress((docs[8] + "\n").encode()))
    many = payload("c", long_documents(400)[12:])  # blocks of 128 KiB: zstd hands out a block once it has all of it
    whole = zstandard.ZstdCompressor().compress(many)
    (raw / "cut.jsonl.zst").write_bytes(whole[:-200])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("inner.jsonl", payload("x", docs[:1]))
    (raw / "archive.jsonl").write_bytes(archive.getvalue())
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw)], str(out), config()))
    kept, rejected = assert_accounted(manifest, out)
    assert sorted(r["id"] for r in kept if not r["id"].startswith("c")) == [
        "b0", "g0", "g1", "notes.txt.xz:1", "p0", "p1", "u0", "z0-0", "z1-0"]
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert 0 < inputs["cut.jsonl.zst"]["documents"] < many.count(b"\n")  # the lines before the cut
    for name in ("gzipped.jsonl", "plain.jsonl.gz", "shard.jsonl.zst", "zstd.jsonl", "dump.jsonl.bz2", "notes.txt.xz"):
        assert inputs[name]["status"] == "ok", inputs[name]
    assert inputs["cut.jsonl.zst"]["status"] == "truncated"
    assert "truncated or corrupt zstd stream after line" in inputs["cut.jsonl.zst"]["error"]
    assert inputs["archive.jsonl"]["status"] == "unreadable" and "a zip archive" in inputs["archive.jsonl"]["error"]


def _members(records_per_member, members):
    """A multi-member gzip file (as written by appending or by block compressors) and its members'
    byte ranges and ids."""
    docs = long_documents(records_per_member * members, paragraphs=1)
    blobs, ranges, ids, start = [], [], [], 0
    for m in range(members):
        records = [{"id": f"m{m}-{k}", "text": docs[m * records_per_member + k]} for k in range(records_per_member)]
        blob = gzip.compress("".join(line(r) for r in records).encode(), mtime=0)
        blobs.append(blob)
        ranges.append((start, start + len(blob)))
        ids.append([r["id"] for r in records])
        start += len(blob)
    return b"".join(blobs), ranges, ids


def test_corrupt_gzip_member_is_skipped_to_the_next_one_and_counted(tmp_path):
    blob, ranges, ids = _members(4, 5)
    damaged = bytearray(blob)
    lo, hi = ranges[2]
    for k in range(lo + 30, lo + 60):
        damaged[k] ^= 0xA5
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "crawl.jsonl.gz").write_bytes(bytes(damaged))
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw)], str(out), config(exact=False, fuzzy=False)))
    kept, rejected = assert_accounted(manifest, out)
    seen = {r["id"] for r in kept + rejected}
    for m in (0, 1, 3, 4):  # every intact member, after the damage too
        assert set(ids[m]) <= seen, m
    [entry] = manifest["inputs"]
    assert entry["status"] == "damaged" and "corrupt" in entry["error"]
    assert entry["unreadable"]["parts"] == 1 and 0 < entry["unreadable"]["bytes"] <= hi - lo
    assert f"gzip member at byte {lo} is corrupt" in entry["unreadable"]["faults"][0]


def test_gzip_damaged_in_the_middle_keeps_every_line_before_the_damage(tmp_path):
    """One member (the usual gzip file), corrupt in the middle, small enough to be read in one go."""
    docs = long_documents(40, paragraphs=1)
    payload = "".join(line({"id": f"L{i}", "text": t}) for i, t in enumerate(docs)).encode()
    blob = bytearray(gzip.compress(payload, mtime=0))
    middle = len(blob) // 2
    for k in range(middle, middle + 16):
        blob[k] ^= 0xFF
    path = tmp_path / "one.jsonl.gz"
    path.write_bytes(bytes(blob))
    seen = []
    with pytest.raises(ShardReadError, match="corrupt"):
        for item in RecordReader().read(str(path)):
            seen.append(item)
    ids = [d.id for d in seen if isinstance(d, Document)]
    assert len(ids) >= 10 and ids == [f"L{i}" for i in range(len(ids))]  # all of them, in order


def test_truncated_gzip_text_keeps_the_block_it_was_reading(tmp_path):
    docs = long_documents(30, paragraphs=4)  # blocks of several lines
    blob = gzip.compress("\n\n".join(docs).encode())
    path = tmp_path / "book.txt.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    seen = []
    with pytest.raises(ShardReadError, match="truncated"):
        for item in RecordReader().read(str(path)):
            seen.append(item)
    *whole, last = [d.text for d in seen]
    assert whole == docs[:len(whole)]
    # The block in progress at the cut comes out with what was read of it, not dropped.
    assert last and docs[len(whole)].startswith(last) and len(last) < len(docs[len(whole)])


# -- the accounting check --------------------------------------------------------------------------
def _lossy_writer(monkeypatch):
    """A writer of final data shards that loses the second row it is given (a silent I/O bug)."""
    import cleaning.build as build_module
    from cleaning.document import KEPT_SCHEMA
    from cleaning.writers import ParquetShardWriter

    class Lossy(ParquetShardWriter):
        def __init__(self, uri, schema, *args, **kwargs):
            super().__init__(uri, schema, *args, **kwargs)
            self._lossy = schema == KEPT_SCHEMA and "candidates" not in uri
            self._seen = 0

        def write(self, row):
            self._seen += 1
            if not (self._lossy and self._seen == 2):
                super().write(row)

        def write_table(self, table):
            first = self._seen  # rows given before this table
            self._seen += table.num_rows
            if self._lossy and first < 2 <= self._seen:
                table = table.take([i for i in range(table.num_rows) if first + i + 1 != 2])
            super().write_table(table)

    monkeypatch.setattr(build_module, "ParquetShardWriter", Lossy)


def test_failed_accounting_check_publishes_nothing(tmp_path, monkeypatch):
    docs = long_documents(12)
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(docs[:6])])
    out = tmp_path / "corpus"
    first = run_local(CorpusBuild([str(raw)], str(out), config()))
    published = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
                 if p.is_file() and "_work" not in p.parts}
    assert (out / "manifest.json").exists() and (out / "data" / "part-00000.parquet").exists()

    write_jsonl(raw / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(docs[6:])])
    _lossy_writer(monkeypatch)
    with pytest.raises(AccountingError, match="written"):
        run_local(CorpusBuild([str(raw)], str(out), config()))
    # The earlier build is still what OUTPUT holds, byte for byte, and nothing was added to it.
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and "_work" not in p.parts} == published
    assert json.loads((out / "manifest.json").read_text())["version"] == first["version"]

    monkeypatch.undo()  # the writer is fixed: the rerun redoes the lossy shards and publishes
    second = run_local(CorpusBuild([str(raw)], str(out), config()))
    assert second["totals"]["input"] == 12 and assert_accounted(second, out)


def test_failed_check_in_a_refresh_leaves_latest_on_the_previous_version(tmp_path, monkeypatch):
    from cleaning.versions import latest_version, refresh

    docs = long_documents(8)
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(docs[:4])])
    root = tmp_path / "corpora"
    first = refresh([str(raw)], str(root), config())
    write_jsonl(raw / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(docs[4:])])
    _lossy_writer(monkeypatch)
    with pytest.raises(AccountingError):
        refresh([str(raw)], str(root), config())
    assert latest_version(str(root)) == first["version"]
    failed = [p for p in root.iterdir() if p.name not in ("_work", "LATEST", first["version"])]
    assert len(failed) <= 1 and all(not (p / "manifest.json").exists() and not (p / "data").exists()
                                    for p in failed)


# -- fuzz -------------------------------------------------------------------------------------------
PALETTE = [b"\x00", b"\xff", b"\xfe", b"\\ud800", b"\\udfff", b'"', b"\n", b"\n\n", b"\x01", b"\x1b[31m",
           b"{", b"}", b"[", b"\\", b"\xe6\x96", b"null", b"\r", b" "]


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(("flip", "insert", "delete"))
        at = rng.randrange(1, len(out))  # never the first byte: it names the container
        if op == "flip":
            out[at] = rng.randrange(256)
        elif op == "insert":
            out[at:at] = rng.choice(PALETTE)
        else:
            del out[at:at + rng.randint(1, 40)]
    return bytes(out)


def _nonblank_lines(data: bytes) -> set[int]:
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    return {i for i, piece in enumerate(pieces, start=1) if piece.strip()}


def test_fuzz_reader_accounts_for_every_line_of_corrupted_jsonl(tmp_path):
    rng = random.Random(2024)
    docs = long_documents(12, paragraphs=1)
    clean = "".join(line({"id": f"L{i}", "text": t}) for i, t in enumerate(docs)).encode()
    reasons = set()
    for n in range(300):
        data = _corrupt(clean, rng)
        path = tmp_path / f"f{n}.jsonl"
        path.write_bytes(data)
        records = list(RecordReader().read(str(path)))  # never raises on a plain file
        assert sorted(r.doc.meta["line"] if isinstance(r, Rejection) else r.meta["line"] for r in records) \
            == sorted(_nonblank_lines(data)), n
        reasons |= {r.reason for r in records if isinstance(r, Rejection)}
    assert {"corrupt_json", "invalid_utf8", "invalid_unicode"} <= reasons


def test_fuzz_gzip_damage_loses_only_the_damaged_member_whatever_the_read_size():
    """The damage may show only after the decompressor has run past the member's end, in a later
    read than the one that held the next member's header."""
    from cleaning.readers import _GzipLines, _TruncatedStream

    rng = random.Random(77)
    for trial in range(150):
        members, ranges, start = [], [], 0
        for m in range(5):
            text = "".join(f"m{m}-{k} " + "字" * rng.randint(0, 120) + "\n" for k in range(rng.randint(1, 6)))
            members.append((text, gzip.compress(text.encode(), mtime=0)))
            ranges.append((start, start + len(members[-1][1])))
            start = ranges[-1][1]
        blob = bytearray(b"".join(b for _, b in members))
        m = rng.randrange(5)
        lo, hi = ranges[m]
        at = rng.randrange(lo + 10, hi - 1)
        for k in range(at, min(hi, at + rng.randint(1, 30))):
            blob[k] = rng.randrange(256)
        for chunk in (7, 100, 1 << 20):
            reader = _GzipLines(io.BytesIO(bytes(blob)), chunk=chunk)
            text, error = b"", None
            try:
                while piece := reader.readline(1 << 20):
                    text += piece
            except _TruncatedStream as err:
                error = err
            gaps = reader.pop_gaps()
            for other, (lines, _) in enumerate(members):
                if other != m:
                    assert lines.encode() in text, (trial, chunk, m, other)
            assert error is None or m == 4, (trial, chunk)  # fatal only when no member follows
            assert all(end > first for first, end, _ in gaps)


def test_fuzz_corrupted_jsonl_and_gzip_never_stop_a_build_and_lose_nothing_unreported(tmp_path):
    rng = random.Random(1313)
    docs = long_documents(20, paragraphs=1)
    clean = "".join(line({"id": f"L{i}", "text": t, "domain": "web"}) for i, t in enumerate(docs)).encode()
    raw = tmp_path / "raw"
    raw.mkdir()
    plain: dict[str, set[int]] = {}
    for n in range(16):  # plain JSONL: every non-blank line is read and accounted for
        data = _corrupt(clean, rng)
        (raw / f"plain-{n:02d}.jsonl").write_bytes(data)
        plain[f"plain-{n:02d}.jsonl"] = _nonblank_lines(data)
    zipped: dict[str, tuple[list[list[str]], set[int]]] = {}
    for n in range(16):  # multi-member gzip: damaged members are skipped and counted
        blob, ranges, ids = _members(3, 5)
        members = list(range(len(ranges)))
        kind = n % 4
        if kind == 0:  # bytes changed inside one member
            m = rng.choice(members)
            lo, hi = ranges[m]
            data = blob[:lo + 12] + _corrupt(blob[lo + 12:hi], rng) + blob[hi:]
            hit = {m}
        elif kind == 1:  # cut inside a member
            m = rng.choice(members)
            lo, hi = ranges[m]
            data, hit = blob[:rng.randrange(lo + 1, hi - 1)], set(members[m:])
        elif kind == 2:  # garbage between two members
            m = rng.choice(members[1:])
            at = ranges[m][0]
            data, hit = blob[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) + blob[at:], set()
        else:  # a damaged stretch across a member boundary
            m = rng.choice(members[:-1])
            at = ranges[m][1]
            data = bytearray(blob)
            for k in range(at - rng.randint(1, 20), at + rng.randint(1, 20)):
                data[k] = rng.randrange(256)
            data, hit = bytes(data), {m, m + 1}
        (raw / f"zipped-{n:02d}.jsonl.gz").write_bytes(data)
        zipped[f"zipped-{n:02d}.jsonl.gz"] = (ids, hit)

    # The reader alone: only ShardReadError may end a file, after what could be read.
    for path in sorted(raw.iterdir()):
        try:
            for item in RecordReader().read(str(path)):
                assert isinstance(item, (Document, Rejection, ReadFault))
        except ShardReadError:
            pass

    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw)], str(out), config(exact=False, fuzzy=False)))
    kept, rejected = assert_accounted(manifest, out)
    rows_by_input: dict[str, list[dict]] = {}
    for row in kept + rejected:
        rows_by_input.setdefault(json.loads(row["meta"])["input"].rsplit("/", 1)[-1], []).append(row)
    inputs = {i["uri"].rsplit("/", 1)[-1]: i for i in manifest["inputs"]}
    for name, lines in plain.items():
        got = sorted(json.loads(r["meta"])["line"] for r in rows_by_input.get(name, []))
        assert got == sorted(lines), name  # each non-blank line exactly once: kept or rejected
        assert inputs[name]["documents"] == len(lines) and inputs[name]["status"] == "ok"
    for name, (ids, hit) in zipped.items():
        entry = inputs[name]
        seen = {r["id"] for r in rows_by_input.get(name, [])}
        assert entry["documents"] == len(rows_by_input.get(name, []))
        missing = [m for m, member in enumerate(ids) if not set(member) <= seen]
        assert set(missing) <= hit, (name, missing, hit)  # only damaged members lose lines
        if missing or entry["status"] != "ok":  # and a loss is always reported, with what was skipped
            assert entry["status"] in ("damaged", "truncated") and entry["error"], (name, entry)
            assert entry["unreadable"]["bytes"] > 0 or entry["status"] == "truncated", (name, entry)
