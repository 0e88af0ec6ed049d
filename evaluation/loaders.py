"""Loaders for the public formats of the evaluation datasets, on any fsspec URI.

Files are found by their public names anywhere under the directory the user names (up to a few
levels deep), never by our own layout:

| format | files (public layout) |
|---|---|
| FewCLUE | `<task>/{train_few_all,dev_few_all,test_public}.json` (JSON lines) |
| CLUE classification | `<task>_public/{train,dev,test}.json` or `<task>/{train,dev}.json` (JSON lines) |
| CHID (CLUE) | `{train,dev}.json` (JSON lines, `#idiomNNNNNN#` blanks) + `{train,dev}_answer.json` |
| C3 | `c3-{d,m}-{train,dev,test}.json` (JSON: `[[dialogue lines], [{question, choice, answer}], id]`) |
| CMRC 2018 | `cmrc2018_{train,dev,trial}.json` or `cmrc2018*/{train,dev}.json` (SQuAD JSON) |
| DRCD | `DRCD_{training,dev,test}.json` (SQuAD JSON) |
| CMRC 2019 | `cmrc2019_{train,trial,dev}.json` or `cmrc2019*/{train,dev}.json` (`[BLANKn]` contexts) |
| WebQA | `me_{train,validation.ann,test.ann}.json` (JSON: id → question, evidences) |
| DuReader | `{search,zhidao}.{train,dev,test}.json` (JSON lines) |
| CMRC 2017, PD, CFT | `<name>*{train,valid,dev,test}*` `|||` text files + `.answer` files |
| built-in set (ours) | `<task>/{test,train}.jsonl` + `_EVAL.json`, written by `pangu data fetch-eval` (evaluation/builtin.py) |

Every loader returns plain dicts ("records") in a normalised shape per format; the task module turns
them into prompts. A missing dataset raises `DataNotFound` with where it looked, never a crash.

Every record of a file is used or counted: a record that cannot be used (a line that is not UTF-8 or
not JSON, a question without an answer; the task module adds a missing or unknown label, a text that
is not a string) is left out and counted by reason in `Located.skipped`, with its place (`file:line`).
One bad record costs that record, not the task. What makes the whole file unusable (a missing file, a
JSON document that does not parse, a file none of whose lines is a record) is one error naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

SPLITS = ("eval", "train", "dev", "test")


class DataNotFound(FileNotFoundError):
    """The dataset (or the split) is not under the data directory."""


#: how many places of skipped records a task's summary lists (its counts cover them all)
SKIP_EXAMPLES = 5


@dataclass
class Skipped:
    """The records of a task's data left out, counted by reason, with the first `SKIP_EXAMPLES` places
    (`file:line: reason (detail)`): the records used and those counted here are every record read, where
    records used to be dropped (or a bad line to fail the whole task) without a word."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, place: str, detail: str = "") -> None:
        """One record left out. `reason` is what is counted (the same words for the same fault, so that
        counts add up); `detail` (the value found, the parser's message) is shown with the place only."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < SKIP_EXAMPLES:
            self.examples.append(f"{place}: {reason}" + (f" ({detail})" if detail else ""))

    def add_fault(self, place: str, exc: BaseException) -> None:
        """One record of a shape no check foresaw (a field missing, a list where a string belongs): counted
        as malformed, with the error, instead of ending the task."""
        self.add("malformed record", place, f"{type(exc).__name__}: {exc}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


#: what reading a field of a record of an unforeseen shape raises: that record's fault (`Skipped.add_fault`)
RECORD_FAULTS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


@dataclass(frozen=True)
class Located:
    path: str  # full path on the filesystem
    split: str  # the public split name of the file (test_public, dev, trial, ...)
    # Where each record the loader returned comes from (`file:line`, index for index), for the task module to
    # name a record it leaves out; and the records left out. Neither is part of which file it is.
    places: tuple[str, ...] = field(default=(), compare=False, repr=False)
    skipped: Skipped = field(default_factory=Skipped, compare=False, repr=False)

    def place(self, index: int) -> str:
        """Where the `index`-th record the loader returned comes from."""
        return self.places[index] if index < len(self.places) else f"{self.path}: record {index + 1}"


# --------------------------------------------------------------------------------------------------
# files
@lru_cache(maxsize=32)
def _listing(data_dir: str, maxdepth: int = 5) -> tuple[str, tuple[str, ...]]:
    fs, root = fsspec.core.url_to_fs(data_dir)
    if not fs.exists(root):
        raise DataNotFound(f"data directory {data_dir} does not exist")
    if fs.isfile(root):
        return root, (root,)
    if isinstance(fs, LocalFileSystem):  # fsspec's find lists a symlinked directory as a file, unentered
        root = root.rstrip("/") or "/"
        found = []
        for folder, folders, names in os.walk(root, followlinks=True):
            depth = 0 if folder == root else os.path.relpath(folder, root).count(os.sep) + 1
            if depth >= maxdepth - 1:
                folders[:] = []  # as deep as find's maxdepth (which also bounds a symlink loop)
            found += [os.path.join(folder, name) for name in names]
        return root, tuple(sorted(found))
    return root, tuple(sorted(fs.find(root, maxdepth=maxdepth)))


def require_data_dir(data_dir: str) -> None:
    """Raises FileNotFoundError (NotADirectoryError for a file) unless `data_dir` is a directory: the
    check an evaluation makes before it runs or writes anything. A directory that lacks some
    datasets is fine (each missing task is `not_found`); a data directory that is not there at all
    is the user's mistake, not an evaluation with every task missing."""
    fs, root = fsspec.core.url_to_fs(str(data_dir))
    if fs.isdir(root):
        return
    if fs.exists(root):
        raise NotADirectoryError(f"data directory {data_dir} is a file, not a directory of evaluation datasets")
    raise FileNotFoundError(f"data directory {data_dir} does not exist")


