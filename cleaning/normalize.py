"""Rule-based cleaning that rewrites text (PanGu-α §3, rules 2, 4 and 5)."""
from __future__ import annotations

import functools
import html
import re
import zlib
from typing import Sequence

import numpy as np

from cleaning import charclass
from cleaning.document import Document
from cleaning.steps import Transform

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and lone two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_SCRIPT_STYLE = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
# Comments, and the doctype that `_TAG` (tags only) would leave at the top of a page.
_HTML_COMMENT = re.compile(r"<!--.*?-->|<!doctype\b[^<>]*>", re.IGNORECASE | re.DOTALL)
# Block-level tags become line breaks so that paragraphs stay paragraphs.
# Only things that look like tags: a name, then attributes whose unquoted parts hold no Han
# characters, so running text such as "若 a<b 且 b>c" is left alone.
_ATTRIBUTES = r"(?:\s(?:[^<>\"'\u3400-\u9fff]|\"[^\"]*\"|'[^']*')*)?/?>"
_BLOCK_TAG = re.compile(r"</?(?:p|div|br|li|ul|ol|tr|table|h[1-6]|section|article|header|footer|nav)\b"
                        + _ATTRIBUTES, re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*" + _ATTRIBUTES)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z]{2,31});")
# C0/C1 controls except tab and newline, zero-width characters, BOM, replacement-char runs.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_TRAILING = re.compile(r"[ \t]+\n|\n[ \t]+")


class StripMarkup(Transform):
    """Control characters, ANSI escapes, HTML tags and entities, repeated whitespace."""

    name = "strip_markup"

    def transform(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        if "<" in text:
            text = _HTML_COMMENT.sub("", text)
            text = _SCRIPT_STYLE.sub("", text)
            text = _BLOCK_TAG.sub("\n", text)
            text = _TAG.sub("", text)
        if "&" in text:
            text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        text = _CONTROL.sub("", text)
        # Only a tab, a no-break or ideographic space, or two spaces in a row can change: the regex
        # scan of every text was half of this rule's time.
        if "  " in text or "\t" in text or "\u00a0" in text or "\u3000" in text:
            text = _SPACES.sub(" ", text)
        if " \n" in text or "\n " in text:  # tabs are spaces by now; the search is the rule's main cost
            text = _TRAILING.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text)
        return text.strip()


# Lines of web pages that carry no content: navigation, copyright, share buttons, paging.
_BOILERPLATE_WORDS = re.compile(
    r"版权所有|copyright|©|all rights reserved|icp备|icp证|京公网安备|公网安备|联系我们|关于我们|网站地图|"
    r"免责声明|隐私政策|用户协议|返回顶部|返回首页|上一篇|下一篇|上一页|下一页|首页|尾页|分享到|"
    r"点击(?:查看|进入|阅读)|扫描二维码|扫一扫|责任编辑|编辑[:：]|来源[:：]|登录|注册|订阅|收藏本站|"
    r"设为首页|加入收藏|相关阅读|相关新闻|热门推荐|猜你喜欢|更多>>|阅读全文|打印本页|关闭窗口",
    re.IGNORECASE,
)
_NAV_SEPARATORS = re.compile(r"[|｜>»›·•/\\\-–—_]+")
_CJK = re.compile(charclass.han_pattern())


def is_boilerplate_line(line: str, max_len: int = 60) -> bool:
    stripped = line.strip()
    if not stripped or len(stripped) > max_len:
        return False  # long lines are content even if they mention 版权
    if _BOILERPLATE_WORDS.search(stripped):
        return True
    # A navigation bar: several short items between separators ("首页 | 新闻 | 体育 | 娱乐").
    items = [part for part in _NAV_SEPARATORS.split(stripped) if part.strip()]
    separators = len(_NAV_SEPARATORS.findall(stripped))
    if separators >= 3 and len(items) >= 4 and all(len(item.strip()) <= 6 for item in items):
        return True
    return False


