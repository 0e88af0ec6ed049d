"""Tokenizer throughput: encoding (PanguTokenizer vs the reference loop), packing, the sampling pass,
training time.

    python benchmarks/tokenizer_throughput.py --mb 4 --workers 2 --sample-mb 200

Text: JSONL files with a `text` field (default: the registry sample in /tmp/sample, as written by
`pangu data fetch-sample`), else CLUE text from ../shared/data/clue. The ids of every encoder are
asserted equal to the reference loop's (`reference_encode`: per document jieba.cut → map → join →
sp.encode) in the same run; the sampling pass (`sample_corpus`, every line of a corpus of `--sample-mb`
read by 1 and by `--workers` processes) is timed beside a one-process reservoir over the same shards
(Algorithm R, as the trainer sampled before), and gives one sample for any worker count. Caches start cold: each encoder is new, and the worker pool is warmed
on unrelated text only to exclude process start-up (reported separately).
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jieba  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tokenizer.config import PackConfig  # noqa: E402
from tokenizer.pack import pack_corpus  # noqa: E402
from tokenizer.corpus import iter_texts  # noqa: E402
from tokenizer.pangu import PanguTokenizer, reference_encode  # noqa: E402
from tokenizer.sampling import sample_corpus  # noqa: E402
from tokenizer.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402

CLUE = ROOT.parent / "shared" / "data" / "clue"


def load_texts(patterns: list[str], megabytes: float) -> tuple[list[str], list[str]]:
    """Documents (and their domains) up to `megabytes` of UTF-8, taken round-robin over the files."""
    files = sorted(f for p in patterns for f in glob.glob(p))
    streams = [open(f, encoding="utf-8") for f in files]
    texts, domains, size = [], [], 0
    while streams and size < megabytes * 1e6:
        for fh in list(streams):
            line = fh.readline()
            if not line:
                streams.remove(fh)
                continue
            record = json.loads(line)
            text = record.get("text") or record.get("sentence") or record.get("abst") or record.get("content")
            if text:
                texts.append(text)
                domains.append(record.get("domain") or Path(fh.name).parent.name)
                size += len(text.encode("utf-8"))
    return texts, domains


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def row(name: str, seconds: float, megabytes: float, note: str = "") -> str:
    return f"| {name:<46} | {seconds:8.2f} | {megabytes / seconds:7.2f} | {note} |"


def reservoir(corpus: str, size: int, seed: int) -> list[str]:
    """The reference: one process, Algorithm R over the lines of every document in shard order."""
    rng, sample, seen = random.Random(seed), [], 0
    for text in iter_texts(corpus):
        for line in text.split("\n"):
            if not line or line.isspace():
                continue
            seen += 1
            if len(sample) < size:
                sample.append(line)
            elif (j := rng.randrange(seen)) < size:
                sample[j] = line
    return sample


def sampling_rows(texts: list[str], megabytes: float, workers: int, size: int, work: Path) -> list[str]:
    """The sampling pass over 8 shards of `megabytes` (the text repeated), by 1 and `workers` processes."""
    corpus = work / "sampling" / "data"
    corpus.mkdir(parents=True, exist_ok=True)
    per_shard, shards = megabytes / 8, []
    for i in range(8):
        part, part_size, j = [], 0.0, i
        while part_size < per_shard * 1e6:
            part.append(texts[j % len(texts)])
            part_size += len(part[-1].encode("utf-8"))
            j += 7
        pq.write_table(pa.table({"text": part}), corpus / f"part-{i:05d}.parquet")
        shards.append(part_size)
    total = sum(shards) / 1e6
    rows = []
    start = time.perf_counter()
    reservoir(str(corpus.parent), size, seed=1)
    reference = time.perf_counter() - start
    rows.append(row("reservoir over iter_texts (reference)", reference, total, "1 process"))
    samples = {}
    for n in sorted({1, workers}):
        start = time.perf_counter()
        samples[n], counts = sample_corpus(str(corpus.parent), "text", size, shuffle=True, seed=1, workers=n)
        seconds = time.perf_counter() - start
        rows.append(row(f"sample_corpus, workers={n}", seconds, total,
                        f"{reference / seconds:.2f}x, {counts['lines_seen']:,} lines, {len(samples[n]):,} kept"))
    assert len(set(map(tuple, samples.values()))) == 1, "the sample depends on the number of workers"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="*", default=None, help="JSONL globs (default /tmp/sample/*/*.jsonl or CLUE)")
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text to encode")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--sample-mb", type=float, default=200.0, help="megabytes of the sampling pass's corpus")
    parser.add_argument("--sample-lines", type=int, default=1_000_000, help="lines the sampling pass keeps")
    parser.add_argument("--train-lines", default="5000,20000,50000", help="sample sizes for the training table")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    patterns = args.input or (
        ["/tmp/sample/*/*.jsonl"] if glob.glob("/tmp/sample/*/*.jsonl") else [str(CLUE / "fewclue" / "*" / "test_public.json")]
    )
    texts, domains = load_texts(patterns, args.mb)
    size = mb(texts)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokenizer-bench-"))
    print(f"text: {len(texts)} documents, {size:.2f} MB from {patterns}; workdir {work}")
    jieba.initialize()  # dictionary loading is outside every timing

    # -- training time vs sample size ----------------------------------------------------------
    train_rows = []
    model_dir = None
    for lines in [int(x) for x in args.train_lines.split(",")]:
        out = work / f"tok-{lines}"
        config = TokenizerTrainConfig(output=str(out), vocab_size=args.vocab_size, model_type=args.model_type,
                                      input_sentence_size=lines, character_coverage=0.9995, overwrite=True)
        start = time.perf_counter()
        try:
            meta = train_tokenizer(config, texts)
        except Exception as exc:  # too little text for the vocabulary at this size
            train_rows.append(f"| {lines:>9} | {'-':>9} | {'-':>10} | {'-':>8} | failed: {str(exc)[:60]} |")
            continue
        seconds = meta["training"]["seconds"]
        train_rows.append(f"| {meta['training']['sample_lines']:>9} | {seconds['segment']:9.2f} | {seconds['train']:10.2f} "
                          f"| {time.perf_counter() - start:8.2f} | |")
        model_dir = out
    if model_dir is None:
        raise SystemExit("no tokenizer could be trained on this text")

    # -- encoding ------------------------------------------------------------------------------
    enc_rows = []
    sp = PanguTokenizer.load(model_dir).sp
    start = time.perf_counter()
    expected = [reference_encode(sp, t) for t in texts]
    reference = time.perf_counter() - start
    enc_rows.append(row("reference loop (jieba.cut, sp.encode per doc)", reference, size, "1 process"))

    tok = PanguTokenizer.load(model_dir)
    start = time.perf_counter()
    got = tok.encode_batch(texts, workers=1)
    one = time.perf_counter() - start
    assert got == expected, "encode_batch(workers=1) differs from the reference"
    enc_rows.append(row("PanguTokenizer.encode_batch, workers=1", one, size, f"{reference / one:.2f}x, ids identical"))

    tok = PanguTokenizer.load(model_dir)
    start = time.perf_counter()
    tok.encode_batch(["热身文本，与基准无关。"], workers=args.workers)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    got = tok.encode_batch(texts, workers=args.workers)
    many = time.perf_counter() - start
    assert got == expected, f"encode_batch(workers={args.workers}) differs from the reference"
    enc_rows.append(row(f"PanguTokenizer.encode_batch, workers={args.workers}", many, size,
                        f"{reference / many:.2f}x, ids identical; pool start {startup:.1f} s"))
    start = time.perf_counter()
    got = tok.encode_batch(texts, workers=args.workers)
    warm = time.perf_counter() - start
    assert got == expected
    enc_rows.append(row("  same text again (block caches warm)", warm, size, f"{reference / warm:.2f}x, not a fair figure"))
    tok.close()

    # -- packing -------------------------------------------------------------------------------
    corpus = work / "corpus" / "data"
    corpus.mkdir(parents=True, exist_ok=True)
    half = len(texts) // 2
    for i, (lo, hi) in enumerate([(0, half), (half, len(texts))]):
        pq.write_table(pa.table({"text": texts[lo:hi], "domain": domains[lo:hi]}), corpus / f"part-{i:05d}.parquet")
    pack_rows = []
    for workers in (1, args.workers):
        packer = PanguTokenizer.load(model_dir)
        if workers > 1:
            packer.encode_batch(["热身文本。"], workers=workers)  # pool start-up, reported above
        start = time.perf_counter()
        summary = pack_corpus(PackConfig(input=str(work / "corpus"), output=str(work / f"tokens-{workers}"),
                                         tokenizer=str(model_dir), workers=workers), tokenizer=packer)
        seconds = time.perf_counter() - start
        packer.close()
        pack_rows.append(row(f"pack_corpus, workers={workers}", seconds, size,
                             f"{summary['tokens'] / seconds / 1e6:.2f} M tokens/s, {summary['tokens']} tokens, "
                             f"{summary['documents']} documents"))

    print("\n## Encoding (2 cores shared)\n")
    print(f"| {'encoder':<46} | {'seconds':>8} | {'MB/s':>7} | note |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 9}|------|")
    print("\n".join(enc_rows))
    print(f"\n## Sampling pass ({args.sample_mb:.0f} MB in 8 shards, {args.sample_lines:,} lines kept)\n")
    print(f"| {'sampler':<46} | {'seconds':>8} | {'MB/s':>7} | note |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 9}|------|")
    print("\n".join(sampling_rows(texts, args.sample_mb, args.workers, args.sample_lines, work)))
    print("\n## Packing\n")
    print(f"| {'packer':<46} | {'seconds':>8} | {'MB/s':>7} | note |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 9}|------|")
    print("\n".join(pack_rows))
    print(f"\n## sentencepiece training ({args.model_type}, vocab {args.vocab_size}), seconds\n")
    print("| lines     | jieba seg | sp train   | total    | |")
    print("|-----------|-----------|------------|----------|-|")
    print("\n".join(train_rows))


if __name__ == "__main__":
    main()
