"""PanGu-α cleaning rules on real text: what each one changes, drops, and leaves alone."""
from __future__ import annotations

import pytest

from cleaning.document import Document
from cleaning.filters import ChineseRatio, KeywordHits, MinLength, Repetition, TitleOnly, TooLong, char_profile
from cleaning.normalize import (DedupParagraphs, RemoveBoilerplateLines, StripMarkup, TraditionalToSimplified,
                                is_boilerplate_line)
from tests.realtext import abstracts, app_descriptions


def doc(text: str) -> Document:
    return Document(id="t", text=text, domain="d", source="s")


def test_strip_markup_removes_html_ansi_controls_and_keeps_text():
    body = abstracts()[0]
    raw = (f"<html><head><style>p {{color: red}}</style><script>var a = 1 < 2;</script></head>"
           f"<body><p>{body}</p><div>第二段&nbsp;&amp;&#x4E2D;&lt;b&gt;</div>\x1b[31m红色\x1b[0m\x00\x07"
           f"  多余   空格\u200b\r\n\r\n\r\n\r\n结尾</body></html>")
    out = StripMarkup().transform(raw)
    assert body in out
    assert "第二段 &中<b>" in out  # entities decoded after tags are gone, so "<b>" is text now
    assert "红色" in out and "\x1b" not in out and "\x00" not in out and "\x07" not in out
    assert "color" not in out and "var a" not in out and "<p>" not in out
    assert "多余 空格" in out and "\u200b" not in out and "\n\n\n" not in out and "\r" not in out


def test_strip_markup_leaves_math_comparisons_alone():
    text = "若 a<b 且 b>c，则结论成立。"
    assert StripMarkup().transform(text) == text


def test_boilerplate_lines_removed_but_content_kept():
    body = abstracts()[1]
    text = "\n".join(["首页 | 新闻 | 体育 | 娱乐 | 财经", body, "上一篇：某某新闻", "版权所有 © 2020 某某网 京ICP备12345号",
                      "分享到：微信 微博"])
    out = RemoveBoilerplateLines().transform(text)
    assert out == body
    # A long content line that mentions copyright is content, not boilerplate.
    long_line = "本文讨论了版权所有人的权利与义务，" + body
    assert not is_boilerplate_line(long_line)


def test_duplicate_paragraphs_inside_a_document():
    a, b = abstracts()[:2]
    assert DedupParagraphs().transform(f"{a}\n{b}\n{a}\n\n{b}") == f"{a}\n{b}\n"
    unchanged = f"{a}\n{b}"
    assert DedupParagraphs().transform(unchanged) is unchanged


def test_t2s_converts_traditional_text():
    assert TraditionalToSimplified().transform("這是一個關於電腦與網絡發展的報導。") == "这是一个关于电脑与网络发展的报导。"


def test_t2s_batch_converts_exactly_the_texts_opencc_changes():
    # Only texts holding a character that t2s may change go through OpenCC; the others must be
    # texts OpenCC leaves alone: phrases whose characters are all simplified on their own (反覆,
    # 瞭解), traditional text, simplified text, and text with no Chinese at all.
    import opencc

    texts = [abstracts()[0], "他反覆思量，终于瞭解了其中的道理。", "這是一個關於電腦與網絡發展的報導。",
             "意志消沈的人找藉口。", "plain ASCII text, 12345", "", app_descriptions()[0],
             "混合：简体与繁體、坏人与一坏土。"]
    step = TraditionalToSimplified()
    docs = [doc(t) for t in texts]
    assert step.check_batch(docs) == [None] * len(texts)
    converter = opencc.OpenCC("t2s")
    assert [d.text for d in docs] == [converter.convert(t) for t in texts]
    assert docs[1].text == "他反复思量，终于了解了其中的道理。"


def test_t2s_table_covers_every_dictionary_key_that_converts(tmp_path):
    # The batch step skips OpenCC for a text without a character of `t2s_may_change`. That is exact
    # only if every key of the t2s dictionaries that OpenCC converts holds such a character: checked
    # here against the dictionaries (plain text) of the installed OpenCC's source package.
    import importlib.metadata
    import subprocess
    import sys
    import tarfile

    import opencc

    from cleaning.normalize import _T2S_CHECKED_VERSION, t2s_may_change

    version = importlib.metadata.version("opencc")
    assert version == _T2S_CHECKED_VERSION, "a new OpenCC: check _T2S_PHRASE_ONLY against its dictionaries"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--disable-pip-version-check", "-q", "-d", str(tmp_path), f"opencc=={version}"],
                   check=True, timeout=600)
    (archive,) = tmp_path.glob("*.tar.gz")
    may_change = t2s_may_change(version)
    converter = opencc.OpenCC("t2s")
    checked = 0
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/data/dictionary/" not in member.name or name not in (
                    "TSPhrases.txt", "TSCharacters.txt", "CJK_Compatibility_Ideographs.txt"):
                continue
            for line in tf.extractfile(member).read().decode("utf-8").splitlines():
                key = line.split("\t")[0]
                if key and converter.convert(key) != key:
                    checked += 1
                    assert may_change[[ord(c) for c in key]].any(), key
    assert checked > 5_000  # the three dictionaries were read (7,590 keys in 1.4.2)