class RemoveBoilerplateLines(Transform):
    """Drops navigation and boilerplate lines of web pages.

    `domains`: only documents of these domains are touched (None: every document). The default
    rules give ("web",): in edited text the same patterns are content ("编辑：", "来源：", a line
    that mentions 登录 or 首页 in an app description or a dialogue)."""

    name = "remove_boilerplate_lines"

    def __init__(self, max_len: int = 60, domains: Sequence[str] | None = None):
        self.max_len = max_len
        self.domains = None if domains is None else frozenset(domains)

    def check(self, doc: Document) -> str | None:
        if self.domains is None or doc.domain in self.domains:
            doc.text = self.transform(doc.text)
        return None

    def transform(self, text: str) -> str:
        lines = text.split("\n")
        kept = [line for line in lines if not is_boilerplate_line(line, self.max_len)]
        return "\n".join(kept) if len(kept) != len(lines) else text


class DedupParagraphs(Transform):
    """Drop the second and later copies of a paragraph inside one document."""

    name = "dedup_paragraphs"

    def transform(self, text: str) -> str:
        seen: set[str] = set()
        kept: list[str] = []
        changed = False
        for line in text.split("\n"):
            key = line.strip()
            if key and key in seen:
                changed = True
                continue
            seen.add(key)
            kept.append(line)
        return "\n".join(kept) if changed else text


# OpenCC's t2s changes a text only where it holds a character that t2s changes on its own, or one of
# these, which change only inside a phrase (覆 in 反覆 → 反复, 瞭 in 瞭解 → 了解): every key of the t2s
# dictionaries whose characters all convert to themselves holds one of them. Checked against the
# dictionaries of OpenCC 1.4.2's source package (tests/test_rules.py); with another version every
# text goes through OpenCC.
_T2S_PHRASE_ONLY = "坏瞭藉覆沈哩甦衹"
_T2S_CHECKED_VERSION = "1.4.2"


class TraditionalToSimplified(Transform):
    """OpenCC t2s; runs before dedup so that traditional and simplified copies meet.

    Most text has no character t2s could change: a table over the code points finds the texts of a
    batch that do, and only those go through OpenCC (the conversion was 15 us a document on the
    benchmark corpus, most of them already simplified)."""

    name = "t2s"

    def __init__(self) -> None:
        import importlib.metadata

        import opencc  # imported here: the C++ dictionaries load once per step object

        self._converter = opencc.OpenCC("t2s")
        version = importlib.metadata.version("opencc")
        self._may_change = t2s_may_change(version) if version == _T2S_CHECKED_VERSION else None

    def transform(self, text: str) -> str:
        return self._converter.convert(text)

    def check_batch(self, docs: Sequence[Document]) -> list[str | None]:
        if self._may_change is None:
            return super().check_batch(docs)
        texts = [doc.text for doc in docs]
        # surrogatepass: a lone surrogate is marked (the table holds every surrogate), so OpenCC
        # still sees that text and fails on it as before
        cps = charclass.code_points_lenient("".join(texts))
        ends = np.cumsum([len(t) for t in texts])
        owners = np.searchsorted(ends, np.flatnonzero(self._may_change[cps]), side="right")
        for i in np.unique(owners).tolist():
            docs[i].text = self._converter.convert(docs[i].text)
        return [None] * len(docs)


@functools.lru_cache(maxsize=1)
def t2s_may_change(version: str) -> np.ndarray:
    """Over all code points: whether OpenCC's t2s (this version) changes the character on its own,
    or is one of `_T2S_PHRASE_ONLY`; surrogates too. One conversion per code point (about a second),
    so it is kept under `$PANGU_HOME/cache`."""
    def build() -> dict[str, np.ndarray]:
        import opencc

        converter = opencc.OpenCC("t2s")
        table = np.zeros(0x110000, dtype=bool)
        for cp in range(0x110000):
            if 0xD800 <= cp <= 0xDFFF:
                table[cp] = True
            else:
                table[cp] = converter.convert(chr(cp)) != chr(cp)
        table[[ord(c) for c in _T2S_PHRASE_ONLY]] = True
        return {"may_change": table}

    marks = f"{zlib.crc32(_T2S_PHRASE_ONLY.encode()):08x}"
    return charclass.cached_tables(f"t2s-may-change-opencc{version}-{marks}", build)["may_change"]
