"""Accuracy and speed of cleaning.dedup on real Chinese text with planted duplicates.

Builds a corpus from CLUE text (csl abstracts, iflytek app descriptions, c3 passages, cmrc2018
contexts), plants exact copies (whitespace / punctuation / full-width changes) and near copies with
1 / 2 / 5 % random character edits (substitutions, insertions, deletions), shuffles everything into
shards, runs map -> reduce -> cluster, and prints precision, recall per edit level, false-positive
clusters, throughput and peak RSS.

Ground truth needs a base pool of mutually unrelated documents, and CLUE is not: iflytek repeats
app descriptions between its splits and has templates. So the pool is first cleaned of documents
whose character 3-gram Jaccard with an earlier one is >= --related (candidates from a very
sensitive banding with its own seed, then the exact Jaccard of the n-gram sets).

    .venv/bin/python benchmarks/dedup_accuracy.py --shards 4
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cleaning import dedup  # noqa: E402
from cleaning.dedup import band_keys  # noqa: E402
from cleaning.dedup_config import DedupConfig  # noqa: E402
from cleaning.minhash import MinHasher, normalize  # noqa: E402
from make_bench_corpus import edit  # noqa: E402  (a sibling script in benchmarks/)

# ../shared beside the repository (SPEC: shared data is read in place, never copied).
CLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clue"
LEVELS = (0.01, 0.02, 0.05)


def load_pool(root: Path, min_chars: int) -> list[str]:
    texts: list[str] = []
    few = root / "fewclue"
    for task, field in (("csl", "abst"), ("iflytek", "sentence")):
        for f in sorted((few / task).glob("*.json")):
            with open(f, encoding="utf-8") as fh:
                texts += [json.loads(line)[field] for line in fh if line.strip()]
    for f in sorted((root / "c3").glob("c3-*-train.json")):
        texts += ["".join(item[0]) for item in json.loads(f.read_text(encoding="utf-8"))]
    for f in sorted((root / "cmrc2018").glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))["data"]
        texts += [p["context"] for d in data for p in d["paragraphs"]]
    seen, pool = set(), []
    for t in texts:
        key = normalize(t)
        if len(key) >= min_chars and key not in seen:
            seen.add(key)
            pool.append(t)
    return pool


def shingles(text: str, n: int) -> set[str]:
    t = normalize(text)
    return {t} if len(t) < n else {t[i:i + n] for i in range(len(t) - n + 1)}


def drop_related(pool: list[str], related: float, n: int = 3) -> tuple[list[str], int]:
    """Remove every document with true n-gram Jaccard >= related to an earlier kept one."""
    probe = DedupConfig(ngram=n, bands=80, rows_per_band=3, seed=987654)  # J 0.3 -> 0.89, 0.4 -> 0.99
    sigs = MinHasher(probe).signatures(pool)
    keys = band_keys(sigs, probe)
    candidates: set[tuple[int, int]] = set()
    for b in range(probe.bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        bounds = np.flatnonzero(np.r_[True, k[1:] != k[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi - lo > 1:
                members = sorted(order[lo:hi].tolist())
                if len(members) <= 50:  # all pairs of a bucket; a huge bucket only as a star
                    candidates.update((a, c) for i, a in enumerate(members) for c in members[i + 1:])
                else:
                    candidates.update((members[0], m) for m in members[1:])
    cache: dict[int, set[str]] = {}
    drop: set[int] = set()
    for a, b in sorted(candidates):
        if a in drop or b in drop:
            continue
        sa = cache.setdefault(a, shingles(pool[a], n))
        sb = cache.setdefault(b, shingles(pool[b], n))
        if len(sa & sb) / len(sa | sb) >= related:
            drop.add(b)
    return [t for i, t in enumerate(pool) if i not in drop], len(drop)


def exact_variant(text: str, rng: random.Random) -> str:
    """Same normalised text: spaces, changed punctuation, full-width ASCII."""
    out = []
    for ch in text:
        r = rng.random()
        if ch in "，。" and r < 0.5:
            out.append({"，": ",", "。": "."}[ch] + " ")
        elif "!" <= ch <= "~" and r < 0.5:
            out.append(chr(ord(ch) + 0xFEE0))  # NFKC folds it back
        else:
            out.append(ch)
            if r < 0.03:
                out.append(rng.choice(" \u3000\t"))
    return "".join(out)


def build_corpus(pool: list[str], copies: float, rng: random.Random):
    """(docs, group of each doc, planted: list of (original index, copy index, level))."""
    alphabet = "".join(ch for ch in "".join(pool[:500]) if unicodedata.category(ch) == "Lo")
    docs, group, planted = [], [], []
    kinds = ["exact", *LEVELS]
    for g, text in enumerate(pool):
        docs.append(text)
        group.append(g)
        if rng.random() < copies:
            kind = rng.choice(kinds)
            planted.append((len(docs) - 1, len(docs), kind))
            docs.append(exact_variant(text, rng) if kind == "exact" else edit(text, kind, rng, alphabet))
            group.append(g)
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    docs = [docs[i] for i in order]
    group = [group[i] for i in order]
    planted = [(where[a], where[b], k) for a, b, k in planted]
    return docs, group, planted


def signature_speed(pool: list[str], config: DedupConfig, count: int, chars: int = 1000) -> float:
    text = "".join(pool)
    docs = [text[(i * chars) % (len(text) - chars):][:chars] for i in range(count)]
    hasher = MinHasher(config)
    hasher.signatures(docs[:50])
    started = time.perf_counter()
    hasher.signatures(docs)
    return count / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=CLUE)
    ap.add_argument("--docs", type=int, default=0, help="originals to use (0: the whole cleaned pool)")
    ap.add_argument("--copies", type=float, default=0.5, help="fraction of originals given one planted copy")
    ap.add_argument("--min-chars", type=int, default=100)
    ap.add_argument("--related", type=float, default=0.25,
                    help="pool documents with true 3-gram Jaccard >= this to another are dropped")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--speed-docs", type=int, default=5000, help="1,000-character documents for the signature speed")
    ap.add_argument("--work", type=str, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ngram", type=int)
    ap.add_argument("--bands", type=int)
    ap.add_argument("--rows-per-band", type=int)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--partitions", type=int)
    args = ap.parse_args()

    overrides = {k: getattr(args, k) for k in ("ngram", "bands", "rows_per_band", "threshold", "partitions")
                 if getattr(args, k) is not None}
    config = DedupConfig(**overrides)
    rng = random.Random(args.seed)

    pool = load_pool(args.data, args.min_chars)
    rng.shuffle(pool)
    pool, related = drop_related(pool, args.related)
    if args.docs:
        pool = pool[:args.docs]
    docs, group, planted = build_corpus(pool, args.copies, rng)
    shards = np.array_split(np.arange(len(docs)), args.shards)

    work = args.work or tempfile.mkdtemp(prefix="dedup-bench-")
    started = time.perf_counter()
    for s, rows in enumerate(shards):
        dedup.map_shard(work, s, [docs[i] for i in rows], config)
    mapped = time.perf_counter()
    for p in range(config.partitions):
        dedup.reduce_partition(work, p, config)
    reduced = time.perf_counter()
    summary = dedup.cluster(work, len(shards), config)
    finished = time.perf_counter()

    # survivor of every document, as a corpus index
    base = np.cumsum([0] + [len(r) for r in shards])
    survivor = list(range(len(docs)))
    kinds: dict[int, str] = {}
    for s in range(len(shards)):
        for row, (ss, sr, kind) in dedup.load_duplicates(work, s).items():
            survivor[base[s] + row] = int(base[ss] + sr)
            kinds[int(base[s] + row)] = kind
    removed = [i for i in range(len(docs)) if survivor[i] != i]
    correct = sum(group[i] == group[survivor[i]] for i in removed)
    members: dict[int, set[int]] = defaultdict(set)
    for i in range(len(docs)):
        members[survivor[i]].add(group[i])
    fp_clusters = sum(len(g) > 1 for g in members.values())

    found: Counter = Counter()
    total: Counter = Counter()
    for a, b, kind in planted:
        total[kind] += 1
        found[kind] += survivor[a] == survivor[b]
    sig_speed = signature_speed(pool, config, args.speed_docs)
    chars = sum(len(d) for d in docs)

    print(f"config: ngram={config.ngram} bands={config.bands} rows={config.rows_per_band} "
          f"perm={config.num_perm} threshold={config.threshold} partitions={config.partitions}")
    print(f"corpus: {len(docs)} docs ({len(pool)} originals, {related} related pool docs dropped), "
          f"{chars / len(docs):.0f} chars/doc on average, {len(shards)} shards")
    print()
    print(f"{'metric':<40}value")
    print("-" * 64)
    def recall(kind: object) -> str:
        return f"{found[kind] / max(total[kind], 1):.4f} ({found[kind]}/{total[kind]})"

    rows_out = [
        ("precision (removed docs, right group)", f"{correct / max(len(removed), 1):.4f}"),
        ("removed docs", f"{len(removed)}"),
        ("false-positive clusters", f"{fp_clusters}"),
        ("recall exact copies", recall("exact")),
        *[(f"recall near copies, {int(level * 100)} % edits", recall(level)) for level in LEVELS],
        ("clusters / exact / near (summary)",
         f"{summary.clusters} / {summary.exact_duplicates} / {summary.near_duplicates}"),
        ("pairs checked / confirmed", f"{summary.pairs_checked} / {summary.pairs_confirmed}"),
        ("chain splits", f"{summary.chain_splits}"),
        ("signatures, 1,000-char docs/s (1 core)", f"{sig_speed:,.0f}"),
        ("whole dedup docs/s", f"{len(docs) / (finished - started):,.0f}"),
        ("  map / reduce / cluster s", f"{mapped - started:.2f} / {reduced - mapped:.2f} / {finished - reduced:.2f}"),
        ("peak RSS MiB", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"),
    ]
    for name, value in rows_out:
        print(f"{name:<40}{value}")


if __name__ == "__main__":
    main()