def test_char_profile_counts():
    p = char_profile("中文 text\nカナ한글 𠀀")
    assert p.chars == 11 and p.cjk == 3 and p.kana_hangul == 4


def test_length_ratio_and_title_filters():
    body = abstracts()[2]
    assert MinLength(150).check(doc(body)) is None if len(body.replace(" ", "")) >= 150 else True
    assert "< 150" in MinLength(150).check(doc("太短了。"))
    assert ChineseRatio(0.6).check(doc(body)) is None
    english = "Open source large language models are trained on web text. " * 5 + "中文"
    assert ChineseRatio(0.6).check(doc(english)).startswith("0.0")
    assert TitleOnly().check(doc("国务院召开常务会议部署经济工作")) is not None
    assert TitleOnly().check(doc("国务院召开常务会议。")) is None
    assert TitleOnly().check(doc(body)) is None
    assert TooLong(100).check(doc(body)) is not None and TooLong(10_000).check(doc(body)) is None


def test_keyword_hits_counts_non_overlapping_occurrences(tmp_path):
    words = tmp_path / "ads.txt"
    words.write_text("加微信\n优惠\n优惠券\n# comment\n\n", encoding="utf-8")
    # The previous counting (every occurrence, substrings); the default is distinct whole words.
    rule = KeywordHits("ad_keywords", [str(words)], max_hits=3, distinct=False, word_boundaries=False)
    assert rule.check(doc("领取优惠券，加微信领优惠，优惠多多，加微信")) is not None
    assert rule.check(doc("今天有优惠券。")) is None
    detail = rule.check(doc("优惠券优惠券优惠券优惠券"))
    assert detail.startswith("4 hits") and "优惠券" in detail


def test_real_app_descriptions_pass_through_cleaning_unharmed():
    texts = app_descriptions()[:200]
    chain = [StripMarkup(), RemoveBoilerplateLines(), DedupParagraphs()]
    for text in texts:
        out = text
        for step in chain:
            out = step.transform(out)
        # Cleaning may drop lines but never invents text or empties a real description.
        assert out and len(out) <= len(text) + 1


def test_keyword_matcher_is_leftmost_longest_and_non_overlapping():
    from cleaning.filters import KeywordMatcher

    matcher = KeywordMatcher(["优惠", "优惠券", "券商", "A", "微信号"])
    assert matcher.find("优惠券商品") == ["优惠券"]  # longest at the leftmost start, then no overlap
    assert matcher.find("券商与优惠") == ["券商", "优惠"]
    assert matcher.find("A股加微信号") == ["A", "微信号"]
    assert matcher.find("优惠优惠优惠", limit=2) == ["优惠", "优惠"]
    assert matcher.find("没有关键词") == []


@pytest.mark.parametrize("filter_bits", [22, 3])  # 3 bits: nearly every pair collides
def test_keyword_matcher_agrees_with_a_plain_scan_on_real_text(filter_bits, monkeypatch):
    from cleaning import filters
    from cleaning.filters import KeywordMatcher

    monkeypatch.setattr(filters, "_PAIR_FILTER_BITS", filter_bits)

    texts = abstracts()[:200] + app_descriptions()[:200]
    words = sorted({t[i:i + n] for t in texts[:40] for i in range(0, len(t) - 4, 37) for n in (2, 3, 4)})

    def scan(text):
        found, i = [], 0
        lengths = sorted({len(w) for w in words}, reverse=True)
        while i < len(text):
            for n in lengths:
                if text[i:i + n] in words_set:
                    found.append(text[i:i + n])
                    i += n
                    break
            else:
                i += 1
        return found

    words_set = set(words)
    matcher = KeywordMatcher(words)
    assert any(matcher.find(t) for t in texts)
    for text in texts:
        assert matcher.find(text) == scan(text)
    assert matcher.find_batch(list(texts)) == [scan(t) for t in texts]
    assert matcher.find_batch(["", "x", texts[0]]) == [[], [], scan(texts[0])]


