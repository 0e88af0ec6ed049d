"""Text files that reached the corpus as something else: UTF-16 without a byte-order mark (read as GB18030),
GBK after an opening of ASCII (every Chinese line `invalid_utf8`), old Mac OS line ends (the file one
document); and files named only by a shard counter, whose source and domain was that counter."""
from __future__ import annotations

import codecs
import gzip
import json

import pytest

from cleaning.document import Document, Rejection
from cleaning.inputs import hash_and_split
from cleaning.readers import JSON_SNIFF_BYTES, RecordReader, shard_name, utf16_codec
from tests.realtext import abstracts


def _read(path, **options):
    return list(RecordReader(**options).read(str(path)))


def _lines_and_texts(out):
    return [(o.meta["line"], o.text) for o in out]


# -- UTF-16 -------------------------------------------------------------------------------------------------
def test_utf16_with_or_without_a_byte_order_mark_reads_as_its_utf8_would(tmp_path):
    """A UTF-16LE .txt without a byte-order mark was read as GB18030: 57 "documents" of mojibake, 47
    `invalid_encoding`, and no word of UTF-16; with a mark it was refused. Both byte orders, with or without
    a mark, plain or gzip, as text, JSON lines, one JSON document or CSV, now read as the UTF-8 file does;
    Chinese text (whose NUL bytes are few: its line ends, 一 is 00 4E in UTF-16LE) and text that is mostly
    ASCII alike."""
    blocks = [t[:300] for t in abstracts()[:3]] + ["Chapter 1. A paragraph in English, then 一个中文句子。"]
    text = "\n\n".join(blocks) + "\n"
    lines = "".join(json.dumps({"text": b}, ensure_ascii=False) + "\n" for b in blocks)
    document = json.dumps([{"text": b} for b in blocks], ensure_ascii=False, indent=2)
    table = "id,text\n" + "".join(f'{i},"{b}"\n' for i, b in enumerate(blocks))
    (tmp_path / "utf8.txt").write_text(text, encoding="utf-8")
    expected = _lines_and_texts(_read(tmp_path / "utf8.txt"))
    assert len(expected) == 4
    for codec in ("utf-16-le", "utf-16-be", "utf-16"):  # "utf-16": with a byte-order mark
        (tmp_path / f"{codec}.txt").write_bytes(text.encode(codec))
        (tmp_path / f"{codec}.txt.gz").write_bytes(gzip.compress(text.encode(codec)))
        for name in (f"{codec}.txt", f"{codec}.txt.gz"):
            assert _lines_and_texts(_read(tmp_path / name)) == expected, name
        (tmp_path / f"{codec}.jsonl").write_bytes(lines.encode(codec))
        (tmp_path / f"{codec}.json").write_bytes(document.encode(codec))
        (tmp_path / f"{codec}.csv").write_bytes(table.encode(codec))
        for name in (f"{codec}.jsonl", f"{codec}.json", f"{codec}.csv"):
            out = _read(tmp_path / name)
            assert all(isinstance(o, Document) for o in out) and [o.text for o in out] == blocks, name
    # Without a mark, found by the NUL bytes. Newspaper text (fullwidth digits and punctuation, paragraphs
    # indented with U+3000) has more 00 in the low byte (一 is U+4E00) than in the high one (its line ends),
    # but reads as text, with its line ends, in one byte order only.
    paragraph = "　　一九九八年一月一日，本报记者一行来到天津，一家一户地把报纸送到家门口。"
    chinese = "\n".join([paragraph] * 200)
    for codec in ("utf-16-le", "utf-16-be"):
        data = chinese.encode(codec)
        high, low = (data[1::2], data[0::2]) if codec == "utf-16-le" else (data[0::2], data[1::2])
        assert low.count(0) > high.count(0) > 0 and utf16_codec(data) == codec
        assert utf16_codec("\n".join(abstracts()[:20]).encode(codec)) == codec


