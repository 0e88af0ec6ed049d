"""Which copy of a cluster a build keeps (issue #13 §3): the best-ranked member by
DedupConfig.survivor_order (source priority, quality, length), then path order, through the real
build. The web copies sit in `a-web.jsonl`, first in path order; the encyclopedia originals in
`b-baike.jsonl`."""
from __future__ import annotations

import json

import pytest

from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.versions import refresh
from tests.realtext import long_documents
from tests.test_corpus_build import config, read_rows, write_jsonl


def _documents() -> list[str]:
    """Real documents that every rule keeps (mostly Chinese characters)."""
    docs = [t for t in long_documents(40) if sum("\u4e00" <= ch <= "\u9fff" for ch in t) / len(t) > 0.7]
    return docs[:5]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """doc 0: the web copy is longer (a sentence of another document appended); doc 1: the web copy
    is cut short; doc 2: the web copy is the same text with other punctuation (an exact copy, the
    same length after normalisation); docs 3 and 4: one document of each source, no copy."""
    docs = _documents()
    folder = tmp_path_factory.mktemp("raw")
    web = [docs[0] + docs[4][:40], docs[1][:int(len(docs[1]) * 0.9)], docs[2].replace("，", ", "), docs[3]]
    write_jsonl(folder / "a-web.jsonl", [{"id": f"web-{i}", "text": t, "domain": "news", "source": "web"}
                                         for i, t in enumerate(web)])
    baike = [docs[0], docs[1], docs[2], docs[4]]
    write_jsonl(folder / "b-baike.jsonl", [{"id": f"baike-{i}", "text": t, "domain": "news", "source": "baike"}
                                           for i, t in enumerate(baike)])
    return folder


def _build(raw, out, **dedup) -> dict[str, tuple[str, str]]:
    """Builds RAW into OUT; every duplicate's (reason, dup_of)."""
    manifest = run_local(CorpusBuild([str(raw)], str(out), config(**dedup)))
    dups = {r["id"]: (r["reason"], r["dup_of"]) for r in read_rows(out / "rejected", "dup-*.parquet")}
    kept = {r["id"] for r in read_rows(out / "data")}
    assert manifest["totals"]["kept"] == len(kept) == 5 and not kept & set(dups)
    return dups


def test_the_encyclopedia_original_beats_a_web_copy_with_source_priority(raw, tmp_path):
    dups = _build(raw, tmp_path / "out", source_priority={"baike": 1})
    assert dups == {"web-0": ("near_duplicate", "baike-0"), "web-1": ("near_duplicate", "baike-1"),
                    "web-2": ("exact_duplicate", "baike-2")}


def test_without_priorities_the_longer_text_survives_and_equal_ranks_keep_path_order(raw, tmp_path):
    expected = {"baike-0": ("near_duplicate", "web-0"),   # the web copy is longer
                "web-1": ("near_duplicate", "baike-1"),   # the web copy is shorter
                "baike-2": ("exact_duplicate", "web-2")}  # equal lengths: a-web.jsonl comes first
    assert _build(raw, tmp_path / "none") == expected
    assert _build(raw, tmp_path / "equal", source_priority={"baike": 1, "web": 1}) == expected


def test_path_order_alone_keeps_the_first_copy(raw, tmp_path):
    dups = _build(raw, tmp_path / "out", survivor_order=[], source_priority={"baike": 1})
    assert dups == {"baike-0": ("near_duplicate", "web-0"), "baike-1": ("near_duplicate", "web-1"),
                    "baike-2": ("exact_duplicate", "web-2")}


def test_a_refresh_with_other_priorities_re_ranks_without_signing_again(raw, tmp_path):
    root = tmp_path / "corpora"
    first = refresh([str(raw)], str(root), config())
    second = refresh([str(raw)], str(root), config(source_priority={"baike": 1}))
    manifest = json.loads((root / second["version"] / "manifest.json").read_text())
    assert first["version"] != second["version"]
    assert manifest["work"]["signed_documents"] == 0 and manifest["work"]["cleaned"] == 0
    assert manifest["work"]["dedup"]["previous"] is not None  # the index is extended, only re-ranked
    dups = {r["id"]: r["dup_of"] for r in read_rows(root / second["version"] / "rejected", "dup-*.parquet")}
    assert dups == {"web-0": "baike-0", "web-1": "baike-1", "web-2": "baike-2"}
