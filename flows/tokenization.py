"""The `tokenizer` flow: train a jieba + sentencepiece tokenizer on a corpus, then pack the corpus.

Thin: `tokenizer.train` and `tokenizer.pack` do the work. Outputs are versioned by the corpus
version and the training config, so a rerun on the same corpus reuses the trained model and skips
packed shards, and a new corpus version gets new directories beside the old ones.

(Not `flows/tokenizer.py`: a worker loads a deployment's entrypoint file with its folder on
`sys.path`, where a module of that name would hide the `tokenizer` package.)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from flows.lineage import record_asset
from flows.reports import png_markdown, tokens_per_domain_figure
from tokenizer.artifacts import MODEL_FILE
from tokenizer.config import PackConfig, TokenizerTrainConfig, local_directory
from tokenizer.corpus import CorpusError
from tokenizer.pack import DOMAINS_FILE, finish_packing, pack_shard, removed_shards_line, shard_stem, start_packing
from tokenizer.pangu import PanguTokenizer
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

    meta = train_tokenizer(config, progress=get_run_logger().info)
    training = meta.get("training", {})
    get_run_logger().info("tokenizer %s: vocab %d, %s lines sampled", config.output,
                          meta.get("options", {}).get("vocab_size", 0), training.get("sample_lines"))
    return meta


# -- packing: one task per corpus shard -----------------------------------------------------------
# The shard tasks of one flow run share one tokenizer, loaded on first use. Loading takes under a
# second (the segmenter's dictionary), but with `workers` > 1 its encoder processes take a second or
# more to start, per shard if each task loaded its own; and an object holding a process pool makes a
# poor task parameter (parameters are hashed for the cache key).
_TOKENIZERS: dict[str, PanguTokenizer] = {}


def _shared_tokenizer(path: str) -> PanguTokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = PanguTokenizer.load(path)
    return _TOKENIZERS[path]


def _release_tokenizer(path: str) -> None:
    """Stop the shared tokenizer's encoder processes; the next use loads it afresh."""
    tokenizer = _TOKENIZERS.pop(path, None)
    if tokenizer is not None:
        tokenizer.close()


def _pack_run_name() -> str:
    from prefect.runtime import task_run

    return f"pack-{shard_stem(task_run.parameters['shard'])}"


@task(name="plan-domain-ids")
def plan_packing_task(config: PackConfig) -> tuple[list[str], dict[str, int]]:
    """The corpus shards and the domain name → id map, fixed before any shard is packed."""
    _shared_tokenizer(config.tokenizer)  # a bad model file fails here, before any shard starts
    shards, domain_ids = start_packing(config)
    get_run_logger().info("%d corpus shards, domains %s", len(shards), domain_ids)
    return shards, domain_ids


def _may_pass_on_retry(task: Any, task_run: Any, state: Any) -> bool:
    """A damaged shard (`CorpusError`: not Parquet, no text column, a damaged page) fails the same way again:
    only other errors (a read that timed out) are retried."""
    return not isinstance(state.result(raise_on_failure=False), CorpusError)


# Reading a shard (any fsspec URI) can fail transiently; a rerun is safe: outputs are renamed into
# place and the completion marker is written last, so a retry redoes the shard or skips it.
@task(name="pack-shard", task_run_name=_pack_run_name, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_may_pass_on_retry)
def pack_shard_task(shard: str, config: PackConfig, domain_ids: dict[str, int]) -> dict[str, Any]:
    try:
        result = pack_shard(shard, config.output, _shared_tokenizer(config.tokenizer), domain_ids, config)
    except BaseException:
        # An encoder process that died leaves the pool broken: a retry must start a fresh one.
        _release_tokenizer(config.tokenizer)
        raise
    verb = "already packed" if result["skipped"] else f"{result['seconds']:.1f}s"
    get_run_logger().info("%s: %d documents, %d tokens (%s)", shard, result["documents"], result["tokens"], verb)
    return result


@task(name="summarize-tokens")
def summarize_task(config: PackConfig, domain_ids: dict[str, int], results: list[dict[str, Any]]) -> dict[str, Any]:
    """`domains.json` from the shard results, plus a short per-shard record (as `pack_corpus` returns)."""
    summary = finish_packing(config, _shared_tokenizer(config.tokenizer), domain_ids, results)
    skipped = sum(1 for r in results if r["skipped"])
    get_run_logger().info("packed %d documents, %d tokens into %s (%d shards already done)",
                          summary["documents"], summary["tokens"], config.output, skipped)
    if summary["removed_shards"]:
        get_run_logger().info("removed %s", removed_shards_line(summary["removed_shards"]))
    return summary