def test_a_stray_nul_keeps_a_file_in_its_encoding_and_a_bad_utf16_unit_loses_its_line_only(tmp_path):
    """NUL bytes alone do not make UTF-16: a UTF-8 or GBK file with one (or with a run of them, padding) reads
    as before, losing only the line that holds it."""
    blocks = [t[:200] for t in abstracts()[:6]]
    for codec in ("utf-8", "gbk"):
        data = ("\n\n".join(blocks) + "\n").encode(codec)
        for nul in (b"\x00", b"\x00" * 64):
            damaged = data.replace(blocks[2][:20].encode(codec), blocks[2][:20].encode(codec) + nul, 1)
            assert utf16_codec(damaged) is None
            (tmp_path / "stray.txt").write_bytes(damaged)
            out = _read(tmp_path / "stray.txt")
            assert [o.text for o in out if isinstance(o, Document)] == blocks[:2] + blocks[3:], (codec, len(nul))
            assert [o.reason for o in out if isinstance(o, Rejection)] == ["control_characters"]
    assert utf16_codec(b"plain ASCII text, one line after another\n" * 100 + b"\x00") is None

    # A lone surrogate in the third block, an odd byte at the end: those lines are rejected, the rest read.
    data = "\n\n".join(blocks).encode("utf-16-le")
    third = blocks[2][:10].encode("utf-16-le")
    (tmp_path / "bad.txt").write_bytes(data.replace(third, third + b"\x00\xd8", 1) + b"\n\x00x")
    out = _read(tmp_path / "bad.txt")
    assert [o.text for o in out if isinstance(o, Document)] == blocks[:2] + blocks[3:]
    assert [(o.reason, o.doc.meta["line"]) for o in out if isinstance(o, Rejection)] == \
        [("invalid_utf8", 5), ("invalid_utf8", 12)]


