"""Shared material of the tokenizer tests: real CLUE text, a small corpus, one trained model per session.

Text is read from ../shared/data/clue (never copied into the project). The model is trained once per
test session (cached here, not in a conftest, so the tokenizer tests stay self-contained).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests import scratch
from tests.realtext import CLUE

# FewCLUE task → (text fields, corpus domain). The domains use Table 4 names and corpus aliases.
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "tnews": (("sentence",), "news"),
    "iflytek": (("sentence",), "web"),
    "csl": (("abst",), "public_datasets"),
    "chid": (("content",), "ebooks"),
    "csldcp": (("content",), "public_datasets"),
    "eprstmt": (("sentence",), "web"),
    "ocnli": (("sentence1", "sentence2"), "web"),
    "bustm": (("sentence1", "sentence2"), "web"),
    "cluewsc": (("text",), "ebooks"),
}


@lru_cache(maxsize=None)
def clue_lines() -> dict[str, tuple[str, ...]]:
    """Distinct real lines per FewCLUE task (test_public) plus CMRC 2018 contexts as "encyclopedia"."""
    out: dict[str, tuple[str, ...]] = {}
    for task, (fields, _) in TASKS.items():
        lines: list[str] = []
        with open(CLUE / "fewclue" / task / "test_public.json", encoding="utf-8") as fh:
            for raw in fh:
                if raw.strip():
                    record = json.loads(raw)
                    lines += [record[f] for f in fields if isinstance(record.get(f), str) and record[f].strip()]
        out[task] = tuple(dict.fromkeys(lines))
    with open(CLUE / "cmrc2018" / "cmrc2018_trial.json", encoding="utf-8") as fh:
        squad = json.load(fh)
    out["cmrc2018"] = tuple(dict.fromkeys(
        p["context"] for article in squad["data"] for p in article["paragraphs"]
    ))
    return out


def domain_of(task: str) -> str:
    return "encyclopedia" if task == "cmrc2018" else TASKS[task][1]


@lru_cache(maxsize=None)
def clue_documents(lines_per_doc: int = 4) -> tuple[tuple[str, str], ...]:
    """(domain, text) documents of a few real lines each, joined by newlines (CLUE lines have none),
    with a blank line or a double space now and then, so the newline/space mapping is exercised."""
    docs: list[tuple[str, str]] = []
    for task, lines in clue_lines().items():
        for start in range(0, len(lines), lines_per_doc):
            group = list(lines[start:start + lines_per_doc])
            n = start // lines_per_doc
            joiner = "\n\n" if n % 5 == 0 else "\n"
            if n % 7 == 0:
                group[0] = group[0].replace("，", "，  ", 1)
            docs.append((domain_of(task), joiner.join(group)))
    return tuple(docs)


def edge_texts() -> list[str]:
    """Inputs that stress the scheme: whitespace runs, CRLF, Latin, digits, emoji, rare characters."""
    return [
        "",
        " ",
        "\n",
        "  两个空格  ",
        "行一\r\n行二\n\n行四\t制表",
        "PanGu-α 有 2.6B、13B 和 200B 三个版本，训练于 2021 年。",
        "价格上涨了12.5%，C++ 和 Python 3.11 都支持 #标签 & a_b。",
        "表情😀👍🏽和生僻字𠀀𪚥龘，还有全角ＡＢＣ１２３。",
        "<eot> 不是文档结束，<pad> 也不是填充。",
        "I love 北京天安门 very much.",
        "中" * 500,
    ]


def session_dir() -> Path:
    return scratch.session_dir("tokenizer")


def write_corpus(directory: Path, docs: list[tuple[str | None, str | None]], shards: int = 2) -> Path:
    """A corpus version dir in the corpus stage's layout: data/part-NNNNN.parquet."""
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    per = max(1, -(-len(docs) // shards))
    for s in range(shards):
        part = docs[s * per:(s + 1) * per]
        table = pa.table({
            "id": [f"doc-{s}-{i}" for i in range(len(part))],
            "text": pa.array([t for _, t in part], pa.string()),
            "domain": pa.array([d for d, _ in part], pa.string()),
            "source": ["clue"] * len(part),
            "quality": pa.array([1.0] * len(part), pa.float64()),
            "meta": ["{}"] * len(part),
        })
        pq.write_table(table, data / f"part-{s:05d}.parquet")
    return directory


@lru_cache(maxsize=None)
def corpus_dir() -> Path:
    """The CLUE documents as a 3-shard corpus."""
    return write_corpus(session_dir() / "corpus", list(clue_documents()), shards=3)


TINY = {"vocab_size": 4000, "character_coverage": 0.995, "input_sentence_size": 6000, "seed": 7}


@lru_cache(maxsize=None)
def trained_model_dir() -> Path:
    """One unigram model, 4,000 pieces, trained from the corpus shards (sampled to 6,000 lines)."""
    from tokenizer.train import TokenizerTrainConfig, train_tokenizer

    config = TokenizerTrainConfig(input=str(corpus_dir()), output=str(session_dir() / "tokenizer" / "v1"), **TINY)
    train_tokenizer(config)
    return Path(config.output)
