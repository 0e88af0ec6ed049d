"""The datatrove side of benchmarks/corpus_vs_datatrove.py (runs in datatrove's own venv).

This file is copied into the work directory and run there with `venv-datatrove/bin/python`; it
must not import anything from this project. The closest datatrove 0.10.1 equivalent of our
clean + filter + dedup chain:

  stage 1 (tasks = input files): JsonlReader -> LambdaFilter (>= 150 non-space characters and
          >= 60 % Han characters, our min_length and chinese_ratio rules) -> LanguageFilter
          (fastText lid.176, zh, threshold = our langid_min_score) -> JsonlWriter(filtered)
          -> MinhashDedupSignature
  stage 2 (tasks = num_buckets): MinhashDedupBuckets
  stage 3 (1 task): MinhashDedupCluster(save_cluster_id=True)
  stage 4 (tasks = input files): JsonlReader(filtered) -> MinhashDedupFilter(load_cluster_ids,
          exclusion_writer) -> JsonlWriter(deduped)

LanguageFilter's FT176LID downloads lid.176.bin from dl.fbaipublicfiles.com into its own cache
(`cached_asset_path_or_download`); there is no parameter for a local file, so LocalFT176 below
is the stock FT176LID with only the `model` property changed to load the local lid.176.ftz (the
same model file our side uses); `predict` (k=-1, all labels, whole text) is datatrove's own.

Tokenisation for MinHash (SPEC §9): `language="zh"` and `Languages.chinese` ("zho") map to a
WhitespaceTokenizer in 0.10.1's tokenizer_assignment.csv (the "FALSE" strings of the Latin-script
row are truthy and overwrite the Han-script entry), so a Chinese document is one "word" and has
no 5-gram at all. `--tokenizer cmn_Hani` gives spaCy + jieba words; `--tokenizer char` passes
a WordTokenizer that returns characters, i.e. character n-grams.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="char", help="char | cmn_Hani | zh | any datatrove language")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--lid", required=True)
    ap.add_argument("--lid-threshold", type=float, default=0.5)
    ap.add_argument("--min-chars", type=int, default=150)
    ap.add_argument("--min-ratio", type=float, default=0.60)
    args = ap.parse_args()

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from dt_steps import CharTokenizer, LocalLanguageFilter, han_rule

    probe = {lang: f"{type(tok).__name__}({tok.language})" for lang in ("zh", "zho", "cmn_Hani")
             for tok in [load_word_tokenizer(lang)]}
    print(f"[datatrove] tokenizer classes: {probe}", flush=True)
    tokenizer = CharTokenizer() if args.tokenizer == "char" else args.tokenizer

    out = args.out.rstrip("/")
    config = MinhashConfig(n_grams=args.ngram, num_buckets=args.buckets, hashes_per_bucket=args.rows,
                           hash_config=HashConfig(precision=64))
    stage1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(args.input, compression=None),
            LambdaFilter(han_rule(args.min_chars, args.min_ratio)),
            LocalLanguageFilter(args.lid, languages=["zh"], language_threshold=args.lid_threshold),
            JsonlWriter(f"{out}/filtered", output_filename="${rank}.jsonl", compression=None),
            MinhashDedupSignature(f"{out}/signatures", config=config, language=tokenizer),
        ],
        tasks=args.tasks, workers=args.workers, logging_dir=f"{out}/logs/1-filter-signatures")
    stage2 = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(f"{out}/signatures", f"{out}/buckets", config=config)],
        tasks=config.num_buckets, workers=args.workers, logging_dir=f"{out}/logs/2-buckets", depends=stage1)
    stage3 = LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=config, save_cluster_id=True)],
        tasks=1, workers=1, logging_dir=f"{out}/logs/3-cluster", depends=stage2)
    stage4 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(f"{out}/filtered", compression=None),
            MinhashDedupFilter(f"{out}/remove_ids", load_cluster_ids=True,
                               exclusion_writer=JsonlWriter(f"{out}/removed", output_filename="${rank}.jsonl",
                                                            compression=None)),
            JsonlWriter(f"{out}/deduped", output_filename="${rank}.jsonl", compression=None),
        ],
        tasks=args.tasks, workers=args.workers, logging_dir=f"{out}/logs/4-filter", depends=stage3)

    # run stage by stage (stage4.run() would run the chain too) to time each
    times = {}
    for name, ex in (("filter+signatures", stage1), ("buckets", stage2), ("cluster", stage3), ("dedup filter", stage4)):
        ex.depends = None
        t = time.perf_counter()
        ex.run()
        times[name] = round(time.perf_counter() - t, 2)
        print(f"[datatrove] {name}: {times[name]} s", flush=True)
    with open(f"{out}/stage_times.json", "w") as fh:
        json.dump({"stages": times, "tokenizers": probe, "tokenizer": args.tokenizer}, fh)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
