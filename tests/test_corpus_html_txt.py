"""Web pages and plain text as corpus input: main-content extraction, encodings, bounded text pieces.

Every page and text here was written for these tests.
"""
from __future__ import annotations

import bz2
import gzip
import json
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.config import CorpusConfig
from cleaning.document import Document, Rejection
from cleaning.normalize import StripMarkup
from cleaning.readers import RecordReader, ShardReadError
from cleaning.webpage import decode_html, extract_main_content, looks_like_html_document

# Rules only: the model-based filters need fetched assets and have tests of their own.
RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}

LIBRARY_TITLE = "山区小学的第一间图书室"
LIBRARY = [
    "清晨六点，村口的雾气还没有散开，十岁的小芳已经背着书包走在去学校的山路上。她说，自从学校有了图书室，"
    "每天最盼望的就是午饭后的那半个小时，可以坐在窗边安安静静地读一本书。",
    "这间图书室是去年秋天建成的。在此之前，全校一百多名学生能够借阅的课外书加起来不到两百本，而且大多是"
    "十几年前的旧书，书页发黄，有的已经缺了封面。校长王老师回忆说，那时候孩子们常常把同一本故事书传来传去。",
    "转机出现在一次家访之后。王老师把学校的情况写成一封信，寄给了在城里工作的几位老同学。没想到，信寄出去"
    "不到一个月，就陆续收到了来自全国各地的包裹，里面有童话、科普读物、历史故事，还有崭新的字典和地图册。",
    "如今，图书室里的藏书已经超过三千册。老师们利用周末把书分门别类地贴好标签，又请高年级的学生轮流担任"
    "小小图书管理员。每到借书的日子，狭小的房间里总是挤满了孩子，大家小声地讨论着刚刚读完的故事。",
    "“读书让孩子们看到了山外面的世界。”王老师说，接下来学校还打算开设阅读课，邀请村里的老人来给孩子们"
    "讲本地的历史和传说，让书本上的知识和脚下的土地联系起来。",
]
# 堃 is in GBK but not in GB2312: a page labelled gb2312 must still decode it.
GARDEN_TITLE = "老城区里的共享菜园"
GARDEN = [
    "在老城区一片拆迁后空出来的空地上，居民们用旧木板围出了二十多块小小的菜畦。每到傍晚，下班回家的人们"
    "会提着水桶来这里浇水，顺便和邻居聊上几句家常。",
    "菜园的发起人陈堃是一名退休的中学生物老师。她说，最初只是想给小区里的孩子们找一个认识植物的地方，"
    "没想到报名的居民越来越多，连住在隔壁街道的老人也专门跑来打听。",
    "为了让菜园长久地维持下去，大家一起商量出了几条简单的规矩：每户认领一块地，不使用化学农药，收获的"
    "蔬菜拿出一部分放在门口的木架上，谁需要谁就可以带走。",
    "春天种下的番茄和黄瓜已经开始结果，角落里的向日葵也长得比人还高。几个孩子在老师的带领下，用放大镜"
    "观察叶片上的小虫，认真地在本子上画下它们的样子。",
    "街道办事处的工作人员表示，下一步准备在菜园旁边修建一个雨水收集池，用收集的雨水浇灌蔬菜，同时在"
    "周末开设堆肥课程，教居民把厨余垃圾变成肥料。",
]
MARKET_TITLE = "河边夜市重新开张"
MARKET = [
    "整修了半年的河边夜市在上周末重新开张。新铺的石板路两旁摆满了小吃摊，烤红薯、糖葫芦和刚出锅的葱油饼"
    "散发着诱人的香味，吸引了不少附近的居民前来逛街。",
    "与过去相比，夜市的摊位数量减少了三分之一，但每个摊位都配上了统一的遮雨棚和垃圾桶。管理人员说，这样"
    "做是为了让通道更宽敞，也让摊主们更方便保持卫生。",
    "在夜市经营了十几年的张大姐说，最让她高兴的是有了固定的摊位号，老顾客再也不用在人群中到处找她的豆花"
    "摊。她打算趁着重新开张，推出几种新口味，让年轻人也来尝一尝。",
    "夜市每天傍晚六点开始营业，一直持续到晚上十一点。为了方便游客，附近的公交线路也相应延长了末班车的时间。",
]

