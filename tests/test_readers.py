"""Streaming readers: every physical record comes out as a document or a rejection naming file and line."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaning.document import Document, Rejection
from cleaning.readers import FieldMap, RecordReader, ShardReadError
from tests.realtext import abstracts


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_jsonl_fields_and_generated_ids(tmp_path):
    texts = abstracts()[:3]
    path = _jsonl(tmp_path / "news.jsonl", [
        {"text": texts[0], "id": "a1", "domain": "science", "source": "csl", "url": "http://x"},
        {"text": texts[1]},
        {"content": texts[2], "lang": "zh"},
        {"text": None, "id": "n4"},
    ])
    out = list(RecordReader().read(path))
    assert [type(o) for o in out] == [Document, Document, Rejection, Rejection]
    # a null text is not "no 'text' field (it has text)", as it was
    assert out[3].reason == "missing_text" and out[3].detail.endswith("news.jsonl, line 4: 'text' is null")
    assert (out[0].id, out[0].domain, out[0].source, out[0].url) == ("a1", "science", "csl", "http://x")
    # Generated ids: the file's name (the build passes its path under the input root) and line.
    assert out[1].id == "news.jsonl:2" and out[1].domain == "news" and out[1].source == "news"
    assert list(RecordReader().read(path, name="crawl2019/news.jsonl"))[1].id == "crawl2019/news.jsonl:2"
    assert out[2].reason == "missing_text" and "line 3" in out[2].detail and "news.jsonl" in out[2].detail

    mapped = list(RecordReader(fields=FieldMap(text="content")).read(path))
    assert isinstance(mapped[2], Document) and mapped[2].text == texts[2]


def test_an_id_domain_or_source_that_is_no_string_is_stored_as_json_text(tmp_path):
    """A list or an object became Python's repr ("['news', '体育']"), which no consumer reads back."""
    text = abstracts()[0]
    path = _jsonl(tmp_path / "odd.jsonl", [
        {"text": text, "id": {"site": "新闻", "n": 7}, "domain": ["news", "体育"], "source": 12, "url": ["http://x"]},
        {"text": text, "id": 3.5, "domain": True},
    ])
    first, second = RecordReader().read(path)
    assert first.id == '{"site": "新闻", "n": 7}' and json.loads(first.id) == {"site": "新闻", "n": 7}
    assert first.domain == '["news", "体育"]' and first.source == "12" and first.url == '["http://x"]'
    assert (second.id, second.domain, second.source) == ("3.5", "True", "True")


def test_blanks_around_a_domain_or_source_name_make_no_other_domain(tmp_path):
    """" web " and "web" were two domains (two sets of PanGu-Σ experts); a blank name fell to nothing."""
    text = abstracts()[0]
    path = _jsonl(tmp_path / "named.jsonl", [
        {"text": text, "domain": " web ", "source": "新闻\t"}, {"text": text, "domain": "web"},
        {"text": text, "domain": "  ", "source": "论坛"}, {"text": text, "domain": 0},
    ])
    docs = list(RecordReader().read(path))
    # 0, False, [] and {} name nothing, as before: the file's name
    assert [(d.domain, d.source) for d in docs] == [("web", "新闻"), ("web", "web"), ("论坛", "论坛"), ("named", "named")]


def test_corrupt_json_and_invalid_utf8_are_rejected_with_file_and_line(tmp_path):
    good = json.dumps({"text": abstracts()[0]}, ensure_ascii=False).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n{\"text\": \"unterminated\n" + b'{"text": "\xff\xfe oops"}\n' + b"[1, 2]\n\n" + good + b"\n")
    out = list(RecordReader().read(str(path)))
    reasons = [o.reason if isinstance(o, Rejection) else "doc" for o in out]
    assert reasons == ["doc", "corrupt_json", "invalid_utf8", "corrupt_json", "doc"]
    assert "line 2" in out[1].detail and "line 3" in out[2].detail and "byte" in out[2].detail
    assert out[2].doc.text  # the undecodable record is kept (with replacement chars) for inspection