def test_language_id_with_the_ratio_rule(fetched_assets):
    from cleaning.filters import LanguageID

    lid = LanguageID("asset:lid.176.ftz", min_score=0.5, min_chinese_ratio=0.6)
    classical = "學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？人不知而不慍，不亦君子乎？" * 3
    japanese = "東京都は日本の首都であり、政治、経済、文化の中心地として発展してきました。" * 3
    english = "Language identification decides what the ratio rule cannot vouch for. " * 4 + "中文"
    docs = [doc(abstracts()[0]), doc(classical), doc(japanese), doc(english)]
    verdicts = lid.check_batch(docs)
    assert verdicts[0] is None and verdicts[1] is None  # Han text is kept whatever the label
    assert verdicts[2].startswith("ja") and verdicts[3].startswith("en")
    # With the ratio rule off for a source, the rule still vouches only for Han-majority text.
    loose = LanguageID("asset:lid.176.ftz", min_score=0.5, min_chinese_ratio=0.0)
    assert loose.check_batch([doc(english)])[0].startswith("en")
    strict = LanguageID("asset:lid.176.ftz", min_score=0.5, min_chinese_ratio=1.01)
    assert strict.check_batch([doc(abstracts()[0])]) == [None]  # the model says zh
    assert strict.check_batch([doc(english)])[0].startswith("en")


def test_contact_patterns_match_the_same_with_the_email_alternative_left_out_on_text_without_at():
    """ContactSpam scans text without `@` with a regex whose alternatives all start with a literal
    (the engine then skips to candidate characters); it must find what the whole pattern finds."""
    import random

    from cleaning import filters
    from cleaning.filter_rates import _spam

    rng = random.Random(5)
    spam = [_spam(rng) for _ in range(300)]
    edge = ["电话13812345678", "213812345678", "1381234567８", "400-123-4567转1", "0755-12345678", "10755-12345678",
            "qq：123456 扣扣号 88888 企鹅群:1234567", "微信 abc_de vx:abcdef v信 xyz12 weixin：hello wx abcde 微信同号",
            "https://例子.cn/页面，www.abc.com.cn", "13812345678qq12345"]
    texts = [t for t in [*app_descriptions()[:2000], *abstracts()[:500], *spam, *edge] if "@" not in t]
    found = 0
    for text in texts:
        low = text.lower()
        fast = [m.group(0) for m in filters._CONTACTS_NO_EMAIL.finditer(low)]
        assert fast == [m.group(0) for m in filters._CONTACTS.finditer(low)], text
        found += len(fast)
    assert found > 300


def test_dictionary_bigrams_are_built_once_per_machine_and_equal_a_fresh_build(tmp_path, monkeypatch):
    """The dictionary's pair bit set is kept under $PANGU_HOME/cache (every corpus worker needs it; building
    it walks jieba's dictionary): a cold home builds and stores it, a warm one loads the same bits."""
    import numpy as np

    from cleaning import filters

    monkeypatch.setenv("PANGU_HOME", str(tmp_path))
    filters.dictionary_bigrams.cache_clear()
    try:
        built = filters.dictionary_bigrams()
        (stored,) = (tmp_path / "cache").glob("dictionary-bigrams-jieba*.npz")
        filters.dictionary_bigrams.cache_clear()
        monkeypatch.setattr(filters, "_build_dictionary_bigrams", lambda: pytest.fail("rebuilt with a warm cache"))
        loaded = filters.dictionary_bigrams()
    finally:
        filters.dictionary_bigrams.cache_clear()
    assert stored.stat().st_size > built.nbytes // 2 and np.array_equal(loaded, built)
    assert int(np.unpackbits(built).sum()) > 250_000  # ~300k dictionary pairs, a few sharing a bit


def test_repetition_share_is_that_of_distinct_character_ngrams_per_text_of_a_batch():
    # One hash pass over the joined batch, a sort of a prefix when it decides: each verdict must be
    # the definition's, on the text's own n-grams (none spanning two texts of the batch).
    def share(text: str, n: int = 10) -> float:
        return len({text[i:i + n] for i in range(len(text) - n + 1)}) / (len(text) - n + 1)

    body = abstracts()[0]
    line = body[:40]
    texts = [line * 6, body, "短文本", body + body, line * 3 + body[40:80] * 2, app_descriptions()[1] * 5,
             line[:15] * 2, line * 6]
    step = Repetition(0.3)
    verdicts = step.check_batch([doc(t) for t in texts])
    assert verdicts == [step.check(doc(t)) for t in texts]
    for text, verdict in zip(texts, verdicts):
        if len(text) < 20:
            assert verdict is None
        elif share(text) < 0.3:
            assert verdict == f"{share(text):.3f} of character 10-grams distinct < 0.3", text[:20]
        else:
            assert verdict is None, (text[:20], share(text))
    assert verdicts[0] is not None and verdicts[1] is None and verdicts[3] is None
