"""Peak memory of a corpus build against the size of its largest input file.

    .venv/bin/python benchmarks/shard_memory.py --size-mb 32 --factor 4 --shard-mb 8

Writes one JSON-lines file of a SIZE MB corpus of real Chinese text with planted duplicates
(`make_bench_corpus.py`) and one of FACTOR such corpora (other seeds), then builds each with the default preset in a fresh process
(one worker, so the peak is one task's) twice: cut into shards of SHARD MB (`shard_bytes`), and
read whole (one shard per file, as before shards were bounded). Prints shards, documents,
seconds and peak RSS per run, and the ratio of the peaks across sizes: with shards the peak
should not grow with the file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = """
import json, resource, sys, time
from cleaning.build import CorpusBuild
from cleaning.config import load_preset
from cleaning.stages import run_local
config = load_preset("default").model_copy(update={"shard_bytes": int(sys.argv[3])})
start = time.perf_counter()
manifest = run_local(CorpusBuild([sys.argv[1]], sys.argv[2], config))
print(json.dumps({"shards": len(manifest["inputs"]), "documents": manifest["totals"]["input"],
                  "kept": manifest["totals"]["kept"], "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=32)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--shard-mb", type=float, default=8)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    from make_bench_corpus import build as make_corpus

    root = Path(args.workdir or tempfile.mkdtemp(prefix="shard-memory-"))
    rows = []
    # FACTOR × the input: FACTOR corpora of SIZE MB made with different seeds (different remixed
    # documents; the real documents recur, as exact duplicates across them), in one file.
    corpora = []
    for k in range(args.factor):
        corpus = root / f"corpus-{args.size_mb:g}-seed{k}"
        if not corpus.joinpath("corpus.json").exists():
            make_corpus(args.size_mb, corpus, seed=20240601 + k)
        corpora.append(corpus)
    for size, used in ((args.size_mb, corpora[:1]), (args.size_mb * args.factor, corpora)):
        whole = root / f"input-{size:g}" / "input.jsonl"  # one file
        if not whole.exists():
            whole.parent.mkdir(exist_ok=True)
            with open(whole, "wb") as out:
                for corpus in used:
                    for part in sorted((corpus / "data").glob("*.jsonl")):
                        out.write(part.read_bytes())
        files = [whole]
        for label, shard_bytes in (("shards", int(args.shard_mb * 2**20)), ("whole", 2**40)):
            out = root / f"out-{size:g}-{label}"
            done = subprocess.run([sys.executable, "-c", CHILD, str(files[0]), str(out), str(shard_bytes)],
                                  capture_output=True, text=True, cwd=HERE.parent, check=True)
            row = {"input_mb": round(files[0].stat().st_size / 1e6, 1), "mode": label,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| input MB | mode | shards | documents | seconds | peak RSS MB |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['input_mb']} | {r['mode']} | {r['shards']} | {r['documents']} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    for label in ("shards", "whole"):
        small, large = [r["peak_rss_mb"] for r in rows if r["mode"] == label]
        print(f"peak RSS {label}: {large / small:.2f}× for {args.factor}× the input")


if __name__ == "__main__":
    main()