def test_truncated_gzip_keeps_what_was_readable_then_raises(tmp_path):
    text = abstracts()[0]
    payload = "".join(json.dumps({"text": f"{i}{text}"}, ensure_ascii=False) + "\n" for i in range(3000)).encode()
    blob = gzip.compress(payload)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    seen = []
    with pytest.raises(ShardReadError) as info:
        for item in RecordReader().read(str(path)):
            seen.append(item)
    assert "cut.jsonl.gz" in str(info.value) and "truncated" in str(info.value)
    docs = [s for s in seen if isinstance(s, Document)]
    assert 100 < len(docs) < 3000
    assert all(d.text.endswith(text) for d in docs)
    # The cut-off last line is accounted for as a rejection, not dropped.
    assert isinstance(seen[-1], Rejection) and seen[-1].reason == "corrupt_json"
    assert info.value.line == len(seen) + 1


def test_concatenated_gzip_members_are_all_read(tmp_path):
    member = gzip.compress((json.dumps({"text": abstracts()[0]}, ensure_ascii=False) + "\n").encode() * 10)
    path = tmp_path / "multi.jsonl.gz"
    path.write_bytes(member + member)
    assert sum(isinstance(d, Document) for d in RecordReader().read(str(path))) == 20


def test_empty_file_yields_nothing_and_missing_file_raises_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(RecordReader().read(str(tmp_path / "empty.jsonl"))) == []
    with pytest.raises(ShardReadError, match="nowhere.jsonl.*not found"):
        list(RecordReader().read(str(tmp_path / "nowhere.jsonl")))


def test_oversized_record_is_rejected_without_holding_it(tmp_path):
    big = json.dumps({"text": "长" * 300_000}, ensure_ascii=False)
    path = tmp_path / "big.jsonl"
    path.write_text(big + "\n" + json.dumps({"text": abstracts()[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = list(RecordReader(max_record_bytes=100_000).read(str(path)))
    assert out[0].reason == "record_too_large" and "line 1" in out[0].detail
    assert len(out[0].doc.text) <= 4096
    assert isinstance(out[1], Document)


def test_plain_text_blocks_and_lines(tmp_path):
    a, b = abstracts()[:2]
    path = tmp_path / "book.txt"
    path.write_text(f"{a}\n{b}\n\n\n{b}\n", encoding="utf-8")
    blocks = list(RecordReader().read(str(path)))
    assert [d.text for d in blocks] == [f"{a}\n{b}", b] and blocks[1].id == "book.txt:5"
    lines = list(RecordReader(txt_split="line").read(str(path)))
    assert [d.text for d in lines] == [a, b, b]


def test_parquet_streams_in_batches_and_checks_the_text_column(tmp_path):
    texts = list(abstracts()[:2500])
    pq.write_table(pa.table({"text": texts, "domain": ["science"] * len(texts)}), tmp_path / "a.parquet",
                   row_group_size=500)
    out = list(RecordReader().read(str(tmp_path / "a.parquet")))
    assert [d.text for d in out] == texts and out[-1].id == f"a.parquet:{len(texts)}"
    pq.write_table(pa.table({"body": texts[:3]}), tmp_path / "b.parquet")
    with pytest.raises(ShardReadError, match="no 'text' column"):
        list(RecordReader().read(str(tmp_path / "b.parquet")))
    # Text in a BINARY column (no string annotation, as some writers store it) is read as UTF-8.
    raw = [texts[0].encode(), texts[1].encode("gbk"), None]
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()), "domain": pa.array([b"news", b"\xff", b"x"])}),
                   tmp_path / "binary.parquet")
    first, second, third = RecordReader().read(str(tmp_path / "binary.parquet"))
    assert isinstance(first, Document) and (first.text, first.domain) == (texts[0], "news")
    assert second.reason == "invalid_utf8" and "row 2: 'text' (a binary column) is not UTF-8" in second.detail
    assert third.reason == "missing_text"
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ShardReadError, match="c.parquet"):
        list(RecordReader().read(str(tmp_path / "c.parquet")))


def test_memory_filesystem_uri():
    import fsspec

    with fsspec.open("memory://raw/x.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": abstracts()[0]}, ensure_ascii=False) + "\n")
    out = list(RecordReader().read("memory://raw/x.jsonl"))
    assert len(out) == 1 and out[0].text == abstracts()[0]