# Text of the page around the article that must not reach the corpus.
BOILERPLATE = ["体育", "财经", "当前位置", "分享到", "相关阅读", "乡村教师的一天", "热门推荐", "今日天气早知道",
               "网站地图", "免责声明", "版权所有", "ICP备", "统计脚本"]


def page(title: str, paragraphs: list[str], charset: str | None = "utf-8") -> str:
    """A news page: menu, login links, breadcrumbs, the article, share bar, related links, sidebar, footer."""
    meta = f'<meta http-equiv="Content-Type" content="text/html; charset={charset}">' if charset else ""
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return f"""<!DOCTYPE html>
<html lang="zh-CN">
<head>
{meta}
<title>{title}_地方新闻_晨光网</title>
<style>.nav {{ color: #c00; }}</style>
<script>var tracker = "统计脚本不应出现在正文";</script>
</head>
<body>
<div class="header">
  <ul class="nav">
    <li><a href="/">首页</a></li><li><a href="/news">新闻</a></li><li><a href="/sports">体育</a></li>
    <li><a href="/finance">财经</a></li><li><a href="/tech">科技</a></li><li><a href="/edu">教育</a></li>
  </ul>
  <div class="login"><a href="/login">登录</a> | <a href="/reg">注册</a></div>
</div>
<div class="breadcrumb">当前位置：<a href="/">晨光网</a> &gt; <a href="/news">地方新闻</a> &gt; 正文</div>
<div class="main">
<div class="article">
<h1>{title}</h1>
<div class="info">2023-04-12 09:30 来源：晨光网</div>
{body}
</div>
<div class="share">分享到：微信 微博 QQ空间</div>
<div class="related"><h3>相关阅读</h3>
<ul><li><a href="/a/1">乡村教师的一天</a></li><li><a href="/a/2">县城新建三所幼儿园</a></li></ul></div>
</div>
<div class="sidebar"><h3>热门推荐</h3><ul><li><a href="/h/1">今日天气早知道</a></li>
<li><a href="/h/2">春季养生小常识</a></li></ul></div>
<div class="footer">
<p><a href="/about">关于我们</a> | <a href="/contact">联系我们</a> | <a href="/map">网站地图</a> | <a href="/law">免责声明</a></p>
<p>版权所有 2023 晨光网 京ICP备12345678号</p>
</div>
</body>
</html>
"""


# A page cut off inside a script, and a page with nothing in its body.
BROKEN_PAGE = '<html><head><title>页面出错</title><script>var data = "<div><p>未闭合的'
EMPTY_PAGE = "<html><head><title>空白页</title></head><body></body></html>"


def read(path, **options) -> list:
    return list(RecordReader(**options).read(str(path)))


def assert_article(text: str, title: str, paragraphs: list[str]) -> None:
    lines = text.split("\n")
    assert title in lines
    for paragraph in paragraphs:
        assert paragraph in lines  # each paragraph kept whole, on a line of its own
    for junk in BOILERPLATE:
        assert junk not in text, junk


# -- web pages -----------------------------------------------------------------------------------
def test_html_page_keeps_the_article_and_drops_menus_and_footer(tmp_path):
    path = tmp_path / "site" / "library.html"
    path.parent.mkdir()
    path.write_text(page(LIBRARY_TITLE, LIBRARY), encoding="utf-8")
    out = list(RecordReader().read(str(path), name="site/library.html"))
    assert len(out) == 1 and isinstance(out[0], Document)
    doc = out[0]
    assert_article(doc.text, LIBRARY_TITLE, LIBRARY)
    # One document per file: its id is the file's name under the input root; pages are web text
    # (boilerplate-line removal applies) and the pages of one directory share a source.
    assert (doc.id, doc.domain, doc.source) == ("site/library.html", "web", "site")
    assert doc.meta["encoding"] == "utf-8" and doc.meta["html_chars"] > len(doc.text)


