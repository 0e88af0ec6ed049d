"""Peak memory of the dedup reduce of one partition against the number of documents.

    .venv/bin/python benchmarks/dedup_memory.py --docs 50000 --factor 4 --block 65536

Maps DOCS and FACTOR x DOCS synthetic documents (random CJK text of 200-400 characters, a tenth
exact copies and a tenth near copies) into one partition (`dedup.map_shard`, SHARDS shards), then
runs `dedup.reduce_partition` of that partition in a fresh process, twice per size: with blocks of
BLOCK bucket records (DedupConfig.reduce_block_records), and with one block holding the whole
partition (what the reduce did before it streamed). Prints the partition's records, seconds, the
peak of the arrays the reduce allocates (tracemalloc, which numpy reports to), the peak RSS and
its excess over the RSS after the imports, and the ratios across the sizes: with blocks the heap
should not grow with the documents. RSS does grow some: it counts the resident pages of the
memory-mapped bucket and signature files, which the kernel can drop (page cache, not heap).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time, tracemalloc
from cleaning import dedup
from cleaning.dedup_config import DedupConfig
def rss():  # this process image's peak (ru_maxrss would keep the forking parent's across exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
config = DedupConfig(partitions=1, reduce_block_records=int(sys.argv[2]))
imported = rss()
tracemalloc.start()  # numpy reports its buffers to it: the peak of what the reduce materialises
start = time.perf_counter()
dedup.reduce_partition(sys.argv[1], 0, config)
seconds = time.perf_counter() - start
heap = tracemalloc.get_traced_memory()[1] / 2**20
stats = json.load(open(sys.argv[1] + "/pairs/p000.json"))
print(json.dumps({"records": stats["records"], "confirmed": stats["confirmed"], "seconds": seconds,
                  "heap_mb": heap, "peak_rss_mb": rss(), "over_imports_mb": rss() - imported}))
"""


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 3000)])
    texts = ["".join(rng.choice(alphabet, int(rng.integers(200, 400)))) for _ in range(n)]
    for i in rng.choice(n, n // 10, replace=False):  # exact copies
        texts[i] = texts[int(rng.integers(n))]
    for i in rng.choice(n, n // 10, replace=False):  # near copies: 3 % of the characters replaced
        chars = list(texts[int(rng.integers(n))])
        for k in rng.choice(len(chars), len(chars) * 3 // 100, replace=False):
            chars[k] = str(rng.choice(alphabet))
        texts[i] = "".join(chars)
    return texts


def _map(work: Path, docs: int, shards: int, seed: int) -> None:
    from cleaning import dedup
    from cleaning.dedup_config import DedupConfig

    texts = _texts(docs, seed)
    for s in range(shards):
        dedup.map_shard(str(work), s, texts[s::shards], DedupConfig(partitions=1))


def _reduce(work: Path, block: int) -> dict:
    for old in (work / "pairs").glob("*"):
        old.unlink()
    out = subprocess.run([sys.executable, "-c", CHILD, str(work), str(block)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--block", type=int, default=1 << 16, help="reduce_block_records of the streaming runs")
    args = parser.parse_args()

    whole = 1 << 62
    rows = []
    with tempfile.TemporaryDirectory(prefix="dedup-memory-") as tmp:
        for docs in (args.docs, args.docs * args.factor):
            work = Path(tmp) / str(docs)
            _map(work, docs, args.shards, seed=docs)
            for block in (args.block, whole):
                rows.append({"docs": docs, "block": "whole partition" if block == whole else str(block),
                             **_reduce(work, block)})
    print(f"{'documents':>10} {'records':>10} {'block':>16} {'pairs':>7} {'seconds':>8} {'heap MB':>8} "
          f"{'peak RSS MB':>12} {'over imports MB':>16}")
    for r in rows:
        print(f"{r['docs']:>10} {r['records']:>10} {r['block']:>16} {r['confirmed']:>7} {r['seconds']:>8.2f} "
              f"{r['heap_mb']:>8.1f} {r['peak_rss_mb']:>12.1f} {r['over_imports_mb']:>16.1f}")
    for block in dict.fromkeys(r["block"] for r in rows):
        small, large = [r for r in rows if r["block"] == block]
        print(f"block {block}: {args.factor}x the documents, {large['heap_mb'] / small['heap_mb']:.2f}x the heap, "
              f"{large['over_imports_mb'] / max(small['over_imports_mb'], 0.1):.2f}x the RSS over imports")


if __name__ == "__main__":
    main()