def test_a_json_file_holding_one_document_is_read_element_by_element(tmp_path):
    """A .json file that is one JSON document (an array of records, pretty-printed as `json.dump(indent=…)`
    and `jq` write it; C3 and CMRC2018 ship so) is read whole: each element is a document or one rejection,
    not one `corrupt_json` per line of the printout. JSON lines under a .json name stay lines."""
    texts = abstracts()[:3]
    records = [{"text": texts[0], "id": "a1"}, {"text": texts[1]}, ["a dialogue", ["not a record"]],
               {"sentence": texts[2]}]
    printed = json.dumps(records, ensure_ascii=False, indent=2)
    (tmp_path / "array.json").write_text(printed, encoding="utf-8")
    with gzip.open(tmp_path / "array.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(printed)
    for name in ("array.json", "array.json.gz"):
        out = list(RecordReader().read(str(tmp_path / name)))
        assert [type(o) for o in out] == [Document, Document, Rejection, Rejection], name
        assert (out[0].id, out[0].text) == ("a1", texts[0]) and (out[1].id, out[1].text) == (f"{name}:2", texts[1])
        assert out[2].reason == "corrupt_json" and f"{name}, element 3: expected a JSON object, got list" in out[2].detail
        assert out[3].reason == "missing_text" and "element 4: no 'text' field (it has sentence)" in out[3].detail
        assert out[1].meta["element"] == 2
    mapped = list(RecordReader(fields=FieldMap(text="sentence")).read(str(tmp_path / "array.json")))
    assert isinstance(mapped[3], Document) and mapped[3].text == texts[2]

    # One pretty-printed object is one record; a SQuAD-style file without a text field is one rejection.
    (tmp_path / "squad.json").write_text(json.dumps({"version": "v1", "data": [{"context": texts[0]}]}, indent=2))
    [whole] = RecordReader().read(str(tmp_path / "squad.json"))
    assert whole.reason == "missing_text" and "no 'text' field (it has version, data)" in whole.detail
    (tmp_path / "one.json").write_text(json.dumps({"text": texts[0]}, ensure_ascii=False, indent=2), encoding="utf-8")
    [one] = RecordReader().read(str(tmp_path / "one.json"))
    assert isinstance(one, Document) and one.text == texts[0] and one.id == "one.json"

    # An array that does not parse gives the elements that do (numbered by line), and one rejection per
    # broken stretch: a broken element, or the end of a file cut short.
    (tmp_path / "broken.json").write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    good, bad = RecordReader().read(str(tmp_path / "broken.json"))
    assert (good.text, good.id, bad.reason, bad.doc.meta["line"]) == ("a", "broken.json:2", "corrupt_json", 3)
    cut = printed[:printed.index(texts[2][:20])]  # a download that stopped inside the fourth element
    (tmp_path / "cut.json").write_text(cut, encoding="utf-8")
    out = list(RecordReader().read(str(tmp_path / "cut.json")))
    assert [o.text if isinstance(o, Document) else o.reason for o in out] == [
        texts[0], texts[1], "corrupt_json", "corrupt_json"]  # the dialogue (an array), the fourth cut short
    # A document in which no record can be told apart stops the file with one message naming where.
    (tmp_path / "whole.json").write_text('{\n "text": "a",\n "id": \n}\n')
    with pytest.raises(ShardReadError, match=r"whole.json, line 4: one JSON document, corrupt at column 1"):
        list(RecordReader().read(str(tmp_path / "whole.json")))

    # JSON lines: under a .json name, and when the first line is an array (values one after another).
    _jsonl(tmp_path / "lines.json", [{"text": t} for t in texts])
    assert [o.id for o in RecordReader().read(str(tmp_path / "lines.json"))] == [f"lines.json:{i}" for i in (1, 2, 3)]
    (tmp_path / "mixed.json").write_text('["a", 1]\n' + json.dumps({"text": texts[0]}, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    first, second = RecordReader().read(str(tmp_path / "mixed.json"))
    assert first.reason == "corrupt_json" and "line 1" in first.detail and second.id == "mixed.json:2"


def test_an_array_on_one_line_that_does_not_parse_loses_only_its_broken_element(tmp_path):
    """`json.dump(records, f)` writes an array on one line. Cut short (a download that stopped) or with one
    broken element, it was one `corrupt_json` rejection holding every element; a newline inside one
    element gave every element before it the same id. Now the elements that parse are records numbered
    as a whole array's are, and each broken stretch is one rejection, read on from the next element."""
    texts = [t[:120] for t in abstracts()[:5]]
    records = [{"text": t, "tags": [{"k": 1}, {"k": 2}]} for t in texts]  # objects nested in each element
    line = json.dumps(records, ensure_ascii=False)
    (tmp_path / "cut.json").write_text(line[:line.index(texts[4][:20])], encoding="utf-8")
    out = list(RecordReader().read(str(tmp_path / "cut.json")))
    assert [o.text if isinstance(o, Document) else o.reason for o in out] == [*texts[:4], "corrupt_json"]
    assert [o.id for o in out[:4]] == [f"cut.json:{k}" for k in (1, 2, 3, 4)] and out[3].meta["element"] == 4
    assert "cut.json, element 5: corrupt JSON: Unterminated string starting at column" in out[4].detail
    assert out[4].detail.endswith("(it runs to the end of the text)")  # not "read on from element 6"

    # A missing colon in the second element (its nested objects are not taken for elements), and a
    # newline inside the fourth: two rejections, the other three elements kept with their own ids.
    broken = line.replace(f'"text": "{texts[1]}"', f'"text" "{texts[1]}"').replace(texts[3][5:7], "\n")
    (tmp_path / "broken.json").write_text(broken, encoding="utf-8")
    out = list(RecordReader().read(str(tmp_path / "broken.json")))
    assert [o.text if isinstance(o, Document) else o.reason for o in out] == [
        texts[0], "corrupt_json", texts[2], "corrupt_json", texts[4]]
    assert [o.id for o in out if isinstance(o, Document)] == ["broken.json:1", "broken.json:3", "broken.json:5"]
    assert "element 2: corrupt JSON: Expecting ':' delimiter" in out[1].detail and "read on from element 3" \
        in out[1].detail


def test_plain_text_in_gbk_big5_or_with_a_byte_order_mark_is_read_as_such(tmp_path):
    """Chinese .txt files are often GB18030/GBK (or Big5): every block of one was an `invalid_utf8`
    rejection. A file's opening decides its encoding, as a web page's bytes do (`cleaning.webpage`); a
    UTF-8 file with a few bad bytes stays UTF-8 and loses only those lines; a UTF-8 byte-order mark is
    not text; UTF-16 is read (it was refused; see tests/test_readers_encodings.py)."""
    blocks = [t[:300] for t in abstracts()[:3]]
    text = "\n\n".join(blocks) + "\n"
    (tmp_path / "gbk.txt").write_bytes(text.encode("gbk"))
    (tmp_path / "gbk.txt.gz").write_bytes(gzip.compress(text.encode("gb18030")))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for name in ("gbk.txt", "gbk.txt.gz", "bom.txt"):
        out = list(RecordReader().read(str(tmp_path / name)))
        assert [o.text for o in out] == blocks, name
    traditional = "今天天氣很好，我們一起去公園散步。這是一段用來測試讀取器的繁體中文文字，它包含了足夠多的漢字。"
    (tmp_path / "big5.txt").write_bytes((traditional + "\n\n" + traditional * 2 + "\n").encode("big5"))
    assert [o.text for o in RecordReader().read(str(tmp_path / "big5.txt"))] == [traditional, traditional * 2]

    # UTF-8 with one damaged line: that line is rejected, nothing is read as GB18030
    damaged = (blocks[0] + "\n\n").encode() + "坏".encode()[:2] + b"\n\n" + (blocks[1] + "\n").encode()
    (tmp_path / "damaged.txt").write_bytes(damaged)
    out = list(RecordReader().read(str(tmp_path / "damaged.txt")))
    assert [type(o) for o in out] == [Document, Rejection, Document]
    assert out[1].reason == "invalid_utf8" and out[2].text == blocks[1]

    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    assert [o.text for o in RecordReader().read(str(tmp_path / "utf16.txt"))] == blocks


def test_pretty_printed_objects_one_after_another_are_records_and_a_broken_first_line_stops_nothing(tmp_path):
    """`jq . FILE` prints objects one after another, each over several lines: every line of them was a
    `corrupt_json` rejection. Now each object is a record numbered by the line it starts on; one that does
    not parse is one rejection, and reading resumes at the next object. A JSON-lines file whose first
    record was cut short after a comma stopped the whole file (it was taken for one broken document)."""
    texts = [t[:200] for t in abstracts()[:4]]
    printed = [json.dumps({"text": t}, ensure_ascii=False, indent=2) for t in texts]
    printed[1] = printed[1].replace('"text":', '"text"')  # a missing colon
    data = ("\n".join(printed) + "\n").encode()
    third = texts[2].encode()
    data = data.replace(third, third[:30] + b"\xff" + third[30:])  # one byte that is not UTF-8
    (tmp_path / "objects.json").write_bytes(data)
    out = list(RecordReader().read(str(tmp_path / "objects.json")))
    lines = [1 + sum(p.count("\n") + 1 for p in printed[:k]) for k in range(4)]
    assert [type(o) for o in out] == [Document, Rejection, Rejection, Document]
    assert [(o.doc if isinstance(o, Rejection) else o).meta["line"] for o in out] == lines
    assert (out[0].text, out[3].text) == (texts[0], texts[3]) and out[3].id == f"objects.json:{lines[3]}"
    assert out[1].reason == "corrupt_json" and f"objects.json, line {lines[1]}: corrupt JSON: Expecting ':'" \
        in out[1].detail and f"read on from line {lines[2]}" in out[1].detail
    assert out[2].reason == "invalid_utf8" and f"line {lines[2]}: invalid UTF-8 at byte" in out[2].detail

    # The first object's opening brace lost: its lines are one rejection, the objects after it records.
    (tmp_path / "headless.json").write_bytes(data.split(b"\n", 1)[1])
    out = list(RecordReader().read(str(tmp_path / "headless.json")))
    assert [type(o) for o in out] == [Rejection, Rejection, Rejection, Document] and out[3].text == texts[3]
    assert out[0].reason == "corrupt_json" and out[0].doc.meta["line"] == 1

    records = [json.dumps({"text": t}, ensure_ascii=False) for t in texts[:3]]
    (tmp_path / "cut.jsonl").write_text(records[0][:25] + ",\n" + "\n".join(records[1:]) + "\n", encoding="utf-8")
    out = list(RecordReader().read(str(tmp_path / "cut.jsonl")))
    assert [type(o) for o in out] == [Rejection, Document, Document] and out[0].reason == "corrupt_json"
    assert [o.text for o in out[1:]] == texts[1:3] and out[2].id == "cut.jsonl:3"


def test_json_lines_in_gbk_or_with_a_byte_order_mark_are_read_as_such(tmp_path):
    """JSON lines decode as their opening reads, as plain text does: a byte-order mark made the first record
    `corrupt_json`, and every record of a GBK file was `invalid_utf8`."""
    texts = [t[:200] for t in abstracts()[:3]]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "gbk.jsonl").write_bytes(lines.encode("gbk"))
    (tmp_path / "gbk.json").write_bytes(json.dumps([{"text": t} for t in texts], ensure_ascii=False,
                                                   indent=1).encode("gb18030"))
    for name in ("bom.jsonl", "gbk.jsonl", "gbk.json"):
        assert [o.text for o in RecordReader().read(str(tmp_path / name))] == texts, name
    (tmp_path / "utf16.jsonl").write_bytes(lines.encode("utf-16"))
    assert [o.text for o in RecordReader().read(str(tmp_path / "utf16.jsonl"))] == texts


def test_a_hugging_face_dataset_saved_to_disk_is_read(tmp_path):
    """`datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write Arrow stream files beside JSON
    metadata: the .arrow files were "a kind no reader takes" and the metadata files were read as two
    `missing_text` rejections per split. Now the rows are documents, named after the dataset's directory,
    and the metadata is not an input."""
    import datasets

    from cleaning.build import CorpusBuild
    from cleaning.config import CorpusConfig
    from cleaning.stages import run_local

    texts = list(abstracts()[:6])
    saved = tmp_path / "raw" / "news_zh"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:4], "label": [0, 1, 0, 1]}),
        "test": datasets.Dataset.from_dict({"text": texts[4:], "label": [1, 0]}),
    }).save_to_disk(str(saved))
    arrow = saved / "train" / "data-00000-of-00001.arrow"
    out = list(RecordReader().read(str(arrow)))
    assert [d.text for d in out] == texts[:4] and out[0].domain == "news_zh" and out[3].id == f"{arrow.name}:4"
    with pytest.raises(ShardReadError, match="no 'content' column"):
        list(RecordReader(fields=FieldMap(text="content")).read(str(arrow)))

    config = CorpusConfig.model_validate({"rules": {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
                                                    "spam_model": None, "quality_model": None},
                                          "dedup": {"partitions": 2}})
    manifest = run_local(CorpusBuild([str(tmp_path / "raw")], str(tmp_path / "corpus"), config))
    assert {i["name"]: i["documents"] for i in manifest["inputs"]} == {
        "news_zh/test/data-00000-of-00001.arrow": 2, "news_zh/train/data-00000-of-00001.arrow": 4}
    assert not manifest["unsupported_files"]["files"] and manifest["totals"]["input"] == 6


