"""Keyword rules on long clean articles vs keyword stuffing, and the curation of their lists
(issue #13 §1: the default sensitive-word rule dropped 2.35 % of held-out web news)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleaning.config import RuleConfig
from cleaning.document import Document
from cleaning.filters import KeywordHits, word_boundaries
from cleaning.pipeline import build_steps
from sample_data import fetch
from sample_data.sources.pypi_text import read_inews, read_peoples_daily

# Real news with 4 distinct words of the default sensitive list, far apart (see test below):
# People's Daily 1998 (a history article) and iNews `test` (a court report; not a curation reference).
SPARSE_NEWS = {"peoples_daily-00895": "peoples_daily", "inews-test-00349": "inews"}


def doc(text: str, source: str = "t") -> Document:
    return Document(id=source, text=text, domain="news", source=source)


@pytest.fixture(scope="module")
def default_keyword_steps(fetched_assets: dict[str, str]) -> dict[str, KeywordHits]:
    steps = build_steps(RuleConfig(quality_model=None))
    return {s.name: s for s in steps if isinstance(s, KeywordHits)}


@pytest.fixture(scope="module")
def sparse_news(fetched_assets: dict[str, str]) -> dict[str, str]:
    wanted = {"peoples_daily": read_peoples_daily, "inews": read_inews}
    found = {r["id"]: r["text"] for source in set(SPARSE_NEWS.values()) for r in wanted[source]()
             if r["id"] in SPARSE_NEWS}
    assert set(found) == set(SPARSE_NEWS)
    return found


def test_default_rules_count_words_in_a_window() -> None:
    rules = RuleConfig()
    assert rules.keyword_window_chars == 300
    windows = {s.name: s.window_chars for s in build_steps(RuleConfig(quality_model=None, langid=False))
               if isinstance(s, KeywordHits)}
    assert windows == {"ad_keywords": 300, "sensitive_words": 300}
    off = build_steps(RuleConfig(quality_model=None, langid=False, keyword_window_chars=None))
    assert {s.window_chars for s in off if isinstance(s, KeywordHits)} == {None}


def test_long_news_with_sparse_hits_is_kept_stuffed_page_rejected(
        default_keyword_steps: dict[str, KeywordHits], sparse_news: dict[str, str]) -> None:
    sensitive = default_keyword_steps["sensitive_words"]
    whole = KeywordHits("whole", ("asset:wordlists/sensitive.txt",), 3)  # the rule before the window
    for doc_id, text in sparse_news.items():
        words = sensitive._matcher.distinct_words(text, word_boundaries(text))
        assert len(words) >= 4 and len(text) > 2000, (doc_id, words)
        assert whole.check(doc(text)) is not None, doc_id  # counted over the article: dropped
        assert sensitive.check(doc(text)) is None, doc_id  # no 300 characters hold 4 of them
        # The same words as a tag block, alone or under the article: rejected, and named.
        block = "热门搜索：" + " ".join(sorted(words, key=text.find))
        for page in (f"{block}\n本站提供最新资讯，欢迎访问。", f"{text}\n{block}"):
            detail = sensitive.check(doc(page))
            assert detail is not None and detail.startswith(f"{len(words)} distinct words within 300 characters > 3")
            assert all(word in detail for word in words), detail


def test_window_counts_the_densest_span(tmp_path: Path) -> None:
    words = tmp_path / "list.txt"
    words.write_text("色情\n赌博\n毒品\n六合彩\n枪支\n", encoding="utf-8")
    filler = "今天的天气很好，我们一起去公园散步。" * 12  # 216 characters
    spread = f"色情{filler}赌博{filler}毒品{filler}六合彩{filler}"
    windowed = KeywordHits("k", [str(words)], 3, window_chars=300)
    assert windowed.check(doc(spread)) is None
    assert KeywordHits("k", [str(words)], 3).check(doc(spread)).startswith("4 distinct words > 3")
    # Repeats of one word are one word; the densest span is named, not the document.
    dense = f"色情{filler}{filler}赌博，毒品，六合彩，赌博，枪支。{filler}"
    assert windowed.check(doc(dense)) == "4 distinct words within 300 characters > 3: 赌博、毒品、六合彩、枪支"
    assert windowed.check(doc("赌博" * 50 + filler)) is None
    # A document shorter than the window is judged as before.
    short = "色情，赌博，毒品，六合彩。" + filler[:100]
    assert windowed.check(doc(short)) is not None
    assert KeywordHits._densest_span([], 300) == []


def test_curation_bounds_per_reference_set() -> None:
    news = ["色情网站被查处。", "北京电，国务院开会。", "中国队在北京夺冠。"] + ["今天天气晴。"] * 97
    web = ["我老公说。"] * 30 + ["色情广告。"] * 4 + ["网页。"] * 66
    words = ["色情", "老公", "北京", "淫秽"]
    # One bound for both: 色情 (4 % of the web pages) goes with the ordinary words.
    kept, removed = fetch.curate_word_list(words, {"news": news, "web": web}, 0.015)
    assert kept == ["淫秽"] and set(removed) == {"色情", "老公", "北京"}
    # The web set with its own, higher bound: only what is common there (老公, 30 %) goes.
    kept, removed = fetch.curate_word_list(words, {"news": news, "web": web}, 0.015, {"web": 0.1})
    assert kept == ["色情", "淫秽"] and removed == {"老公": pytest.approx(0.3), "北京": pytest.approx(0.02)}


def test_curated_lists_use_web_news_and_keep_the_signals(fetched_assets: dict[str, str]) -> None:
    def lines(name: str) -> set[str]:
        return set(Path(fetched_assets[f"wordlists/{name}.txt"]).read_text(encoding="utf-8").split("\n")[:-1])

    sensitive, ads = lines("sensitive"), lines("ads")
    raw = lines("politics") | lines("pornography")
    for word in ("习近平", "老公", "女友"):  # in > 1 % of iNews train pages
        assert word in raw and word not in sensitive, word
    assert "客服" in lines("advertisement") and "客服" not in ads
    # Common in web news too, but below its bound: crime reports and spam carry them.
    for word in ("色情", "强奸", "卖淫", "嫖娼", "口交", "淫秽"):
        assert word in sensitive, word
    assert {"私家侦探", "小额贷款", "六合彩"} <= ads
    curated = json.loads(Path(fetched_assets["wordlists/SOURCE.json"]).read_text(encoding="utf-8"))["curated"]
    for name in ("sensitive.txt", "ads.txt"):
        info = curated[name]
        assert info["max_doc_fraction_by_set"] == fetch.CURATION_SET_MAX_DOC_FRACTION == {"inews_train": 0.01}
        # Only the train split (5,355 pages): dev and test (1,998) are left to measure on.
        assert info["reference_sets"]["inews_train"] == 5355 and "dev, test" in info["held_out"]
    assert fetch._curation_current(Path(fetched_assets["wordlists/SOURCE.json"]))


def test_lists_curated_with_other_bounds_are_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "SOURCE.json"
    entry = {"max_doc_fraction": fetch.CURATION_MAX_DOC_FRACTION,
             "max_doc_fraction_by_set": fetch.CURATION_SET_MAX_DOC_FRACTION}
    source.write_text(json.dumps({"curated": {"sensitive.txt": entry, "ads.txt": entry}}), encoding="utf-8")
    assert fetch._curation_current(source)
    source.write_text(json.dumps({"curated": {"sensitive.txt": {"max_doc_fraction": 0.001}, "ads.txt": entry}}),
                      encoding="utf-8")
    assert not fetch._curation_current(source)
    source.write_text("{", encoding="utf-8")
    assert not fetch._curation_current(source)


def test_boundaries_of_some_offsets_are_those_of_the_whole_segmentation() -> None:
    """KeywordHits segments only the han blocks its words fall in; the boundaries it gets there must
    be the whole document's (`\\r\\n` is one segment; Latin runs stay together)."""
    import random

    rng = random.Random(3)
    texts = [r["text"] for _, r in zip(range(150), read_peoples_daily())]
    texts += ["微博客服务\r\n最美图书 SMS客服\r\n\r\nabc def", "\r\n", "a\r\nb", "", "客服"]
    for text in texts:
        whole = word_boundaries(text)
        offsets = set(rng.sample(range(len(text) + 1), min(len(text) + 1, 60))) | {0, len(text)}
        assert word_boundaries(text, offsets) == whole & offsets, text[:30]
    assert 2 not in word_boundaries("a\r\nb", {2}) and 1 in word_boundaries("a\r\nb", {1})