def test_a_utf16_file_is_never_cut_into_parts(tmp_path):
    """A large JSON-lines file is cut after newline bytes into parts read apart; a 0x0A byte of UTF-16 need
    not end a line (上 is 0A 4E), so a UTF-16 file stays whole."""
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in abstracts()[:40])
    (tmp_path / "utf8.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "utf16.jsonl").write_bytes(lines.encode("utf-16-le"))
    assert len(hash_and_split(str(tmp_path / "utf8.jsonl"), 4096)[2]) > 1
    assert hash_and_split(str(tmp_path / "utf16.jsonl"), 4096)[2] == []


# -- an ASCII opening ---------------------------------------------------------------------------------------
def _english(lines: int) -> str:
    text = "".join(f"This is an English paragraph, number {i}, of a file that opens with English.\n\n"
                   for i in range(lines))
    assert len(text) > JSON_SNIFF_BYTES
    return text


def test_a_gbk_file_that_opens_with_64_kib_of_ascii_is_read_as_gbk(tmp_path):
    """The encoding was decided by the first 64 KiB alone: all ASCII, it read as UTF-8, and every Chinese line
    after it was an `invalid_utf8` rejection. ASCII decides nothing now: the first bytes that are not ASCII
    do, the same rule over as many bytes as an opening."""
    english = _english(1000)
    articles = [t[:300] for t in abstracts()[:5]]
    chinese = "\n\n".join(articles) + "\n"
    for codec in ("gbk", "gb18030", "utf-8"):
        (tmp_path / "late.txt").write_bytes(english.encode() + chinese.encode(codec))
        (tmp_path / "late.txt.gz").write_bytes(gzip.compress(english.encode() + chinese.encode(codec)))
        for name in ("late.txt", "late.txt.gz"):
            out = _read(tmp_path / name)
            assert all(isinstance(o, Document) for o in out), (codec, name)
            assert [o.text for o in out[1000:]] == articles and out[1000].id == f"{name}:2001"

    records = [{"text": f"English record {i} " * 8} for i in range(800)] + [{"text": a} for a in articles]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (tmp_path / "late.jsonl").write_bytes(lines.encode("gbk"))
    document = json.dumps(records, ensure_ascii=False, indent=1)
    (tmp_path / "late.json").write_bytes(document.encode("gbk"))
    for name in ("late.jsonl", "late.json"):
        out = _read(tmp_path / name)
        assert all(isinstance(o, Document) for o in out) and [o.text for o in out[800:]] == articles, name


def test_utf8_after_an_ascii_opening_stays_utf8_and_loses_only_a_damaged_line(tmp_path):
    """What read as UTF-8 still does: a few bad bytes after the ASCII opening are those lines' rejections,
    not a reason to read the file as GB18030."""
    articles = [t[:300] for t in abstracts()[:5]]
    chinese = ("\n\n".join(articles) + "\n").encode()
    damaged = chinese.replace(articles[3][:5].encode(), articles[3][:5].encode()[:-1], 1)
    (tmp_path / "late.txt").write_bytes(_english(1000).encode() + damaged)
    out = _read(tmp_path / "late.txt")
    assert [o.text for o in out[1000:] if isinstance(o, Document)] == articles[:3] + articles[4:]
    assert [(o.reason, o.doc.meta["line"]) for o in out if isinstance(o, Rejection)] == [("invalid_utf8", 2007)]


# -- line ends ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["blank_line", "line"])
def test_cr_only_and_crlf_text_splits_into_documents_as_lf_text_does(tmp_path, split):
    """Mac OS before X ended lines with a lone CR: a .txt of blank-line-separated articles written so was one
    document (the blank lines, `\\r\\r`, were found before CR became LF). CR, CRLF and LF files now give the
    same documents with the same ids; in a file that ends its lines with LF, a stray CR still ends none."""
    articles = [t[:120] + "\n" + t[120:240] for t in abstracts()[:4]]
    text = "\n\n".join(articles) + "\n"
    (tmp_path / "lf.txt").write_text(text, encoding="utf-8")
    expected = [(o.id.replace("lf.txt", "x"), o.text) for o in _read(tmp_path / "lf.txt", txt_split=split)]
    assert len(expected) == (4 if split == "blank_line" else 8)
    for name, end in (("crlf.txt", "\r\n"), ("cr.txt", "\r"), ("cr.txt.gz", "\r")):
        data = text.replace("\n", end).encode()
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        out = _read(tmp_path / name, txt_split=split)
        assert [(o.id.replace(name, "x"), o.text.replace("\r\n", "\n").rstrip("\r")) for o in out] == expected, name

    stray = text.replace(articles[1][:10], articles[1][:10] + "\r", 1)
    (tmp_path / "stray.txt").write_text(stray, encoding="utf-8")
    assert [o.id.replace("stray.txt", "x") for o in _read(tmp_path / "stray.txt", txt_split=split)] == \
        [doc_id for doc_id, _ in expected]


def test_a_cr_only_file_is_read_a_line_at_a_time(tmp_path):
    """Its lines are found as the file is read, not by holding it whole: a line longer than
    `max_record_bytes` is one `record_too_large` rejection and the lines after it are read."""
    articles = [t[:200] for t in abstracts()[:3]]
    data = (articles[0] + "\r\r" + "长" * 400 + "\r\r" + articles[1] + "\r" + articles[2] + "\r").encode()
    (tmp_path / "cr.txt").write_bytes(data)
    out = _read(tmp_path / "cr.txt", max_record_bytes=1000)
    assert [type(o) for o in out] == [Document, Rejection, Document]
    assert out[1].reason == "record_too_large" and out[1].doc.meta["line"] == 3
    assert (out[0].text, out[2].text, out[2].id) == (articles[0], articles[1] + "\n" + articles[2], "cr.txt:5")


# -- default source and domain --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, name", [
    ("/in/srcdir/weibo/part-00000.jsonl", "weibo"),
    ("srcdir/zhihu/part-0.jsonl.gz", "zhihu"),
    ("ds/data/train-00000-of-00001.parquet", "ds"),
    ("ds/data/train-00000-of-00001-5f8d2c3a1b2c3d4e.parquet", "ds"),
    ("ds/train/data-00000-of-00001.arrow", "ds"),
    ("ds/data-00003-of-00010.arrow", "ds"),
    ("s3://bucket/baike/shard_07.jsonl.zst", "baike"),
    ("memory://crawl/00012.txt", "crawl"),
    ("books/chunk-3.csv", "books"),
    ("spark/part-00000-8f1e2a3b-1234-5678-9abc-def012345678-c000.json", "spark"),
    ("hadoop/part-r-00001.jsonl", "hadoop"),
    ("raw/news2016.jsonl", "news2016"),
    ("raw/weibo.jsonl", "weibo"),
    ("raw/data.jsonl", "data"),
    ("part-00000.jsonl", "part-00000"),  # no folder to take a name from
    ("dump/text/AA/wiki_00", "wiki"),
])
def test_a_file_named_only_by_a_shard_counter_takes_its_folders_name(path, name):
    assert shard_name(path) == name