def test_csv_and_tsv_tables_are_read_row_by_row(tmp_path):
    """Chinese review and news sets often ship as CSV or TSV: they were "a kind no reader takes"."""
    import csv

    texts = [t[:120] for t in abstracts()[:3]]
    with open(tmp_path / "reviews.csv", "w", encoding="utf-8-sig", newline="") as fh:  # Excel writes a BOM
        writer = csv.writer(fh)
        writer.writerow(["label", "review"])
        writer.writerows([[1, texts[0]], [0, texts[1] + "\n" + texts[2]]])  # a quoted field over two lines
        fh.write("1,a review,with a comma that was not quoted\n")
    out = list(RecordReader(fields=FieldMap(text="review")).read(str(tmp_path / "reviews.csv")))
    assert [type(o) for o in out] == [Document, Document, Rejection]
    assert (out[0].text, out[0].id, out[1].text, out[1].id) == (texts[0], "reviews.csv:2", texts[1] + "\n" + texts[2],
                                                               "reviews.csv:3")
    assert out[2].reason == "corrupt_csv" and "line 5: 3 field(s) where the header has 2" in out[2].detail
    with pytest.raises(ShardReadError, match=r"no 'text' column \(columns: \['label', 'review'\]\); .*"
                                             r"--set reader.text_field=COLUMN"):
        list(RecordReader().read(str(tmp_path / "reviews.csv")))

    lines = "id\ttext\tdomain\n" + "".join(f"n{i}\t{t}\tnews\n" for i, t in enumerate(texts))
    (tmp_path / "news.tsv.gz").write_bytes(gzip.compress(lines.encode("gbk")))
    out = list(RecordReader().read(str(tmp_path / "news.tsv.gz")))
    assert [(o.id, o.text, o.domain) for o in out] == [(f"n{i}", t, "news") for i, t in enumerate(texts)]


