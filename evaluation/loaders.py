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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
import os
from functools import lru_cache
from typing import Any, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

SPLITS = ("eval", "train", "dev", "test")


class DataNotFound(FileNotFoundError):
    """The dataset (or the split) is not under the data directory."""


@dataclass(frozen=True)
class Located:
    path: str  # full path on the filesystem
    split: str  # the public split name of the file (test_public, dev, trial, ...)


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


def read_text(path: str) -> str:
    with fsspec.open(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def read_json_lines(path: str) -> list[dict[str, Any]]:
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of records is accepted too
        return json.loads(stripped)
    return [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines(): U+2028 etc. occur inside strings


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
    located = find_file(data_dir, clue_split_files(task, split), f"{task} ({split})")
    records = read_json_lines(located.path)
    if task == "chid":
        records = _expand_chid(records, located, data_dir)
    return records, located


def sibling(path: str, name: str) -> str:
    return path.rpartition("/")[0] + "/" + name


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _expand_chid(records: list[dict[str, Any]], located: Located, data_dir: str) -> list[dict[str, Any]]:
    """CHID in the CLUE layout (a passage with several `#idiomNNNNNN#` blanks, answers in
    `<split>_answer.json`) → one record per blank in the FewCLUE shape (`content` with one `#idiom#`,
    `candidates`, `answer`). FewCLUE records pass through."""
    out: list[dict[str, Any]] = []
    answers: dict[str, int] | None = None
    for index, record in enumerate(records):
        content = record.get("content")
        if isinstance(content, str) and "#idiom#" in content:
            out.append({"id": record.get("id", index), **record})
            continue
        if answers is None:
            answer_path = sibling(located.path, f"{located.split}_answer.json")
            answers = read_json(answer_path) if exists(answer_path) else {}
        passages = content if isinstance(content, list) else [content]
        for passage in passages:
            for tag in re.findall(r"#idiom\d+#", passage):
                if tag not in answers:
                    continue
                text = passage.replace(tag, "#idiom#")
                text = re.sub(r"#idiom\d+#", "", text)  # the other blanks of the passage
                out.append({"id": tag.strip("#"), "content": text,
                            "candidates": record["candidates"], "answer": int(answers[tag])})
    return out


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
        for record in read_json_lines(path):
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
        for record in read_json_lines(js):
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
    for kind in ("d", "m"):
        try:
            hit = find_file(data_dir, [(None, rf"c3-{kind}-{located.split}\.json", located.split)], "c3")
        except DataNotFound:
            continue
        for item in read_json(hit.path):
            lines, questions, doc_id = item[0], item[1], item[2] if len(item) > 2 else ""
            for q_index, q in enumerate(questions):
                if "answer" not in q or q["answer"] not in q["choice"]:
                    continue
                records.append({
                    "id": f"{kind}-{doc_id}-{q_index}", "passage": "\n".join(lines), "question": q["question"],
                    "choices": list(q["choice"]), "label": q["choice"].index(q["answer"]),
                })
    return records, located


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
    records = []
    for article in payload["data"] if isinstance(payload, dict) else payload:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa.get("answers", []) if a.get("text", "").strip()]
                if not answers:
                    continue
                records.append({"id": str(qa["id"]).strip(), "context": paragraph["context"],
                                "question": qa["question"].strip(), "answers": answers})
    return records, located


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
    records = []
    for doc in payload["data"] if isinstance(payload, dict) else payload:
        context, choices, answers = doc["context"], list(doc["choices"]), doc.get("answers") or []
        for blank, answer in enumerate(answers, start=1):
            tag = f"[BLANK{blank}]"
            if tag not in context or not 0 <= int(answer) < len(choices):
                continue
            before, _, after = context.partition(tag)
            strip = re.compile(r"\[BLANK\d+\]")
            records.append({"id": f"{doc.get('context_id', '')}-{blank}", "before": strip.sub("", before),
                            "after": strip.sub("", after), "choices": choices, "label": int(answer)})
    return records, located


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
    records = []
    for qid, item in payload.items():
        answers: list[str] = []
        for evidence in (item.get("evidences") or {}).values():
            for answer in evidence.get("answer", []):
                if answer and answer != "no_answer" and answer not in answers:
                    answers.append(answer)
        if answers:
            records.append({"id": qid, "question": item["question"], "answers": answers})
    return records, located


# --------------------------------------------------------------------------------------------------
# DuReader (JSON lines, search + zhidao)
def load_dureader(data_dir: str, split: str = "eval") -> tuple[list[dict[str, Any]], Located]:
    """One record per answered question: the most related paragraph of the first selected document
    (or of the first document) as the passage, all gold answers."""
    public = {"eval": "dev", "train": "train", "dev": "dev", "test": "test"}[split]
    located = find_file(data_dir, [(None, rf"(search|zhidao)\.{public}\.json", public)], f"dureader ({split})")
    records = []
    for source in ("search", "zhidao"):
        try:
            hit = find_file(data_dir, [(None, rf"{source}\.{public}\.json", public)], "dureader")
        except DataNotFound:
            continue
        for item in read_json_lines(hit.path):
            answers = [a for a in item.get("answers", []) if a.strip()]
            documents = item.get("documents") or []
            if not answers or not documents:
                continue
            chosen = next((d for d in documents if d.get("is_selected")), documents[0])
            paragraphs = chosen.get("paragraphs") or [""]
            index = chosen.get("most_related_para", 0)
            passage = paragraphs[index] if 0 <= index < len(paragraphs) else paragraphs[0]
            records.append({"id": f"{source}-{item.get('question_id')}", "context": passage,
                            "question": item["question"], "answers": answers})
    return records, located


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

    records = []
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
        if query is None:
            continue
        answer = by_id.get(qid) if by_id else (listed[len(queries)][1] if len(queries) < len(listed) else None)
        queries.append(qid)
        if not answer:
            continue
        before, _, after = query.partition("XXXXX")
        records.append({"id": f"{doc_index}-{qid}", "document": "".join(sentences), "before": before, "after": after,
                        "answers": [clean(answer)]})
    return records, located


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
    records = read_json_lines(located.path)
    for record in records:
        if not 0 <= record["label"] < len(record["choices"]):
            raise ValueError(f"{located.path}: {record['id']}: label {record['label']} out of range")
    return records, located


def _builtin_skipped(data_dir: str) -> dict[str, str]:
    try:
        marker = find_file(data_dir, [(None, r"_EVAL\.json", "")], "_EVAL.json")
        return dict(read_json(marker.path).get("skipped") or {})
    except (DataNotFound, ValueError, OSError):
        return {}


__all__ = [
    "DataNotFound", "Located", "SPLITS", "TNEWS_ZH", "clear_cache", "find_file", "label_file_names",
    "load_builtin", "load_c3", "load_clue", "load_cloze_txt", "load_cmrc2019", "load_dureader", "load_squad", "load_webqa",
    "read_json", "read_json_lines", "tnews_label_names",
]
