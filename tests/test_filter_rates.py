"""Issue #13 §1: the default preset on held-in clean text and generated junk.

Clean (FewCLUE news titles, app descriptions, abstracts, CHID stories, C3 exam passages, CMRC
encyclopedia paragraphs, reviews): at most 1 % rejected by rules other than SPEC's length /
Chinese-ratio / title rules. Junk (shuffled characters, contact spam, one line repeated, keyword
stuffing): at least 90 % rejected. `python -m cleaning.filter_rates ../shared/data/clue` prints
the same numbers per rule.
"""
from __future__ import annotations

import pytest

from cleaning.config import load_preset
from cleaning.document import Document
from cleaning.filter_rates import CLEAN_MAX_REJECTED, JUNK_MIN_REJECTED, clean_sets, junk_sets, measure, table
from cleaning.filters import KeywordHits, word_boundaries
from tests.realtext import CLUE

pytestmark = pytest.mark.skipif(not (CLUE / "fewclue" / "chid").is_dir(), reason="CLUE data not available")

PER_SET = 2500  # documents per clean set (the whole of the smaller sets); keeps the test < 60 s


@pytest.fixture(scope="module")
def report(fetched_assets):
    from cleaning.perplexity import fetch_model

    config = load_preset("default")
    if config.rules.perplexity_model:
        fetch_model(clue=CLUE)  # built once per machine (about 15 s)
    clean = clean_sets(CLUE, PER_SET)
    junk = junk_sets(clean, config.rules, n=300)
    result = measure(config, clean, junk)
    print("\n" + table(result))
    return result


def test_default_preset_keeps_clean_text(report):
    bad = {name: (round(row["rate"], 4), row["rejected"]) for name, row in report.items()
           if row["kind"] == "clean" and row["rate"] > CLEAN_MAX_REJECTED}
    assert not bad, bad


def test_default_preset_rejects_junk(report):
    bad = {name: (round(row["rate"], 4), row["rejected"]) for name, row in report.items()
           if row["kind"] == "junk" and row["rate"] < JUNK_MIN_REJECTED}
    assert not bad, bad


def test_chid_stories_are_kept(report):
    row = report["chid_stories"]
    assert row["input"] > 500 and sum(row["rejected"].values()) <= 0.01 * row["input"], row


def doc(text: str) -> Document:
    return Document(id="t", text=text, domain="web", source="t")


def test_keywords_match_whole_words_and_count_distinct(tmp_path):
    words = tmp_path / "list.txt"
    words.write_text("客服\n美图\n模特儿\n加微信\n优惠券\n代理\nSM\n", encoding="utf-8")
    rule = KeywordHits("ad_keywords", [str(words)], max_hits=0)
    assert rule.check(doc("我们提供微博客服务。")) is None  # 微 / 博客 / 服务
    assert rule.check(doc("这是一家最美图书馆。")) is None  # 最美 / 图书馆
    assert rule.check(doc("短信SMS发送失败。")) is None  # a Latin run is one word
    assert rule.check(doc("请联系客服。")) is not None
    three = KeywordHits("ad_keywords", [str(words)], max_hits=3)
    assert three.check(doc("模特儿" * 7)) is None  # one word seven times is one hit
    detail = three.check(doc("加微信领取优惠券，客服在线，诚招代理，模特儿模特儿。"))
    assert detail is not None and detail.startswith("5 distinct words")
    legacy = KeywordHits("ad_keywords", [str(words)], max_hits=3, distinct=False, word_boundaries=False)
    assert legacy.check(doc("模特儿" * 7)) is not None


def test_word_boundaries_cover_the_text():
    text = "加微信 领取\n优惠券，客服QQ12345\r\n微博客服务"
    offsets = word_boundaries(text)
    assert 0 in offsets and len(text) in offsets and max(offsets) == len(text)


def test_boilerplate_lines_only_on_web_by_default():
    from cleaning.config import RuleConfig
    from cleaning.pipeline import build_steps

    rules = RuleConfig(spam_model=None, quality_model=None, langid=False, t2s=False,
                       ad_word_lists=[], sensitive_word_lists=[])
    step = next(s for s in build_steps(rules) if s.name == "remove_boilerplate_lines")
    text = "首页 | 新闻 | 体育 | 娱乐 | 财经\n正文第一段。\n编辑：张三"
    web = Document(id="w", text=text, domain="web", source="crawl")
    news = Document(id="n", text=text, domain="news", source="paper")
    step.check(web)
    step.check(news)
    assert web.text == "正文第一段。" and news.text == text