def test_a_csv_quote_left_open_loses_only_its_line(tmp_path):
    """CSV's rule reads a quote that is never closed, and every line after it, as one field: the rest of
    the table was one rejection, or one document of many rows when the field count happened to match.
    Now the line that opens such a quote is one `corrupt_csv` rejection and the rows after it are read;
    a quoted field over lines that ends as a well-formed row is still one document."""
    texts = [t[:60].replace(",", "，").replace('"', "“") for t in abstracts()[:6]]
    table = ("label,review\n"
             f'1,"{texts[0]}\n'  # a quote never closed, at the end of the file
             f'0,{texts[1]}\n'
             f'1,"{texts[2]}\n{texts[3]}"\n'  # a quoted field over two lines
             f'0,"{texts[4]}\n'  # a quote that runs into the next quoted field: three fields
             f'1,"{texts[5]}",extra\n')
    (tmp_path / "open.csv").write_text(table, encoding="utf-8")
    out = list(RecordReader(fields=FieldMap(text="review")).read(str(tmp_path / "open.csv")))
    assert [o.text if isinstance(o, Document) else o.reason for o in out] == [
        "corrupt_csv", texts[1], texts[2] + "\n" + texts[3], "corrupt_csv", "corrupt_csv"]
    assert [o.id for o in out if isinstance(o, Document)] == ["open.csv:3", "open.csv:4"]
    assert "open.csv, line 2: a quote opened on this line is not closed where its field ends: it closes in " \
           "lines 2-4 with text after it (',' expected after '\"') (read on from line 3)" in out[0].detail
    assert "line 6: a quote opened on this line is not closed where its field ends: lines 6-7 make a row of 3 " \
           "field(s) where the header has 2 (read on from line 7)" in out[3].detail
    assert "line 7: 3 field(s) where the header has 2" in out[4].detail

    (tmp_path / "end.csv").write_text(f'label,review\n0,{texts[1]}\n1,"{texts[0]}\n0,{texts[2]}\n', encoding="utf-8")
    out = list(RecordReader(fields=FieldMap(text="review")).read(str(tmp_path / "end.csv")))
    assert [o.text if isinstance(o, Document) else o.reason for o in out] == [texts[1], "corrupt_csv", texts[2]]
    assert "line 3: a quote opened on this line is not closed where its field ends: it runs to the end of the " \
           "file (read on from line 4)" in out[1].detail