def test_pages_are_extracted_one_at_a_time_when_threads_share_a_process(monkeypatch):
    """trafilatura's libxml2 aborts the process now and then when two threads extract at once, and
    the corpus build runs clean calls in threads of one process (`--workers 1`, Dask's threads)."""
    import trafilatura

    extract, guard = trafilatura.extract, threading.Lock()
    inside = most = 0

    def counted(*args, **kwargs):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)  # long enough for the other threads to arrive
        try:
            return extract(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(trafilatura, "extract", counted)
    markup = page(LIBRARY_TITLE, LIBRARY)
    with ThreadPoolExecutor(4) as threads:
        texts = list(threads.map(lambda _: extract_main_content(markup), range(12)))
    assert most == 1
    assert len(set(texts)) == 1
    assert_article(texts[0], LIBRARY_TITLE, LIBRARY)


def test_gbk_and_other_encodings_are_decoded(tmp_path):
    markup = page(GARDEN_TITLE, GARDEN, charset="gb2312")
    (tmp_path / "garden.htm").write_bytes(markup.encode("gbk"))
    (tmp_path / "garden.html.gz").write_bytes(gzip.compress(markup.encode("gbk")))
    for name in ("garden.htm", "garden.html.gz"):
        [doc] = read(tmp_path / name)
        assert isinstance(doc, Document) and doc.meta["encoding"] == "gb18030", name
        assert_article(doc.text, GARDEN_TITLE, GARDEN)
        assert "陈堃" in doc.text  # a GBK character outside GB2312, under a gb2312 label

    # No declaration at all, and a declaration that lies: the bytes decide.
    undeclared = page(GARDEN_TITLE, GARDEN, charset=None).encode("gbk")
    assert decode_html(undeclared) == (page(GARDEN_TITLE, GARDEN, charset=None), "gb18030")
    mislabelled = page(GARDEN_TITLE, GARDEN, charset="utf-8").encode("gbk")
    assert decode_html(mislabelled)[0] == page(GARDEN_TITLE, GARDEN, charset="utf-8")
    traditional = "<html><head><meta charset='big5'></head><body><p>社區菜園裡的番茄已經成熟了，孩子們興奮地摘下第一顆果實。</p></body></html>"
    assert decode_html(traditional.encode("big5")) == (traditional, "big5hkscs")
    bom = "\ufeff" + page(LIBRARY_TITLE, LIBRARY, charset="gbk")  # a byte-order mark beats the label
    assert decode_html(bom.encode("utf-8")) == (bom[1:], "utf-8-sig")


def test_broken_empty_and_unparseable_pages_are_rejections_with_reasons(tmp_path, monkeypatch):
    (tmp_path / "broken.html").write_text(BROKEN_PAGE, encoding="utf-8")
    (tmp_path / "empty.html").write_text(EMPTY_PAGE, encoding="utf-8")
    (tmp_path / "zero.html").write_bytes(b"")
    (tmp_path / "image.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (tmp_path / "huge.html").write_text(page(LIBRARY_TITLE, LIBRARY * 20), encoding="utf-8")
    expected = {"broken.html": "html_no_content", "empty.html": "html_no_content", "zero.html": "html_no_content",
                "image.html": "control_characters"}
    for name, reason in expected.items():
        [rejection] = read(tmp_path / name)
        assert isinstance(rejection, Rejection) and rejection.reason == reason, name
        assert rejection.detail.startswith(str(tmp_path / name)) and rejection.doc.id == name
    [too_large] = read(tmp_path / "huge.html", max_record_bytes=4096)
    assert too_large.reason == "record_too_large" and len(too_large.doc.text) <= 1 << 20

    # Whatever the parser raises on one page is that page's rejection, never the shard's end.
    import trafilatura

    def choking(markup, **options):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(trafilatura, "extract", choking)
    (tmp_path / "library.html").write_text(page(LIBRARY_TITLE, LIBRARY), encoding="utf-8")
    [failed] = read(tmp_path / "library.html")
    assert failed.reason == "html_no_content" and "parser failed: RecursionError" in failed.detail
    assert failed.doc.text.startswith("<!DOCTYPE html>")  # the rejected row keeps what the input held


def test_truncated_gzip_page_is_rejected_then_reported(tmp_path):
    blob = gzip.compress(page(LIBRARY_TITLE, LIBRARY * 30).encode("utf-8"))
    path = tmp_path / "cut.html.gz"
    path.write_bytes(blob[: len(blob) // 2])
    seen = []
    with pytest.raises(ShardReadError, match="truncated"):
        for item in RecordReader().read(str(path)):
            seen.append(item)
    assert [(r.reason, r.doc.id) for r in seen] == [("html_incomplete", "cut.html.gz")]
    assert seen[0].doc.text.startswith("<!DOCTYPE html>")


def test_html_in_jsonl_and_parquet_records(tmp_path):
    fragment = f"<div>首页 | 新闻 | 体育 | 财经</div><p>{MARKET[0]}</p>"
    records = [
        {"id": "market", "text": page(MARKET_TITLE, MARKET)},
        {"id": "fragment", "text": fragment},
        {"id": "broken", "text": BROKEN_PAGE},
        {"id": "plain", "text": MARKET[1]},
        {"id": "garden", "text": "  \n<!-- 抓取于 2023-05-01 -->\n" + page(GARDEN_TITLE, GARDEN)},
        {"id": "about-html", "text": "在 HTML 里，<body> 标签包住页面上能看到的全部内容。"},
    ]
    path = tmp_path / "crawl.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    auto = {d.id if isinstance(d, Document) else d.doc.id: d for d in read(path)}
    assert list(auto) == [r["id"] for r in records]  # the broken record did not stop the file
    assert_article(auto["market"].text, MARKET_TITLE, MARKET)
    assert auto["market"].meta["line"] == 1 and auto["market"].meta["html_chars"] > len(auto["market"].text)
    assert_article(auto["garden"].text, GARDEN_TITLE, GARDEN)
    assert auto["broken"].reason == "html_no_content" and "line 3" in auto["broken"].detail
    # Only whole documents are pages: a fragment is left to the markup rule, text about tags alone.
    assert auto["fragment"].text == fragment and "html_chars" not in auto["fragment"].meta
    assert auto["plain"].text == MARKET[1] and auto["about-html"].text == records[5]["text"]

    never = read(path, html="never")
    assert all(isinstance(d, Document) for d in never) and never[0].text == records[0]["text"]
    always = {d.id if isinstance(d, Document) else d.doc.id: d for d in read(path, html="always")}
    assert MARKET[0] in always["fragment"].text and "<" not in always["fragment"].text  # a fragment too

    pq.write_table(pa.table({"text": [records[0]["text"], MARKET[2]]}), tmp_path / "crawl.parquet")
    rows = read(tmp_path / "crawl.parquet")
    assert_article(rows[0].text, MARKET_TITLE, MARKET)
    assert rows[0].id == "crawl.parquet:1" and rows[1].text == MARKET[2]


def test_html_document_test_reads_only_the_start():
    assert looks_like_html_document("<!doctype html><html><body>x</body></html>")
    assert looks_like_html_document("\ufeff\n  <?xml version='1.0'?>\n<!-- 注释 -->\n<HTML lang=zh>")
    assert looks_like_html_document("<head><meta charset=gbk></head>")
    assert not looks_like_html_document("<div>首页</div><p>正文</p>")
    assert not looks_like_html_document("正文。" + "<html>")
    assert not looks_like_html_document("<htmlx>")
    # Only the start counts: a doctype further into a long text does not make it a page.
    assert not looks_like_html_document("长" * 5_000_000 + "<!DOCTYPE html>")


def test_markup_rule_drops_the_doctype_of_a_page_left_as_html():
    text = StripMarkup().transform(page(MARKET_TITLE, MARKET))
    assert "DOCTYPE" not in text and "<" not in text and MARKET[0] in text


# -- plain text --------------------------------------------------------------------------------
def sentences(n: int, start: int = 0) -> str:
    return "".join(f"第{i}句写的是河边夜市里第{i}个摊位的故事。" for i in range(start, start + n))


def test_txt_one_document_per_line_cuts_long_lines(tmp_path):
    long_line = sentences(40)  # about 880 characters
    path = tmp_path / "lines.txt"
    path.write_text(f"{MARKET[0]}\n\n{MARKET[1]}\n{long_line}\n{MARKET[2]}\n", encoding="utf-8")
    out = read(path, txt_split="line", txt_max_chars=300)
    assert [d.id for d in out[:2]] == ["lines.txt:1", "lines.txt:3"] and out[-1].id == "lines.txt:5"
    assert [d.text for d in out[:2]] == MARKET[:2] and out[-1].text == MARKET[2]
    pieces = out[2:-1]
    assert [d.id for d in pieces] == [f"lines.txt:4#{k}" for k in range(1, len(pieces) + 1)] and len(pieces) >= 3
    assert "".join(d.text for d in pieces) == long_line
    assert all(len(d.text) <= 300 and d.text.endswith("。") for d in pieces)
    assert [(d.meta["line"], d.meta["piece"]) for d in pieces] == [(4, k) for k in range(1, len(pieces) + 1)]


def test_txt_blank_line_blocks_up_to_the_bound_stay_whole(tmp_path):
    exact = sentences(10)
    path = tmp_path / "book.txt"
    path.write_text(f"{MARKET[0]}\n{MARKET[1]}\n\n\n{exact}\n\n{exact}。\n", encoding="utf-8")
    out = read(path, txt_max_chars=len(exact))
    assert [d.id for d in out] == ["book.txt:1", "book.txt:5", "book.txt:7#1", "book.txt:7#2"]
    assert out[0].text == f"{MARKET[0]}\n{MARKET[1]}" and out[1].text == exact and "piece" not in out[1].meta
    assert [d.text for d in out[2:]] == [exact, "。"]  # one character over the bound: cut at the last sentence end


def test_overlong_block_becomes_bounded_documents_with_unique_ids(tmp_path):
    lines = [sentences(12, start=12 * i) for i in range(30)]  # 30 lines of ~270 characters, one block
    lines[7] = "　　“这一段是引语，结尾的引号跟着句号走。”" + lines[7]
    lines[20] = "甲" * 2500  # a line with no sentence end at all
    path = tmp_path / "novel.txt"
    path.write_text("\n".join([MARKET[0], ""] + lines + ["", MARKET[3]]) + "\n", encoding="utf-8")
    limit = 1000
    out = read(path, txt_max_chars=limit)
    assert all(isinstance(d, Document) for d in out)
    ids = [d.id for d in out]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "novel.txt:1" and ids[-1] == f"novel.txt:{len(lines) + 4}"
    pieces = out[1:-1]
    assert ids[1:-1] == [f"novel.txt:3#{k}" for k in range(1, len(pieces) + 1)]
    assert all(len(d.text) <= limit for d in pieces)
    # Nothing lost or repeated: the pieces are the block, cut at sentence ends or line ends ...
    assert "".join(d.text.replace("\n", "") for d in pieces) == "".join(lines)
    cut_hard = [d for d in pieces if not d.text.endswith(("。", "”"))]
    assert all(set(d.text[-limit // 2:]) == {"甲"} for d in cut_hard) and len(cut_hard) >= 2  # ... or in the run of 甲
    # ... and a closing quote stays with its sentence.
    assert not any(d.text.startswith("”") for d in pieces)
    # Each piece says which line of the file it starts on.
    file_lines = path.read_text(encoding="utf-8").split("\n")
    assert all(d.text.split("\n")[0][:20] in file_lines[d.meta["line"] - 1] for d in pieces)


# -- the corpus build end to end -------------------------------------------------------------------
def test_corpus_build_accounts_for_every_page_record_and_piece(tmp_path):
    raw = tmp_path / "raw"
    (raw / "site").mkdir(parents=True)
    (raw / "site" / "library.html").write_text(page(LIBRARY_TITLE, LIBRARY), encoding="utf-8")
    (raw / "site" / "garden.htm").write_bytes(page(GARDEN_TITLE, GARDEN, charset="gbk").encode("gbk"))
    (raw / "site" / "broken.html").write_text(BROKEN_PAGE, encoding="utf-8")
    (raw / "site" / "empty.html").write_text(EMPTY_PAGE, encoding="utf-8")
    records = [{"text": page(MARKET_TITLE, MARKET), "domain": "web", "source": "crawl"},
               {"text": BROKEN_PAGE, "domain": "web", "source": "crawl"},
               {"text": "太短的一句话。", "domain": "web", "source": "crawl"}]
    (raw / "crawl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                     encoding="utf-8")
    (raw / "novel.txt").write_text("\n".join(sentences(12, start=12 * i) for i in range(10)) + "\n", encoding="utf-8")
    config = CorpusConfig.model_validate({"rules": RULES_ONLY, "reader": {"txt_max_chars": 1000},
                                          "dedup": {"partitions": 2}})
    out = tmp_path / "corpus"
    manifest = run_local(CorpusBuild([str(raw)], str(out), config))

    kept = [row for f in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    rejected = [row for f in sorted((out / "rejected").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    documents = {i["name"]: i["documents"] for i in manifest["inputs"]}
    assert documents == {"crawl.jsonl": 3, "novel.txt": 3, "site/broken.html": 1, "site/empty.html": 1,
                         "site/garden.htm": 1, "site/library.html": 1}
    assert {i["status"] for i in manifest["inputs"]} == {"ok"}
    totals = manifest["totals"]
    assert totals["input"] == sum(documents.values()) == len(kept) + len(rejected)
    assert (totals["kept"], totals["rejected"]) == (len(kept), len(rejected))
    ids = [row["id"] for row in kept + rejected]
    assert len(set(ids)) == len(ids)

    by_id = {row["id"]: row for row in kept}
    assert_article(by_id["site/library.html"]["text"], LIBRARY_TITLE, LIBRARY)
    assert "陈堃" in by_id["site/garden.htm"]["text"] and GARDEN[4] in by_id["site/garden.htm"]["text"]
    assert json.loads(by_id["site/garden.htm"]["meta"])["encoding"] == "gb18030"
    assert_article(by_id["crawl.jsonl:1"]["text"], MARKET_TITLE, MARKET)
    assert {f"novel.txt:1#{k}" for k in (1, 2, 3)} <= set(by_id)
    reasons = {row["id"]: row["reason"] for row in rejected}
    assert reasons == {"site/broken.html": "html_no_content", "site/empty.html": "html_no_content",
                       "crawl.jsonl:2": "html_no_content", "crawl.jsonl:3": reasons["crawl.jsonl:3"]}
    assert reasons["crawl.jsonl:3"] in ("min_length", "title_only")
    assert manifest["rejected_by_rule"]["html_no_content"] == 3
    assert manifest["sources"]["site"] == {"input": 4, "kept": 2, "rejected": {"html_no_content": 2}}


def _wiki_article(doc_id: str, title: str, body: str) -> str:
    return f'<doc id="{doc_id}" url="https://zh.wikipedia.org/wiki?curid={doc_id}" title="{title}">\n{title}\n\n{body}\n</doc>\n'


def test_wikiextractor_output_is_read_article_by_article(tmp_path):
    """Chinese Wikipedia reaches a corpus through WikiExtractor: `text/AA/wiki_00`, files without a suffix
    (or `wiki_00.bz2` with --compress), holding `<doc id url title>` … `</doc>` articles or, with --json, JSON
    lines. They were left out as "a kind no reader takes"; each of their files was also a domain of its own."""
    from tests.realtext import long_documents

    bodies = [text.replace("\n", "\n\n") for text in long_documents(5)]
    raw = tmp_path / "zhwiki" / "text"
    (raw / "AA").mkdir(parents=True)
    (raw / "AB").mkdir()
    (raw / "AA" / "wiki_00").write_text(_wiki_article("13", "数学", bodies[0]) + _wiki_article("18", "哲学", bodies[1]),
                                        encoding="utf-8")
    (raw / "AA" / "wiki_01").write_text("stray line\n" + _wiki_article("25", "物理学", bodies[2])
                                        + '<doc id="30" url="u" title="化学">\n化学\n\n' + bodies[3] + "\n",
                                        encoding="utf-8")  # text outside an article; an article cut short
    (raw / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(
        json.dumps({"id": "41", "revid": "7", "url": "u41", "title": "生物学", "text": f"生物学\n\n{bodies[4]}"},
                   ensure_ascii=False).encode() + b"\n"))

    out = list(RecordReader().read(str(raw / "AA" / "wiki_00")))
    second = 5 + bodies[0].count("\n")  # the tag, the title, a blank line, the body, </doc>
    assert [(d.id, d.url, d.meta["title"], d.meta["line"]) for d in out] == [
        ("13", "https://zh.wikipedia.org/wiki?curid=13", "数学", 1),
        ("18", "https://zh.wikipedia.org/wiki?curid=18", "哲学", second + 1)]
    assert out[0].text == f"数学\n\n{bodies[0]}" and (out[0].domain, out[0].source) == ("wiki", "wiki")
    stray, physics, chemistry = RecordReader().read(str(raw / "AA" / "wiki_01"))
    assert stray.reason == "corrupt_wiki" and stray.doc.id == "wiki_01:1" and "outside" in stray.detail
    assert (physics.id, chemistry.id, chemistry.text) == ("25", "30", f"化学\n\n{bodies[3]}")

    # A compressed file cut short keeps the article it was reading when the stream ended.
    whole = gzip.compress((_wiki_article("50", "天文学", bodies[0]) * 3).encode())
    (tmp_path / "wiki_09.gz").write_bytes(whole[:-100])
    read = []
    with pytest.raises(ShardReadError, match="truncated or corrupt gzip stream"):
        for item in RecordReader().read(str(tmp_path / "wiki_09.gz")):
            read.append(item)
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(whole[:-100]).decode("utf-8", "ignore")
    finished = readable.count("</doc>\n")  # the articles whose end line came before the damage
    assert readable.rsplit("</doc>\n", 1)[-1].count("\n") >= 2  # and one begun after them
    assert len(read) == finished + 1 and all(isinstance(d, Document) and d.id == "50" for d in read)

    result = tmp_path / "corpus"
    config = CorpusConfig.model_validate({"rules": RULES_ONLY, "dedup": {"partitions": 2}})
    manifest = run_local(CorpusBuild([str(raw)], str(result), config))
    assert {i["name"]: i["documents"] for i in manifest["inputs"]} == {"AA/wiki_00": 2, "AA/wiki_01": 3,
                                                                       "AB/wiki_00.bz2": 1}
    assert not manifest["unsupported_files"]["files"] and list(manifest["sources"]) == ["wiki"]
    kept = [row for f in sorted((result / "data").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    assert sorted(row["id"] for row in kept) == ["13", "18", "25", "30", "41"]
