"""The `tokenizer` flow: train a jieba + sentencepiece tokenizer on a corpus, then pack the corpus.

Thin: `tokenizer.train` and `tokenizer.pack` do the work. Outputs are versioned by the corpus
version and the training config, so a rerun on the same corpus reuses the trained model and skips
packed shards, and a new corpus version gets new directories beside the old ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tokenizer.config import PackConfig, TokenizerTrainConfig
from tokenizer.specials import SPECIAL_PIECES


def corpus_version(corpus: str) -> str:
    """The corpus stage's version (manifest.json), or a hash of the path for other corpora."""
    manifest = Path(corpus) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["version"]
    return hashlib.sha256(str(Path(corpus).resolve()).encode()).hexdigest()[:16]


@task(name="train-tokenizer")
def train_task(config: TokenizerTrainConfig) -> dict[str, Any]:
    from tokenizer.train import train_tokenizer

    meta = train_tokenizer(config)
    training = meta.get("training", {})
    get_run_logger().info("tokenizer %s: vocab %d, %s lines sampled", config.output,
                          meta.get("options", {}).get("vocab_size", 0), training.get("sample_lines"))
    return meta


@task(name="pack-corpus")
def pack_task(config: PackConfig) -> dict[str, Any]:
    from tokenizer.pack import pack_corpus

    summary = pack_corpus(config)
    skipped = sum(1 for r in summary["shard_results"] if r["skipped"])
    get_run_logger().info("packed %d documents, %d tokens into %s (%d shards already done)",
                          summary["documents"], summary["tokens"], config.output, skipped)
    return summary


def domain_rows(summary: dict[str, Any], seq_len: int) -> list[dict[str, Any]]:
    rows = []
    for name, d in summary["domains"].items():
        rows.append({"domain": name, "id": d["id"], "documents": d["documents"], "tokens": d["tokens"],
                     "token_share": round(d["token_share"], 4),
                     "unk_rate": round(d["unk_tokens"] / d["tokens"], 6) if d["tokens"] else 0.0,
                     f"rows_of_{seq_len + 1}": d["tokens"] // seq_len,
                     "empty_documents": d["empty_documents"]})
    return rows


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(corpus: str, output: str, vocab_size: int = 40_000, model_type: str = "unigram",
                   input_sentence_size: int = 1_000_000, seq_len: int = 1024, workers: int = 2) -> dict[str, Any]:
    """Train the tokenizer on `corpus` and pack it into token shards under `output`."""
    train = TokenizerTrainConfig(input=corpus, output="-", vocab_size=vocab_size, model_type=model_type,
                                 input_sentence_size=input_sentence_size, workers=workers)
    key = f"{corpus_version(corpus)}-{train.fingerprint()[:8]}"
    root = Path(output)
    train = train.model_copy(update={"output": str(root / "tokenizer" / key)})
    meta = train_task(train)
    pack = PackConfig(input=corpus, output=str(root / "tokens" / key), tokenizer=train.output, workers=workers)
    summary = pack_task(pack)

    specials = ", ".join(f"{i} `{piece}`" for i, piece in enumerate(SPECIAL_PIECES))
    training = meta.get("training", {})
    create_markdown_artifact(key="tokenizer-summary", markdown="\n".join([
        f"# Tokenizer {key}",
        "",
        f"sentencepiece {meta['options']['model_type']}, vocabulary {meta['options']['vocab_size']:,}, "
        f"trained on {training.get('sample_lines', 0):,} sampled lines of `{corpus}`.",
        "",
        f"Special ids: {specials}.",
        "",
        f"Packed **{summary['documents']:,}** documents into **{summary['tokens']:,}** tokens "
        f"(`{pack.output}`).",
    ]), description="tokenizer and packing summary")
    create_table_artifact(key="tokens-per-domain", table=domain_rows(summary, seq_len),
                          description="tokens, unknown-token rate and training rows per domain")
    return {"version": key, "tokenizer": train.output, "tokens": pack.output,
            "documents": summary["documents"], "tokens_total": summary["tokens"]}


def train_from_cli(args: argparse.Namespace) -> int:
    from tokenizer.train import train_tokenizer

    config = TokenizerTrainConfig(input=args.corpus, output=args.output, vocab_size=args.vocab_size,
                                  model_type=args.model_type, input_sentence_size=args.input_sentence_size,
                                  workers=args.workers)
    meta = train_tokenizer(config)
    print(f"tokenizer written to {args.output} (vocab {meta['options']['vocab_size']:,}, "
          f"{meta['training']['sample_lines']:,} lines sampled)", file=sys.stderr)
    return 0


def pack_from_cli(args: argparse.Namespace) -> int:
    from tokenizer.pack import pack_corpus

    summary = pack_corpus(PackConfig(input=args.corpus, output=args.output, tokenizer=args.tokenizer,
                                     workers=args.workers))
    print(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens → {args.output}", file=sys.stderr)
    for row in domain_rows(summary, args.seq_len):
        print(f"  {row['domain']:>16}: {row['tokens']:>12,} tokens, {row[f'rows_of_{args.seq_len + 1}']:>9,} rows "
              f"of {args.seq_len + 1}, unk rate {row['unk_rate']:.2e}", file=sys.stderr)
    return 0


def flow_from_cli(args: argparse.Namespace) -> int:
    result = tokenizer_flow(corpus=args.corpus, output=args.output, vocab_size=args.vocab_size,
                            model_type=args.model_type, input_sentence_size=args.input_sentence_size,
                            workers=args.workers)
    print(json.dumps(result, indent=2), file=sys.stderr)
    return 0