def clear_cache() -> None:
    _listing.cache_clear()


def _protocol_path(data_dir: str, path: str) -> str:
    fs, _ = fsspec.core.url_to_fs(data_dir)
    return fs.unstrip_protocol(path) if "://" in data_dir else path


def find_file(data_dir: str, candidates: Iterable[tuple[str | None, str, str]], what: str) -> Located:
    """The first (directory pattern, file name pattern, split) match under data_dir.

    `directory pattern` is a regex the parent directory's name must match fully (None: any parent);
    `file name pattern` a regex for the base name. Shorter paths win among equal candidates.
    """
    root, files = _listing(str(data_dir))
    candidates = list(candidates)
    for dir_pattern, name_pattern, split in candidates:
        name_re = re.compile(name_pattern, re.IGNORECASE)
        dir_re = re.compile(dir_pattern, re.IGNORECASE) if dir_pattern else None
        hits = []
        for path in files:
            parent, _, base = path.rstrip("/").rpartition("/")
            if not name_re.fullmatch(base):
                continue
            if dir_re is not None and not dir_re.fullmatch(parent.rpartition("/")[2]):
                continue
            hits.append(path)
        if hits:
            best = min(hits, key=lambda p: (p.count("/"), p))
            return Located(_protocol_path(str(data_dir), best), split)
    looked = ", ".join(f"{_show(d) + '/' if d else ''}{_show(n)}" for d, n, _ in candidates)
    raise DataNotFound(f"{what}: not found at {data_dir} (looked for {looked})")


def _show(pattern: str) -> str:
    """A file pattern as a reader would write it: `c3-[dm]-dev.json`, `tnews(_public)?/dev.json`."""
    return pattern.replace("\\.", ".").replace("\\w*", "*")


class DataUnreadable(ValueError):
    """A data file that cannot be read as its format at all (not a record of it: the whole file); names it."""


