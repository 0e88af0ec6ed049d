"""How often each rule of a preset rejects clean text, and how often junk gets through (issue #13 §1).

Held-in clean sets are real Chinese text of several kinds read from FewCLUE / C3 / CMRC 2018 (a
`clue` directory such as `../shared/data/clue`); junk sets are generated from them
deterministically: a good paragraph with its characters shuffled, contact / advertising spam from
templates, one line repeated many times, and pages stuffed with words of the keyword lists.

    .venv/bin/python -m cleaning.filter_rates ../shared/data/clue [--preset default]

prints, per set, the share of documents each rule rejects (a markdown table). Targets: clean text
loses at most 1 % to rules other than SPEC rule 1 (`LENGTH_RULES`: length, Chinese ratio, title
only); junk loses at least 90 % to all rules together.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from cleaning import charclass, perplexity
from cleaning.config import CorpusConfig, RuleConfig, load_preset
from cleaning.document import Document, Rejection
from cleaning.errors import at_least, user_errors_in_one_line
from cleaning.pipeline import CleaningChain

# SPEC §3 rule 1: these may reject clean text (a 20-character review is not a document).
LENGTH_RULES = frozenset({"too_long", "min_length", "chinese_ratio", "title_only"})
CLEAN_MAX_REJECTED = 0.01
JUNK_MIN_REJECTED = 0.90

# The domain each held-in set stands for (boilerplate-line removal is for "web" only).
DOMAINS = {"news_titles": "news", "app_descriptions": "web", "abstracts": "public_datasets",
           "chid_stories": "ebooks", "exam_passages": "public_datasets", "encyclopedia": "encyclopedia",
           "reviews": "web"}


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _grouped(lines: list[str], size: int) -> list[str]:
    return ["\n".join(lines[i:i + size]) for i in range(0, len(lines), size)]


def clean_sets(clue: str | Path, per_set: int | None = None) -> dict[str, list[str]]:
    """Real documents per kind of text; `per_set` keeps the first N of each."""
    clue = Path(clue)
    few = clue / "fewclue"
    if not few.is_dir():
        raise FileNotFoundError(f"{clue}: no CLUE data (fewclue/, c3/, cmrc2018/)")
    files = ("test_public.json", "train_few_all.json", "dev_few_all.json")
    sets: dict[str, list[str]] = {}
    titles = _unique(r["sentence"] for f in files for r in _jsonl(few / "tnews" / f))
    sets["news_titles"] = _grouped(titles, 10)  # ten headlines to a page
    sets["app_descriptions"] = _unique(r["sentence"] for f in files for r in _jsonl(few / "iflytek" / f))
    sets["abstracts"] = _unique([r["abst"] for f in files for r in _jsonl(few / "csl" / f)]
                                + [r["content"] for f in files for r in _jsonl(few / "csldcp" / f)])
    stories = []
    for f in files:
        for r in _jsonl(few / "chid" / f):
            answer = r["candidates"][r["answer"]] if 0 <= r.get("answer", -1) < len(r["candidates"]) else ""
            stories.append(r["content"].replace("#idiom#", answer))
    sets["chid_stories"] = _grouped(_unique(stories), 3)  # a story snippet is ~115 characters
    passages = []
    for name in ("c3-m-train.json", "c3-d-train.json"):
        with open(clue / "c3" / name, encoding="utf-8") as fh:
            passages += ["\n".join(item[0]) for item in json.load(fh)]
    sets["exam_passages"] = _grouped(_unique(passages), 3)
    with open(clue / "cmrc2018" / "cmrc2018_trial.json", encoding="utf-8") as fh:
        sets["encyclopedia"] = _unique(p["context"] for d in json.load(fh)["data"] for p in d["paragraphs"])
    reviews = _unique(r["sentence"] for f in files for r in _jsonl(few / "eprstmt" / f))
    sets["reviews"] = _grouped(reviews, 5)
    if per_set is not None:
        sets = {k: v[:per_set] for k, v in sets.items()}
    return sets


# -- junk ---------------------------------------------------------------------------------------

_SPAM_TEMPLATES = [
    "{product}厂家直销，价格优惠，欢迎来电咨询！联系电话：{phone}，加微信{wechat}领取优惠券。QQ：{qq}，"
    "官网{url}，全国包邮，货到付款，量大从优，诚招各地代理加盟。",
    "【{product}】限时特价！！！点击链接{url}立即抢购，咨询热线{phone}，微信同号，客服QQ{qq}。"
    "代理招募中，月入过万不是梦，有意者请加微信：{wechat}，名额有限，先到先得！",
    "专业办理{product}，当天出结果，保密安全。热线：{phone}（24小时），扣扣{qq}，VX：{wechat}。"
    "详情请登录{url}，或扫码添加客服，低价出售，款到发货，欢迎新老客户惠顾。",
    "{product}，效果看得见！我们是一家集研发、生产、销售于一体的专业公司，多年来深受广大客户的信赖与好评。"
    "现在下单即享受超值优惠，买二送一，不满意全额退款。咨询电话{phone}，微信{wechat}，QQ{qq}。",
    "兼职招聘：在家手机操作，日结工资，{product}推广，无需押金。报名加微信{wechat}或QQ群{qq}，"
    "电话{phone}，网址{url}。转发本消息到三个群即可领取红包，名额有限速来！",
]
_PRODUCTS = ["减肥茶", "壮阳药", "代开发票", "高仿名表", "网络贷款", "刷单返利", "私家侦探", "六合彩资料",
             "游戏代练", "信用卡提现", "无抵押贷款", "微商面膜"]


_PROMO = [
    "本店所有商品均为正品，假一赔十，支持七天无理由退换货，欢迎广大顾客朋友前来选购。",
    "现在加入我们，零门槛创业，一部手机就能做，宝妈学生上班族都可以利用业余时间赚钱。",
    "活动期间全场五折起，满三百减一百，更有精美礼品相送，数量有限，送完即止。",
    "我们拥有多年行业经验和专业团队，服务周到，价格公道，已为上万名客户解决了难题。",
    "无需任何经验，公司提供全程培训和技术支持，轻松上手，收益稳定，当天就能见到效果。",
    "厂家直接供货，省去中间环节，价格比实体店便宜一半，质量有保障，售后无忧。",
    "名额有限，先到先得，错过今天再等一年，赶快行动吧，机会不等人！",
]


def _spam(rng: random.Random) -> str:
    def phone() -> str:
        return "1" + rng.choice("3578") + "".join(rng.choice("0123456789") for _ in range(9))

    parts = rng.sample(_PROMO, 4)
    for template in rng.sample(_SPAM_TEMPLATES, 1):
        parts.append(template.format(
            product=rng.choice(_PRODUCTS), phone=phone(),
            wechat=rng.choice(["wx", "vip", "kf", "zz"]) + "".join(rng.choice("0123456789") for _ in range(7)),
            qq="".join(rng.choice("0123456789") for _ in range(rng.randint(8, 10))),
            url=f"http://www.{''.join(rng.choice('abcdefghijkmnpqrstuvwxyz') for _ in range(6))}.com/"
                f"{rng.randint(100, 999)}.html"))
    rng.shuffle(parts)
    return "\n".join(parts)


def _shuffled(text: str, rng: random.Random) -> str:
    chars = [c for c in text if not c.isspace()]
    rng.shuffle(chars)
    return "".join(chars)


def _repeated(line: str, rng: random.Random) -> str:
    times = rng.randint(8, 30)
    separator = rng.choice(["\n", "", " ", "。"])
    return separator.join([line] * times)


def _stuffed(words: list[str], filler: str, rng: random.Random) -> str:
    """A page that lists keywords: 8 to 15 distinct list words between a few clauses of text."""
    chosen = rng.sample(words, rng.randint(8, 15))
    clauses = [c for c in filler.replace("，", "。").split("。") if c][:6]
    out = []
    for i, word in enumerate(chosen):
        out.append(word)
        if clauses and i % 3 == 2:
            out.append(clauses[(i // 3) % len(clauses)] + "。")
    return rng.choice([" ", "，", "、", "|"]).join(out) + "\n" + "热门搜索：" + " ".join(rng.sample(chosen, 5))


def keyword_words(rules: RuleConfig) -> list[str]:
    """Entries of the configured ad and sensitive lists that are Chinese words (2 to 6 characters)."""
    from cleaning import assets

    words: list[str] = []
    for ref in list(rules.ad_word_lists) + list(rules.sensitive_word_lists):
        with open(assets.require(ref), encoding="utf-8") as fh:
            words += [w.strip() for w in fh if w.strip() and not w.startswith("#")]
    return sorted({w for w in words if 2 <= len(w) <= 6 and all(charclass.is_han(c) for c in w)})


def junk_sets(clean: dict[str, list[str]], rules: RuleConfig, n: int = 300, seed: int = 13) -> dict[str, list[str]]:
    """Junk generated deterministically from the clean sets (same `seed`, same documents)."""
    rng = random.Random(seed)
    paragraphs = [t for name in ("abstracts", "chid_stories", "encyclopedia", "exam_passages")
                  for t in clean.get(name, []) if len(t) >= 150]
    rng.shuffle(paragraphs)
    lines = [line for t in paragraphs[:2000] for line in t.replace("。", "。\n").split("\n") if 12 <= len(line) <= 60]
    words = keyword_words(rules)
    return {
        "shuffled_chars": [_shuffled(t, rng) for t in paragraphs[:n]],
        "contact_spam": [_spam(rng) for _ in range(n)],
        "repeated_line": [_repeated(rng.choice(lines), rng) for _ in range(n)],
        "keyword_stuffed": [_stuffed(words, rng.choice(paragraphs), rng) for _ in range(n)],
    }


# -- measuring ----------------------------------------------------------------------------------

def rejection_counts(config: CorpusConfig, texts: list[str], source: str, domain: str) -> Counter:
    """reason → documents rejected, plus "input" and "kept"."""
    chain = CleaningChain(config)
    docs = (Document(id=f"{source}-{i}", text=t, domain=domain, source=source) for i, t in enumerate(texts))
    counts: Counter = Counter(input=len(texts))
    for out in chain.run(docs):
        counts["kept" if not isinstance(out, Rejection) else out.reason] += 1
    return counts


def measure(config: CorpusConfig, clean: dict[str, list[str]], junk: dict[str, list[str]]) -> dict[str, dict]:
    """Per set: counts per reason, and the rate the targets read (clean: rules outside
    `LENGTH_RULES`; junk: every rule)."""
    report: dict[str, dict] = {}
    for kind, sets in (("clean", clean), ("junk", junk)):
        for name, texts in sets.items():
            counts = rejection_counts(config, texts, name, DOMAINS.get(name, "web"))
            reasons = {k: v for k, v in counts.items() if k not in ("input", "kept")}
            if kind == "clean":
                rate = sum(v for k, v in reasons.items() if k not in LENGTH_RULES) / counts["input"]
            else:
                rate = sum(reasons.values()) / counts["input"]
            report[name] = {"kind": kind, "input": counts["input"], "rejected": reasons, "rate": rate}
    return report


def table(report: dict[str, dict]) -> str:
    rules = sorted({r for row in report.values() for r in row["rejected"]})
    head = "| set | docs | target | " + " | ".join(rules) + " |"
    lines = [head, "|" + "---|" * (3 + len(rules))]
    for name, row in report.items():
        target = (f"≤ {CLEAN_MAX_REJECTED:.0%} (excl. length rules): {row['rate']:.1%}" if row["kind"] == "clean"
                  else f"≥ {JUNK_MIN_REJECTED:.0%}: {row['rate']:.1%}")
        cells = [f"{row['rejected'].get(r, 0) / row['input']:.1%}" if row["rejected"].get(r) else "" for r in rules]
        lines.append(f"| {name} | {row['input']} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clue", help="directory with fewclue/, c3/, cmrc2018/")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--per-set", type=at_least(1), default=None)
    parser.add_argument("--junk", type=at_least(1), default=300, help="documents per junk set")
    args = parser.parse_args(argv)
    with user_errors_in_one_line("cleaning.filter_rates"):  # a missing asset or CLUE set: one line
        config = load_preset(args.preset)
        if config.rules.perplexity_model == perplexity.DEFAULT_MODEL:
            perplexity.fetch_model(clue=args.clue)  # the reference model, built once per machine
        clean = clean_sets(args.clue, args.per_set)
        junk = junk_sets(clean, config.rules, args.junk)
        print(table(measure(config, clean, junk)))


if __name__ == "__main__":
    main()
