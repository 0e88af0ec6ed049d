"""Peak memory of packing against corpus size: packing streams, so it should not grow.

    python benchmarks/pack_memory.py --corpus runs/corpus --tokenizer runs/tokenizer/<version> --fractions 0.5,1

Each size packs the first fraction of the corpus's shards in a fresh process (so each peak RSS is
its own) and prints documents, tokens, seconds, tokens/s and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from tokenizer.config import PackConfig
from tokenizer.pack import pack_corpus
start = time.perf_counter()
summary = pack_corpus(PackConfig(input=sys.argv[1], output=sys.argv[2], tokenizer=sys.argv[3], workers=1))
print(json.dumps({"documents": summary["documents"], "tokens": summary["tokens"],
                  "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus version dir (data/part-*.parquet)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--fractions", default="0.5,1")
    args = parser.parse_args()
    shards = sorted((Path(args.corpus) / "data").glob("part-*.parquet"))
    print(f"{'shards':>6} {'MB':>8} {'documents':>10} {'tokens':>12} {'seconds':>8} {'Mtok/s':>7} {'peak RSS MB':>11}")
    for fraction in (float(f) for f in args.fractions.split(",")):
        chosen = shards[: max(1, round(len(shards) * fraction))]
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "corpus" / "data"
            data.mkdir(parents=True)
            for shard in chosen:
                (data / shard.name).symlink_to(shard.resolve())
            out = subprocess.run([sys.executable, "-c", CHILD, str(data.parent), str(Path(tmp) / "tokens"),
                                  args.tokenizer], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        mb = sum(s.stat().st_size for s in chosen) / 1e6
        print(f"{len(chosen):>6} {mb:>8.1f} {r['documents']:>10,} {r['tokens']:>12,} {r['seconds']:>8.1f} "
              f"{r['tokens'] / r['seconds'] / 1e6:>7.2f} {r['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()