def test_two_sources_kept_in_folders_under_the_same_shard_name_stay_two(tmp_path):
    """`weibo/part-00000.jsonl` and `zhihu/part-00000.jsonl` both had source and domain `part-00000`: one
    domain, where PanGu-Σ gives each its own experts. A record's own source and domain still win."""
    text = abstracts()[0]
    for folder in ("weibo", "zhihu"):
        (tmp_path / folder).mkdir()
        records = [{"text": text}, {"text": text, "source": "own", "domain": "news"}]
        (tmp_path / folder / "part-00000.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        first, second = _read(tmp_path / folder / "part-00000.jsonl")
        assert (first.source, first.domain, second.source, second.domain) == (folder, folder, "own", "news")
        rejection, = RecordReader().read(str(_bad_line(tmp_path / folder / "bad-part-0.jsonl")))
        assert rejection.doc.source == "bad-part-0"  # not a counter: its own name


def _bad_line(path):
    path.write_bytes(b"{not json}\n")
    return path


def test_utf16_codec_names_the_mark():
    assert utf16_codec(codecs.BOM_UTF16_LE + "文".encode("utf-16-le")) == "utf-16"
    assert utf16_codec(codecs.BOM_UTF16_BE + "文".encode("utf-16-be")) == "utf-16"


# -- what a review of the above found ------------------------------------------------------------------------
def test_a_stray_nul_in_english_utf8_does_not_make_it_utf16(tmp_path):
    """English read as UTF-16 is mostly 'text' (lowercase pairs are ideographs): one NUL made a file UTF-16,
    and 200 records became 2 rejections."""
    para = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 25
    data = "".join(json.dumps({"text": f"doc {i} {para}"}) + "\n" for i in range(200)).encode()
    newline = [i for i, byte in enumerate(data) if byte == 10][2]
    for nul in (b"\x00", b"x\x00"):  # just before a line end, at an even or an odd offset
        (tmp_path / "nul.jsonl").write_bytes(data[:newline] + nul + data[newline:])
        assert utf16_codec((tmp_path / "nul.jsonl").read_bytes()[:JSON_SNIFF_BYTES]) is None
        out = _read(tmp_path / "nul.jsonl")
        assert sum(isinstance(o, Document) for o in out) == 199 and len(out) == 200
    assert utf16_codec(b"") is None  # the opening of damaged content: no encoding of its own


def test_a_damaged_line_after_an_ascii_opening_does_not_decide_the_rest(tmp_path):
    """The late decision over a mostly English stretch went by bytes: one cp1252 line outvoted the UTF-8 lines
    after it, and every 'café' became 'cafÃ©'."""
    english = "".join(f"This is an English line number {i} of a plain ASCII opening.\n" for i in range(1500))
    damaged = "He said \x93hello\x94 and \x93bye\x94.\n".encode("latin-1")
    rest = "".join(f"Line {i}: we met at the café.\n" if i % 500 == 0 else f"Plain line {i}.\n" for i in range(6000))
    (tmp_path / "late.txt").write_bytes(english.encode() + damaged + rest.encode())
    out = _read(tmp_path / "late.txt", txt_split="line")
    rejected = [o for o in out if isinstance(o, Rejection)]
    assert [o.doc.meta["line"] for o in rejected] == [1501] and rejected[0].reason == "invalid_utf8"
    assert [o.text for o in out if isinstance(o, Document) and "caf" in o.text][:1] == ["Line 0: we met at the café."]


def test_a_file_that_opens_with_ascii_is_not_split_into_parts(tmp_path):
    """Each part decided its own encoding from its own first other bytes: the parts read otherwise than the
    whole file."""
    english = "".join(json.dumps({"text": f"English record {i} " * 8}) + "\n" for i in range(1500))
    chinese = "".join(json.dumps({"text": a}, ensure_ascii=False) + "\n" for a in abstracts()[:50])
    (tmp_path / "late.jsonl").write_bytes(english.encode() + chinese.encode())
    (tmp_path / "chinese.jsonl").write_bytes((chinese * 40).encode())
    assert hash_and_split(str(tmp_path / "late.jsonl"), 4096)[2] == []
    assert len(hash_and_split(str(tmp_path / "chinese.jsonl"), 4096)[2]) > 1


def test_held_lines_are_not_lost_when_the_filesystem_fails(tmp_path, monkeypatch):
    """Only damage (ShardReadError) let the lines held for the late decision out; an OSError lost them."""
    import contextlib

    from cleaning import readers

    english = "".join(f"English line {i} of an opening that is all ASCII.\n" for i in range(1500))
    chinese = "".join(f"第{i}行：北京欢迎你。\n" for i in range(2000))
    data = english.encode() + chinese.encode()
    (tmp_path / "late.txt").write_bytes(data)

    class Failing:
        def __init__(self, raw):
            self.raw, self.read_bytes = raw, 0

        def readline(self, *args):
            line = self.raw.readline(*args)
            self.read_bytes += len(line)
            if self.read_bytes > len(english) + 20_000:
                raise OSError(5, "Input/output error")
            return line

        def __getattr__(self, name):
            return getattr(self.raw, name)

    original = readers.RecordReader._content

    @contextlib.contextmanager
    def failing_content(self, path, kind, utf16=None):
        with original(self, path, kind, utf16) as (raw, content):
            yield raw, Failing(content)

    monkeypatch.setattr(readers.RecordReader, "_content", failing_content)
    out: list = []
    with pytest.raises(Exception):
        for item in readers.RecordReader(txt_split="line").read(str(tmp_path / "late.txt")):
            out.append(item)
    assert sum(isinstance(o, Document) and "北京" in o.text for o in out) > 100


def test_years_name_their_own_source_and_in_line_crs_end_no_line(tmp_path):
    """`2021.jsonl` and `2022.jsonl` took their folder's name as one source; an LF file with CRs inside its
    lines was split at them (its ids changed)."""
    assert [shard_name(f"/in/{name}") for name in ("2021.jsonl", "news-2020.jsonl", "00012.jsonl", "part1.jsonl")] \
        == ["2021", "news-2020", "in", "in"]
    paragraphs = ["第%d篇：第一段内容很长。\r第二段内容。\r第三段内容。" % i for i in range(1, 4)]
    (tmp_path / "stray.txt").write_bytes(("\n".join(paragraphs) + "\n").encode())
    out = _read(tmp_path / "stray.txt", txt_split="line")
    assert [o.id for o in out] == ["stray.txt:1", "stray.txt:2", "stray.txt:3"]


def test_json_lines_whose_opening_is_cut_after_a_record_s_brace_stay_json_lines(tmp_path):
    """An opening cut just after `\\n{` ended in a lone `{`: the file was taken for one JSON document."""
    from cleaning.readers import is_json_document

    record = json.dumps({"text": "记录：北京欢迎你。"}, ensure_ascii=False).encode() + b"\n"
    data = record * (JSON_SNIFF_BYTES // len(record) + 2)
    for pad in range(len(record)):
        head = json.dumps({"text": "p" * pad}).encode() + b"\n" + data
        if head[:JSON_SNIFF_BYTES].endswith(b"\n{"):
            assert not is_json_document(head[:JSON_SNIFF_BYTES])
            (tmp_path / "cut.jsonl").write_bytes(head)
            assert hash_and_split(str(tmp_path / "cut.jsonl"), 4096)[2] != []
            break
    else:
        raise AssertionError("no padding cut the opening after a brace")