def pack_shards(config: PackConfig) -> dict[str, Any]:
    """Pack the corpus as one Prefect task per shard (inside a flow); returns what `pack_corpus` returns.

    Shards run one at a time: each one already keeps `config.workers` encoder processes busy, the
    shared tokenizer (and its process pool) is not thread-safe, and packing shards side by side would
    only start workers × shards processes on the same cores.
    """
    try:
        shards, domain_ids = plan_packing_task(config)
        progress = create_progress_artifact(progress=0.0, description="tokenizer: corpus shards packed")
        results = []
        for done, shard in enumerate(shards, start=1):
            results.append(pack_shard_task(shard, config, domain_ids))
            update_progress_artifact(progress, progress=100.0 * done / len(shards))
        return summarize_task(config, domain_ids, results)
    finally:
        _release_tokenizer(config.tokenizer)


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
                   input_sentence_size: int = 1_000_000, seq_len: int = 1024, workers: int = 2,
                   character_coverage: float = 0.9995) -> dict[str, Any]:
    """Train the tokenizer on `corpus` and pack it into token shards under `output`."""
    corpus = corpus.removeprefix("file://")  # a local corpus as its path: the same version as given as one
    train = TokenizerTrainConfig(input=corpus, output="-", vocab_size=vocab_size, model_type=model_type,
                                 input_sentence_size=input_sentence_size, workers=workers,
                                 character_coverage=character_coverage)
    key = f"{corpus_version(corpus)}-{train.fingerprint()[:8]}"
    root = Path(local_directory(output))  # a file:// URI as its path; another scheme refused
    train = train.model_copy(update={"output": str(root / "tokenizer" / key)})
    meta = train_task(train)
    corpus_manifest = Path(corpus) / "manifest.json"
    made_from = [corpus_manifest] if corpus_manifest.is_file() else []  # a corpus of the corpus stage
    tokenizer_model = Path(train.output) / MODEL_FILE
    record_asset(tokenizer_model, made_from, "tokenizer", "sentencepiece",
                 {"vocab_size": meta["options"]["vocab_size"], "model_type": meta["options"]["model_type"]})
    pack = PackConfig(input=corpus, output=str(root / "tokens" / key), tokenizer=train.output, workers=workers)
    summary = pack_shards(pack)
    record_asset(Path(pack.output) / DOMAINS_FILE, [*made_from, tokenizer_model], "token shards", "tokenizer",
                 {"tokens": summary["tokens"], "documents": summary["documents"]})

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
        "",
        png_markdown(tokens_per_domain_figure(summary), "tokens per domain"),
    ]), description="tokenizer and packing summary, with tokens per domain")
    create_table_artifact(key="tokens-per-domain", table=domain_rows(summary, seq_len),
                          description="tokens, unknown-token rate and training rows per domain")
    return {"version": key, "tokenizer": train.output, "tokens": pack.output,
            "documents": summary["documents"], "tokens_total": summary["tokens"]}


def _progress_on_stderr(stage: str) -> Callable[[str], None]:
    def progress(message: str) -> None:
        with contextlib.suppress(OSError):  # stderr gone (`2>&1 | head`): progress is no reason to fail the work
            print(f"[pangu] {stage}: {message}", file=sys.stderr, flush=True)

    return progress


def train_from_cli(args: argparse.Namespace) -> int:
    from tokenizer.train import train_tokenizer

    config = TokenizerTrainConfig(input=args.corpus, output=args.output, vocab_size=args.vocab_size,
                                  model_type=args.model_type, input_sentence_size=args.input_sentence_size,
                                  workers=args.workers, character_coverage=args.character_coverage)
    meta = train_tokenizer(config, progress=_progress_on_stderr("tokenizer"))
    print(f"tokenizer in {args.output} (vocab {meta['options']['vocab_size']:,}, "
          f"{meta['training']['sample_lines']:,} lines sampled)", file=sys.stderr)
    return 0


def pack_from_cli(args: argparse.Namespace) -> int:
    from tokenizer.pack import pack_corpus

    summary = pack_corpus(PackConfig(input=args.corpus, output=args.output, tokenizer=args.tokenizer,
                                     workers=args.workers), progress=_progress_on_stderr("pack"))
    print(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens → {args.output}", file=sys.stderr)
    if summary["removed_shards"]:
        print(f"removed {removed_shards_line(summary['removed_shards'])}", file=sys.stderr)
    for row in domain_rows(summary, args.seq_len):
        print(f"  {row['domain']:>16}: {row['tokens']:>12,} tokens, {row[f'rows_of_{args.seq_len + 1}']:>9,} rows "
              f"of {args.seq_len + 1}, unk rate {row['unk_rate']:.2e}", file=sys.stderr)
    return 0


def flow_from_cli(args: argparse.Namespace) -> int:
    result = tokenizer_flow(corpus=args.corpus, output=args.output, vocab_size=args.vocab_size,
                            model_type=args.model_type, input_sentence_size=args.input_sentence_size,
                            workers=args.workers, character_coverage=args.character_coverage)
    print(json.dumps(result, indent=2), file=sys.stderr)
    return 0
