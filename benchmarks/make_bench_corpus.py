"""A mixed Chinese benchmark corpus with planted exact and near duplicates (known ground truth).

Real text comes from the project's registry readers (`sample_data.sources`, SPEC §8: People's Daily
1998, iNews web news, Xinhua dictionary, idioms, classical poetry; the package archives are read
from `$PANGU_HOME/downloads`). About 16 M characters (~49 MB) of distinct real text exist, so the
corpus reaches its target size with *remix* documents: 8-30 real sentences drawn at random from
the People's Daily and iNews sentence pool (~300k sentences). Two remix documents share a sentence
rarely and never enough to be near duplicates, so they add volume (and false-positive pressure on
dedup) without adding unplanted duplicates.

Planted copies (one copy per chosen original; originals are real or remix documents of >= 200
characters with >= 60 % Han characters, so that they survive the length and ratio rules):

    exact     byte-identical copy
    near1/2/5 1 / 2 / 5 % random character edits (substitution, insertion, deletion of Han chars)
    trad      OpenCC s2t copy (traditional characters; a t2s step before dedup should catch it)
    html      the original wrapped in a web page: <html>, a navigation bar, <p> paragraphs,
              a copyright / ICP footer, a <script> (cleaning should reduce it to the original)

Besides the copies, ~4 % of other documents get the same web wrapper as noise (not copies).

Output (`--out DIR`):
    DIR/data/part-NNNNN.jsonl    shuffled records {id, text, domain, source}, ~--shard-mb each
    DIR/truth.jsonl              one line per planted copy: {"id", "orig", "kind"}
    DIR/corpus.json              sizes, counts per kind and per origin, parameters

    .venv/bin/python benchmarks/make_bench_corpus.py --size-mb 200 --out /tmp/cvd/corpus-200
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("exact", "near1", "near2", "near5", "trad", "html")
EDIT_RATE = {"near1": 0.01, "near2": 0.02, "near5": 0.05}
_SENT = re.compile(r"[^。！？!?]*[。！？!?]+[”’」』）)]?")
_HAN = re.compile(r"[\u4e00-\u9fff]")


def load_real() -> list[dict]:
    from sample_data.sources.poetry import read_poetry
    from sample_data.sources.pypi_text import read_idioms, read_inews, read_peoples_daily, read_xinhua_dict

    records: list[dict] = []
    for read in (read_peoples_daily, read_inews, read_xinhua_dict, read_idioms, read_poetry):
        try:
            records.extend(read())
        except Exception as err:  # poetry needs the npm archive; the rest is enough without it
            print(f"[corpus] skipping {read.__name__}: {err}", file=sys.stderr)
    return records


def sentence_pool(records: list[dict]) -> list[str]:
    pool: list[str] = []
    for r in records:
        if r["source"] not in ("peoples_daily", "inews"):
            continue
        for para in r["text"].split("\n"):
            for s in _SENT.findall(para):
                s = s.strip()
                if 8 <= len(s) <= 200 and len(_HAN.findall(s)) >= 0.6 * len(s):
                    pool.append(s)
    return pool


def remix(pool: list[str], rng: random.Random) -> str:
    k = rng.randint(8, 30)
    sents = rng.sample(pool, k)
    paras, i = [], 0
    while i < k:
        step = rng.randint(2, 5)
        paras.append("".join(sents[i:i + step]))
        i += step
    return "\n".join(paras)


def eligible(text: str) -> bool:
    n = len(text.replace("\n", "").replace(" ", ""))
    return n >= 200 and len(_HAN.findall(text)) >= 0.6 * n


def edit(text: str, rate: float, rng: random.Random, alphabet: str) -> str:
    chars = list(text)
    for _ in range(max(1, round(rate * len(chars)))):
        i = rng.randrange(len(chars))
        op = rng.randrange(3)
        if op == 0:
            chars[i] = rng.choice(alphabet)
        elif op == 1:
            chars.insert(i, rng.choice(alphabet))
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


NAVS = ("首页 | 新闻 | 体育 | 娱乐 | 财经 | 科技 | 汽车", "网站首页 > 新闻中心 > 国内新闻 > 正文",
        "首页 | 资讯 | 图片 | 视频 | 论坛 | 博客")
FOOTERS = ("版权所有 © 2019 某某网 All Rights Reserved", "京ICP备12345678号 京公网安备11010502030000号",
           "关于我们 | 联系我们 | 网站地图 | 免责声明", "上一篇：返回列表 下一篇：暂无")


def html_wrap(text: str, rng: random.Random) -> str:
    title = text.split("\n", 1)[0][:30]
    body = "\n".join(f"<p>{p}</p>" for p in text.split("\n") if p.strip())
    nav = rng.choice(NAVS)
    foot = "\n".join(f"<div class=\"footer\">{f}</div>" for f in rng.sample(FOOTERS, 2))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<script>var _hmt = _hmt || []; (function() {{ var hm = 1; }})();</script></head>\n<body>\n"
            f"<div class=\"nav\">{nav}</div>\n<div class=\"content\">\n{body}\n</div>\n"
            f"<div class=\"share\">分享到：微信 微博 QQ空间</div>\n{foot}\n</body></html>")


def build(size_mb: float, out: Path, seed: int = 20240601, shard_mb: float = 8.0,
          copy_fraction: float = 0.12, noise_fraction: float = 0.04) -> dict:
    import opencc

    started = time.perf_counter()
    rng = random.Random(seed)
    s2t = opencc.OpenCC("s2t")
    real = load_real()
    pool = sentence_pool(real)
    alphabet = "".join(_HAN.findall("".join(rng.sample(pool, min(len(pool), 20000)))))  # frequency-weighted
    target = int(size_mb * 1e6)

    docs: list[dict] = []  # {id, text, domain, source}
    nbytes = 0

    def add(rec: dict) -> None:
        nonlocal nbytes
        docs.append(rec)
        nbytes += len(json.dumps(rec, ensure_ascii=False).encode()) + 1

    for r in real:
        add({"id": r["id"], "text": r["text"], "domain": r["domain"], "source": r["source"]})
    n_real = len(docs)
    # Each original gets one copy; a copy is ~copy_fraction of all documents. Originals are drawn
    # as the corpus grows so that the 100 MB and 200 MB corpora have the same mix per document.
    truth: list[dict] = []
    used: set[str] = set()
    kinds_cycle = 0
    real_eligible = [d for d in docs if eligible(d["text"])]
    rng.shuffle(real_eligible)
    n_remix = 0

    def plant(orig: dict) -> None:
        nonlocal kinds_cycle
        kind = KINDS[kinds_cycle % len(KINDS)]
        kinds_cycle += 1
        text = orig["text"]
        if kind == "exact":
            copy = text
        elif kind in EDIT_RATE:
            copy = edit(text, EDIT_RATE[kind], rng, alphabet)
        elif kind == "trad":
            copy = s2t.convert(text)
        else:
            copy = html_wrap(text, rng)
        cid = f"copy-{len(truth):07d}"
        add({"id": cid, "text": copy, "domain": orig["domain"], "source": orig["source"]})
        truth.append({"id": cid, "orig": orig["id"], "kind": kind})
        used.add(orig["id"])

    # copies of real documents: the same fraction as for remix documents
    for orig in real_eligible[: int(copy_fraction * len(real_eligible))]:
        plant(orig)
    while nbytes < target:
        text = remix(pool, rng)
        n_remix += 1
        rec = {"id": f"remix-{n_remix:07d}", "text": text, "domain": "news", "source": "remix"}
        add(rec)
        if rng.random() < copy_fraction and eligible(text):
            plant(rec)
    # web noise on documents that are neither originals nor copies
    noisy = 0
    for d in docs:
        if d["id"] not in used and not d["id"].startswith("copy-") and rng.random() < noise_fraction:
            d["text"] = html_wrap(d["text"], rng)
            noisy += 1
    rng.shuffle(docs)

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    shard, written, fh = 0, 0, None
    limit = int(shard_mb * 1e6)
    total = 0
    for d in docs:
        line = json.dumps(d, ensure_ascii=False) + "\n"
        b = len(line.encode())
        if fh is None or written + b > limit:
            if fh:
                fh.close()
            fh = open(tmp / "data" / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
            shard += 1
            written = 0
        fh.write(line)
        written += b
        total += b
    if fh:
        fh.close()
    with open(tmp / "truth.jsonl", "w", encoding="utf-8") as f:
        for t in truth:
            f.write(json.dumps(t) + "\n")
    meta = {
        "size_mb_target": size_mb, "bytes": total, "documents": len(docs), "shards": shard,
        "real_documents": n_real, "remix_documents": n_remix, "copies": len(truth),
        "copies_by_kind": {k: sum(t["kind"] == k for t in truth) for k in KINDS},
        "copies_of_real": sum(not t["orig"].startswith("remix-") for t in truth),
        "web_noise_documents": noisy, "sentence_pool": len(pool), "seed": seed, "shard_mb": shard_mb,
        "characters": sum(len(d["text"]) for d in docs),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--shard-mb", type=float, default=8.0)
    args = ap.parse_args()
    meta = build(args.size_mb, Path(args.out), args.seed, args.shard_mb)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