def _read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as fh:
        data = fh.read()
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows editors write it


def _not_utf8(exc: UnicodeDecodeError, where: str) -> str:
    return f"not UTF-8: byte 0x{exc.object[exc.start]:02x} at {where}"


def read_text(path: str) -> str:
    """A whole text file as UTF-8; one that is not is refused naming the file and the offset (the codec's
    own message named neither)."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataUnreadable(f"{path}: {_not_utf8(exc, f'byte offset {exc.start}')}") from None


def read_json(path: str) -> Any:
    """One JSON document (C3, SQuAD, WebQA files); one that does not parse is refused naming the file."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = "" if exc.msg.endswith(" at") else " at"
        raise DataUnreadable(f"{path}: not JSON: {exc.msg}{at} line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DataUnreadable(f"{path}: not JSON: nested too deeply") from None


def read_json_lines(path: str, skipped: Skipped | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a JSON-lines file (or of a JSON array of them) and where each is (`path:LINE`, 1-based;
    `path: element K` in an array). Each line is decoded on its own, so a line that is not UTF-8 (a file cut
    mid-character), not JSON (cut mid-line, an edit gone wrong) or not an object is that line's fault only:
    it is left out and counted in `skipped`. A file in which no line is an object is not JSON lines at all:
    `DataUnreadable` naming it, like an array that does not parse."""
    data = _read_bytes(path)
    skipped = Skipped() if skipped is None else skipped
    if data.lstrip()[:1] == b"[":  # a JSON array of records is accepted too
        values = read_json(path)
        records, places = [], []
        for number, value in enumerate(values, start=1):
            if isinstance(value, dict):
                records.append(value)
                places.append(f"{path}: element {number}")
            else:
                skipped.add("not a JSON object", f"{path}: element {number}", type(value).__name__)
        return records, places
    records, places, bad, first_bad = [], [], 0, ""
    # Lines end at \n only, never at what str.splitlines() also takes for one: U+2028 etc. occur inside strings.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # a blank line (the file's last newline too): no record to account for
        place = f"{path}:{number}"
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            reason, detail = "not UTF-8", _not_utf8(exc, f"column {exc.start + 1}").removeprefix("not UTF-8: ")
        except json.JSONDecodeError as exc:
            # the parser's "Unterminated string starting at" already ends in "at" (cleaning.readers words it alike)
            reason, detail = "not JSON", f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"
        except RecursionError:
            reason, detail = "not JSON", "nested too deeply"
        else:
            if isinstance(value, dict):
                records.append(value)
                places.append(place)
                continue
            reason, detail = "not a JSON object", type(value).__name__
        skipped.add(reason, place, detail)
        bad += 1
        first_bad = first_bad or f"line {number}: {reason} ({detail})"
    if not records and bad:
        raise DataUnreadable(f"{path}: not JSON lines: none of its {bad} non-blank lines is a JSON object "
                             f"({first_bad})")
    return records, places


# --------------------------------------------------------------------------------------------------
# CLUE / FewCLUE classification (JSON lines)
_CLUE_DIRS = {
    "tnews": r"tnews(_public)?", "iflytek": r"iflytek(_public)?", "ocnli": r"ocnli(_public)?",
    "cmnli": r"cmnli(_public)?", "afqmc": r"afqmc(_public)?", "csl": r"csl(_public)?",
    "cluewsc": r"cluewsc(2020)?(_public)?", "chid": r"chid(_public)?", "bustm": r"bustm(_public)?",
    "csldcp": r"csldcp(_public)?", "eprstmt": r"eprstmt(_public)?",
}


def clue_split_files(task: str, split: str) -> list[tuple[str | None, str, str]]:
    """Candidate files of a CLUE/FewCLUE task for a logical split, best first.

    eval: FewCLUE's labelled `test_public.json`, else CLUE's `dev.json` (CLUE's test is unlabelled),
    else FewCLUE's `dev_few_all.json`. train: `train_few_all.json`, else `train.json`, `train_0.json`.
    """
    d = _CLUE_DIRS.get(task, re.escape(task))
    table = {
        "eval": [(d, r"test_public\.json", "test_public"), (d, r"dev\.json", "dev"),
                 (d, r"dev_few_all\.json", "dev_few_all")],
        "test": [(d, r"test_public\.json", "test_public")],
        "dev": [(d, r"dev\.json", "dev"), (d, r"dev_few_all\.json", "dev_few_all")],
        "train": [(d, r"train_few_all\.json", "train_few_all"), (d, r"train\.json", "train"),
                  (d, r"train_0\.json", "train_0")],
    }
    return table[split]


def load_clue(task: str, data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """The records of a CLUE/FewCLUE task's split, as the file has them; `located.place(i)` says where the
    i-th is, and `located.skipped` counts the lines that are not records."""
    located = find_file(data_dir, clue_split_files(task, split), f"{task} ({split})")
    records, places = read_json_lines(located.path, located.skipped)
    if task == "chid":
        records, places = _expand_chid(records, places, located)
    return records, replace(located, places=tuple(places))


def sibling(path: str, name: str) -> str:
    return path.rpartition("/")[0] + "/" + name


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _expand_chid(records: list[dict[str, Any]], places: list[str],
                 located: Located) -> tuple[list[dict[str, Any]], list[str]]:
    """CHID in the CLUE layout (a passage with several `#idiomNNNNNN#` blanks, answers in
    `<split>_answer.json`) → one record per blank in the FewCLUE shape (`content` with one `#idiom#`,
    `candidates`, `answer`), each placed at its passage's line. FewCLUE records pass through; so does a record
    with neither (the task counts it as having no blank)."""
    out: list[dict[str, Any]] = []
    out_places: list[str] = []
    answers: dict[str, int] | None = None
    for index, (record, place) in enumerate(zip(records, places)):
        content = record.get("content")
        passages = content if isinstance(content, list) else [content]
        if not all(isinstance(p, str) for p in passages) or (isinstance(content, str) and "#idiom#" in content) \
                or not any(re.search(r"#idiom\d+#", p) for p in passages):
            out.append({"id": record.get("id", index), **record})
            out_places.append(place)
            continue
        if answers is None:
            answer_path = sibling(located.path, f"{located.split}_answer.json")
            answers = read_json(answer_path) if exists(answer_path) else {}
        for passage in passages:
            for tag in re.findall(r"#idiom\d+#", passage):
                if tag not in answers:
                    located.skipped.add("blank without an answer", place, f"{tag} not in {located.split}_answer.json")
                    continue
                text = passage.replace(tag, "#idiom#")
                text = re.sub(r"#idiom\d+#", "", text)  # the other blanks of the passage
                out.append({"id": tag.strip("#"), "content": text,
                            "candidates": record.get("candidates"), "answer": answers[tag]})
                out_places.append(place)
    return out, out_places


TNEWS_ZH = {  # FewCLUE's label_index2en2zh.json (public): used when the file is not beside the data
    "news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐", "news_sports": "体育",
    "news_finance": "财经", "news_house": "房产", "news_car": "汽车", "news_edu": "教育",
    "news_tech": "科技", "news_military": "军事", "news_travel": "旅游", "news_world": "国际",
    "news_stock": "股票", "news_agriculture": "农业", "news_game": "电竞",
}


def tnews_label_names(located: Located) -> dict[str, str]:
    """English label_desc → Chinese name, from `label_index2en2zh.json` beside the data if present."""
    names = dict(TNEWS_ZH)
    path = sibling(located.path, "label_index2en2zh.json")
    if exists(path):
        # A bad line of this side file costs a Chinese name (the English one is used); it holds no example.
        for record in read_json_lines(path)[0]:
            if record.get("label_desc") and record.get("label_zh"):
                names[record["label_desc"]] = record["label_zh"]
    return names


def label_file_names(located: Located, task: str) -> list[str]:
    """Extra label names shipped beside the data: CSLDCP `labels_all.txt`, CLUE `labels.json`."""
    names: list[str] = []
    txt = sibling(located.path, "labels_all.txt")
    if task == "csldcp" and exists(txt):
        names += [line.strip() for line in read_text(txt).splitlines() if line.strip()]
    js = sibling(located.path, "labels.json")
    if exists(js):
        for record in read_json_lines(js)[0]:  # a side file of label names: a bad line costs a name, no example
            name = record.get("label_des") or record.get("label_desc")
            if name:
                names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# C3
def load_c3(data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """One record per question: passage (dialogue or text lines), question, choices, answer index."""
    order = {"eval": ["test", "dev", "train"], "train": ["train"], "dev": ["dev"], "test": ["test"]}[split]
    _listing(str(data_dir))  # a missing data directory says so
    located: Located | None = None
    for name in order:
        try:
            first = find_file(data_dir, [(None, rf"c3-[dm]-{name}\.json", name)], "c3")
        except DataNotFound:
            continue
        located = first
        break
    if located is None:
        raise DataNotFound(f"c3 ({split}): not found at {data_dir} (looked for c3-d-/c3-m-{{{','.join(order)}}}.json)")
    records: list[dict[str, Any]] = []
    places: list[str] = []
    for kind in ("d", "m"):
        try:
            hit = find_file(data_dir, [(None, rf"c3-{kind}-{located.split}\.json", located.split)], "c3")
        except DataNotFound:
            continue
        for d_index, item in enumerate(read_json(hit.path), start=1):
            try:
                lines, questions, doc_id = item[0], list(item[1]), item[2] if len(item) > 2 else ""
                passage = "\n".join(lines)
            except RECORD_FAULTS as exc:  # its questions cannot be told apart: the document counts as one
                located.skipped.add_fault(f"{hit.path}: document {d_index}", exc)
                continue
            for q_index, q in enumerate(questions):
                place = f"{hit.path}: document {d_index}, question {q_index + 1}"
                try:
                    if q.get("answer") not in q["choice"]:
                        located.skipped.add("answer not among the choices", place, repr(q.get("answer"))[:40])
                        continue
                    records.append({"id": f"{kind}-{doc_id}-{q_index}", "passage": passage,
                                    "question": q["question"], "choices": list(q["choice"]),
                                    "label": q["choice"].index(q["answer"])})
                    places.append(place)
                except RECORD_FAULTS as exc:
                    located.skipped.add_fault(place, exc)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# SQuAD-style reading comprehension: CMRC 2018, DRCD
_SQUAD_FILES = {
    "cmrc2018": {
        "eval": [(None, r"cmrc2018_dev\.json", "dev"), (r"cmrc2018\w*", r"dev\.json", "dev"),
                 (None, r"cmrc2018_trial\.json", "trial"), (r"cmrc2018\w*", r"trial\.json", "trial")],
        "train": [(None, r"cmrc2018_train\.json", "train"), (r"cmrc2018\w*", r"train\.json", "train"),
                  (None, r"cmrc2018_trial\.json", "trial")],
        "dev": [(None, r"cmrc2018_dev\.json", "dev"), (r"cmrc2018\w*", r"dev\.json", "dev")],
        "test": [(None, r"cmrc2018_test\.json", "test"), (r"cmrc2018\w*", r"test\.json", "test")],
    },
    "drcd": {
        "eval": [(None, r"DRCD_dev\.json", "dev"), (None, r"DRCD_test\.json", "test")],
        "train": [(None, r"DRCD_training\.json", "training"), (None, r"DRCD_train\.json", "train")],
        "dev": [(None, r"DRCD_dev\.json", "dev")],
        "test": [(None, r"DRCD_test\.json", "test")],
    },
}


def load_squad(name: str, data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """One record per question: id, context, question, answers (all gold texts, in order)."""
    located = find_file(data_dir, _SQUAD_FILES[name][split], f"{name} ({split})")
    payload = read_json(located.path)
    records, places = [], []
    try:
        paragraphs = [p for article in (payload["data"] if isinstance(payload, dict) else payload)
                      for p in article["paragraphs"]]
    except RECORD_FAULTS as exc:  # no articles of paragraphs to tell questions apart in: not SQuAD JSON
        raise DataUnreadable(f"{located.path}: not SQuAD JSON (data → paragraphs → qas): "
                             f"{type(exc).__name__}: {exc}") from None
    for p_index, paragraph in enumerate(paragraphs, start=1):
        if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas") or [], list):
            located.skipped.add("malformed record", f"{located.path}: paragraph {p_index}", "no list of qas")
            continue
        for q_index, qa in enumerate(paragraph.get("qas") or [], start=1):
            where = qa.get("id") if isinstance(qa, dict) else None
            place = f"{located.path}: question {where or f'{q_index} of paragraph {p_index}'}"
            try:
                answers = [a["text"] for a in qa.get("answers", []) if a.get("text", "").strip()]
                if not answers:
                    located.skipped.add("no answer", place)
                    continue
                records.append({"id": str(qa["id"]).strip(), "context": paragraph["context"],
                                "question": qa["question"].strip(), "answers": answers})
                places.append(place)
            except RECORD_FAULTS as exc:
                located.skipped.add_fault(place, exc)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# CMRC 2019 (sentence cloze)
def load_cmrc2019(data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """One record per blank: passage around the blank (other blanks removed), choices, answer index."""
    files = {
        "eval": [(None, r"cmrc2019_dev\.json", "dev"), (r"cmrc2019\w*", r"dev\.json", "dev"),
                 (None, r"cmrc2019_trial\.json", "trial"), (r"cmrc2019\w*", r"trial\.json", "trial")],
        "train": [(None, r"cmrc2019_train\.json", "train"), (r"cmrc2019\w*", r"train\.json", "train")],
        "dev": [(None, r"cmrc2019_dev\.json", "dev"), (r"cmrc2019\w*", r"dev\.json", "dev")],
        "test": [(None, r"cmrc2019_test\.json", "test")],
    }[split]
    located = find_file(data_dir, files, f"cmrc2019 ({split})")
    payload = read_json(located.path)
    records, places = [], []
    strip = re.compile(r"\[BLANK\d+\]")
    for d_index, doc in enumerate(payload["data"] if isinstance(payload, dict) else payload, start=1):
        try:
            context, choices, answers = doc["context"], list(doc["choices"]), doc.get("answers") or []
        except RECORD_FAULTS as exc:  # its blanks cannot be told apart: the document counts as one
            located.skipped.add_fault(f"{located.path}: document {d_index}", exc)
            continue
        for blank, answer in enumerate(answers, start=1):
            tag = f"[BLANK{blank}]"
            place = f"{located.path}: {doc.get('context_id', f'document {d_index}')} {tag}"
            try:
                if tag not in context:
                    located.skipped.add("answer for a blank the context lacks", place)
                    continue
                if not 0 <= int(answer) < len(choices):
                    located.skipped.add("answer not among the choices", place, repr(answer)[:40])
                    continue
                before, _, after = context.partition(tag)
                records.append({"id": f"{doc.get('context_id', '')}-{blank}", "before": strip.sub("", before),
                                "after": strip.sub("", after), "choices": choices, "label": int(answer)})
                places.append(place)
            except RECORD_FAULTS as exc:
                located.skipped.add_fault(place, exc)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# WebQA (closed book)
def load_webqa(data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    files = {
        "eval": [(None, r"me_test\.ann\.json", "test"), (None, r"me_validation\.ann\.json", "validation"),
                 (None, r"me_test\.ir\.json", "test_ir"), (None, r"me_validation\.ir\.json", "validation_ir")],
        "train": [(None, r"me_train\.json", "train")],
        "dev": [(None, r"me_validation\.ann\.json", "validation")],
        "test": [(None, r"me_test\.ann\.json", "test")],
    }[split]
    located = find_file(data_dir, files, f"webqa ({split})")
    payload = read_json(located.path)
    if not isinstance(payload, dict):
        raise DataUnreadable(f"{located.path}: not WebQA JSON (an object of questions by id): a "
                             f"{type(payload).__name__}")
    records, places = [], []
    for qid, item in payload.items():
        place = f"{located.path}: {qid}"
        try:
            answers: list[str] = []
            for evidence in (item.get("evidences") or {}).values():
                for answer in evidence.get("answer", []):
                    if answer and answer != "no_answer" and answer not in answers:
                        answers.append(answer)
            if not answers:
                located.skipped.add("no answer", place)
                continue
            records.append({"id": qid, "question": item["question"], "answers": answers})
            places.append(place)
        except RECORD_FAULTS as exc:
            located.skipped.add_fault(place, exc)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# DuReader (JSON lines, search + zhidao)
def load_dureader(data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """One record per answered question: the most related paragraph of the first selected document
    (or of the first document) as the passage, all gold answers."""
    public = {"eval": "dev", "train": "train", "dev": "dev", "test": "test"}[split]
    located = find_file(data_dir, [(None, rf"(search|zhidao)\.{public}\.json", public)], f"dureader ({split})")
    records, places = [], []
    for source in ("search", "zhidao"):
        try:
            hit = find_file(data_dir, [(None, rf"{source}\.{public}\.json", public)], "dureader")
        except DataNotFound:
            continue
        items, item_places = read_json_lines(hit.path, located.skipped)
        for item, place in zip(items, item_places):
            try:
                answers = [a for a in item.get("answers", []) if a.strip()]
                documents = item.get("documents") or []
                if not answers or not documents:
                    located.skipped.add("no answer" if not answers else "no documents", place)
                    continue
                chosen = next((d for d in documents if d.get("is_selected")), documents[0])
                paragraphs = chosen.get("paragraphs") or [""]
                index = chosen.get("most_related_para", 0)
                passage = paragraphs[index] if 0 <= index < len(paragraphs) else paragraphs[0]
                records.append({"id": f"{source}-{item.get('question_id')}", "context": passage,
                                "question": item["question"], "answers": answers})
                places.append(place)
            except RECORD_FAULTS as exc:
                located.skipped.add_fault(place, exc)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# CMRC 2017 / People's Daily / Children's Fairy Tale (cloze, `|||` format)
def load_cloze_txt(name: str, data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """The `|||` cloze format of the PD&CFT and CMRC 2017 releases, as we read it: documents separated
    by blank lines, one sentence per line as `<n> ||| <words>`; the query line holds `XXXXX` where the
    answer word was; answers in a file with the same stem and `.answer` suffix, as `<qid> ||| <word>`
    lines (matched by query id when the ids are unique, else by order) or plain `<word>` lines in
    document order. Word-segmented text is joined without spaces."""
    names = {"eval": ["test", "valid", "validation", "dev"], "train": ["train"], "dev": ["valid", "validation", "dev"],
             "test": ["test"]}[split]
    candidates = []
    for s in names:
        candidates += [(rf"{name}\w*", rf"({name}[._-]?)?{s}(\.txt|\.json)?", s),
                       (None, rf"{name}[._-]{s}(\.txt)?", s)]
    located = find_file(data_dir, candidates, f"{name} ({split})")
    text = read_text(located.path)
    stem = re.sub(r"\.(txt|json)$", "", located.path)
    answer_path = next((p for p in (stem + ".answer", located.path + ".answer") if exists(p)), None)
    answer_lines = read_text(answer_path).splitlines() if answer_path else []
    listed: list[tuple[str | None, str]] = []  # (query id or None, answer) in file order
    for line in answer_lines:
        if line.strip():
            qid, sep, word = line.partition("|||")
            listed.append((qid.strip(), word.strip()) if sep else (None, line.strip()))
    ids = [qid for qid, _ in listed]
    # by query id when the ids are unique, else the n-th answer belongs to the n-th query
    by_id = dict(listed) if None not in ids and len(set(ids)) == len(ids) else {}

    def clean(words: str) -> str:
        # spaces next to a non-ASCII character are word separators; between Latin words they stay
        return re.sub(r"\s+(?=[^\x00-\x7f])|(?<=[^\x00-\x7f])\s+", "", words.strip())

    records, places = [], []
    queries: list[str | None] = []
    for doc_index, block in enumerate(re.split(r"\n\s*\n", text.strip())):
        lines = [line for line in block.splitlines() if line.strip()]
        sentences, query, qid = [], None, None
        for line in lines:
            head, sep, body = line.partition("|||")
            body = body if sep else head
            if "XXXXX" in body:
                query, qid = clean(body), head.strip() if sep else str(doc_index)
            else:
                sentences.append(clean(body))
        place = f"{located.path}: document {doc_index + 1}"
        if query is None:
            located.skipped.add("no XXXXX query line", place)
            continue
        answer = by_id.get(qid) if by_id else (listed[len(queries)][1] if len(queries) < len(listed) else None)
        queries.append(qid)
        if not answer:
            located.skipped.add("no answer", place, f"query {qid}")
            continue
        before, _, after = query.partition("XXXXX")
        records.append({"id": f"{doc_index}-{qid}", "document": "".join(sentences), "before": before, "after": after,
                        "answers": [clean(answer)]})
        places.append(place)
    return records, replace(located, places=tuple(places))


# --------------------------------------------------------------------------------------------------
# The built-in set (evaluation/builtin.py): `<task>/{test,train}.jsonl`, one
# `{id, text, choices, label, meta}` object a line; `_EVAL.json` beside the task folders.
_BUILTIN_SPLITS = {"eval": "test", "test": "test", "train": "train"}


def load_builtin(task: str, data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """The records of one built-in task; a task the builder skipped (no `npm`) says why."""
    if split not in _BUILTIN_SPLITS:
        raise DataNotFound(f"{task} ({split}): the built-in set has only test (eval) and train splits")
    name = _BUILTIN_SPLITS[split]
    try:
        located = find_file(data_dir, [(re.escape(task), rf"{name}\.jsonl", name)], f"{task} ({split})")
    except DataNotFound as exc:
        reason = _builtin_skipped(data_dir).get(task)
        raise DataNotFound(f"{exc}; the set was built without it: {reason}" if reason else str(exc)) from None
    # Its records are checked as the task reads them (evaluation.tasks): a bad one is counted, not fatal.
    records, places = read_json_lines(located.path, located.skipped)
    return records, replace(located, places=tuple(places))


def _builtin_skipped(data_dir: str) -> dict[str, str]:
    try:
        marker = find_file(data_dir, [(None, r"_EVAL\.json", "")], "_EVAL.json")
        return dict(read_json(marker.path).get("skipped") or {})
    except (DataNotFound, ValueError, OSError):
        return {}


__all__ = [
    "DataNotFound", "DataUnreadable", "Located", "RECORD_FAULTS", "SKIP_EXAMPLES", "SPLITS", "Skipped", "TNEWS_ZH", "clear_cache", "find_file", "label_file_names",
    "load_builtin", "load_c3", "load_clue", "load_cloze_txt", "load_cmrc2019", "load_dureader", "load_squad", "load_webqa",
    "read_json", "read_json_lines", "tnews_label_names",
]
