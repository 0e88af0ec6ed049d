"""Run tasks with zero-, one- or few-shot prompts and collect a results dict.

Few-shot: for every evaluated example, K demonstrations are drawn from the task's train split with a
generator seeded by (seed, task, example id): the same seed gives the same prompts. The
demonstrations are the gold-filled templates, joined by `separator` and followed by it. When the
evaluated split is the train split itself (C3 here), the example is never its own demonstration.

`limit` evaluates a seeded random subset of that many examples (FewCLUE files are sorted by label, so
the first N would all share one label).

Scorers: `ModelScorer` (a model and its tokenizer) and `OracleScorer` (reads the gold label: the
harness, templates and metrics must then reach 100 %).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from cleaning.errors import ReportedFailure
from pangu_model.run_lock import claim_output

from . import metrics
from .loaders import DataNotFound, DataUnreadable, Skipped, clear_cache, require_data_dir
from .report import RESULTS_FILE, require_output_dir, write_outputs
from .resume import KEEP_EVERY_S, drop_other_runs, finished_tasks, keep_partial, keep_task, partial_predictions
from .scoring import EOT_ID, NEWLINE_ID, VARIANTS, CandidateScore, generate_ids, rank, score_candidates, truncate_left
from .tasks import BUILTIN_TASKS, Item, Task, chance_level, resolve_tasks

PRIMARY_VARIANT = "mean_token"


class Scorer(Protocol):
    name: str

    def score(self, context: str, item: Item) -> list[CandidateScore]: ...

    def generate(self, context: str, item: Item, task: Task, seed: int) -> str: ...


class OracleScorer:
    """Reads the gold answer: a correct harness must give 100 % on every task."""

    name = "oracle"

    def score(self, context: str, item: Item) -> list[CandidateScore]:
        return [CandidateScore(loss=0.0 if i == item.gold else 1.0, tokens=1, chars=1, greedy=i == item.gold)
                for i in range(len(item.candidates))]

    def generate(self, context: str, item: Item, task: Task, seed: int) -> str:
        return item.answers[0]


class ModelScorer:
    """Perplexity ranking and generation with a PanguModel and a PanguTokenizer."""

    name = "model"

    def __init__(self, model, tokenizer, *, share_prefix: bool = True, min_shared: int = 16,
                 max_new_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.share_prefix = share_prefix
        self.min_shared = min_shared
        self.max_new_tokens = max_new_tokens
        self._encode = lru_cache(maxsize=200_000)(lambda text: tuple(tokenizer.encode(text)) if text else ())

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def score(self, context: str, item: Item) -> list[CandidateScore]:
        prefix = [EOT_ID, *self.encode(context)]
        texts = [self.encode(c) for c in item.candidates]
        return score_candidates(self.model, prefix, texts, [len(c) for c in item.candidates],
                                share_prefix=self.share_prefix, min_shared=self.min_shared)

    def generate(self, context: str, item: Item, task: Task, seed: int) -> str:
        settings = dict(task.decoding or {})
        max_new = self.max_new_tokens or task.max_new_tokens
        room = max(self.model.config.max_seq_len - max_new, 1)
        prompt = truncate_left([EOT_ID, *self.encode(context), *self.encode(item.prompt)], room)
        new = generate_ids(self.model, prompt, max_new, seed=seed, stop_ids=(EOT_ID, NEWLINE_ID), **settings)
        return self.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(zlib.crc32("\x1f".join(str(p) for p in (seed, *parts)).encode("utf-8")))


@dataclass
class TaskRun:
    """Everything one task produced: the summary and the per-example predictions (of which the first `resumed`
    came from what an unfinished run kept)."""

    summary: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0


def skipped_fields(skipped: Skipped) -> dict[str, Any]:
    """What a task summary says of the records its data file held that it did not use: `skipped` (reason →
    count) and `skipped_examples` (the first few, `file:line: reason (detail)`)."""
    return {"skipped": dict(skipped.counts), "skipped_examples": list(skipped.examples)}


def _summary_base(task: Task, shots: int, seed: int) -> dict[str, Any]:
    """What every task summary says of the task, however its run ended."""
    base: dict[str, Any] = {
        "task": task.name, "title": task.title, "method": task.method, "metric": task.metric,
        "template": task.template, "candidates": task.candidates, "extra": task.extra, "shots": shots,
        "seed": seed, "reference": task.reference, "notes": task.notes,
    }
    if task.method == "gen":
        base["decoding"] = {**(task.decoding or {}), "max_new_tokens": task.max_new_tokens, "stop": ["<eot>", "\\n"]}
    return base


def failed_task_run(task: Task, error: BaseException, *, shots: int = 0, seed: int = 1234) -> TaskRun:
    """The summary of a task whose run raised `error` (status `failed`), for an orchestrator that runs
    tasks one by one and reports a crash without losing the other tasks' results."""
    message = f"{type(error).__name__}: {error}"
    return TaskRun({**_summary_base(task, shots, seed), "status": "failed", "message": message})


def run_task(
    task: Task,
    scorer: Scorer,
    data_dir: str,
    *,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    split: str = "eval",
    separator: str = "\n",
    progress: Callable[[str, int, int], None] | None = None,
    resumed: Sequence[dict[str, Any]] = (),
    keep: Callable[[list[dict[str, Any]]], None] | None = None,
    keep_every_s: float = KEEP_EVERY_S,
) -> TaskRun:
    """One task: its summary and per-example predictions. `resumed`: the predictions an unfinished run of the
    same task and settings kept (`evaluation.resume`); the examples they cover are not scored again.
    `keep(predictions so far)` is called every `keep_every_s` seconds and when the run stops (an exception, a
    Ctrl-C, a SIGTERM raised as an exception)."""
    started = time.perf_counter()
    base = _summary_base(task, shots, seed)
    try:
        data = task.load(data_dir, split, seed)
    except DataNotFound as exc:
        return TaskRun({**base, "status": "not_found", "message": str(exc)})
    items = data.items
    if limit is not None and limit < len(items):
        chosen = sorted(_rng(seed, task.name, "limit").sample(range(len(items)), limit))
        items = [items[i] for i in chosen]
    skipped = skipped_fields(data.skipped)
    if not items:
        why = f" ({data.skipped.total} records skipped: see skipped)" if data.skipped.total else ""
        return TaskRun({**base, "status": "empty", "message": f"no labelled examples in {data.path}{why}", **skipped})

    train: list[Item] = []
    if shots > 0:
        try:
            train_data = task.load(data_dir, "train", seed)
        except DataNotFound as exc:
            return TaskRun({**base, "status": "not_found", "message": f"{shots}-shot needs a train split: {exc}"})
        train = train_data.items
        same_split = train_data.path == data.path
        if train_data.skipped.total and not same_split:  # the demonstrations' file: its records, accounted apart
            skipped.update({f"train_{key}": value for key, value in skipped_fields(train_data.skipped).items()})

    predictions: list[dict[str, Any]] = []
    correct = {v: 0 for v in VARIANTS}
    totals: dict[str, float] = {}

    def count(prediction: dict[str, Any], scores: dict[str, float]) -> None:
        """Add one example's prediction; `scores`: a generation task's per-example scores (held in it too)."""
        predictions.append(prediction)
        if task.method == "ppl":
            for v in VARIANTS:
                correct[v] += int(prediction["pred_by"][v] == prediction["gold"])
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + value

    for prediction, item in zip(resumed, items):
        if prediction.get("id") != item.id:  # kept from other data: scored again from here
            break
        count(prediction, {} if task.method == "ppl" else
              metrics.generation_scores(task.metric, prediction["answers"], prediction["prediction"]))
    kept = resumed_count = len(predictions)
    last_keep = time.monotonic()
    if kept and progress is not None:
        progress(task.name, kept, len(items))  # where this run starts
    try:
        for index in range(len(predictions), len(items)):
            item = items[index]
            context = ""
            if shots > 0:
                pool = [d for d in train if not (same_split and d.id == item.id)]
                demos = _rng(seed, task.name, "shots", item.id).sample(pool, min(shots, len(pool)))
                context = separator.join(d.demo for d in demos) + separator
            if task.method == "ppl":
                scores = scorer.score(context, item)
                picked = rank(scores)
                count({
                    "id": item.id, "gold": item.gold, "pred": picked[PRIMARY_VARIANT], "pred_by": picked,
                    "loss": [round(s.loss, 5) for s in scores], "tokens": [s.tokens for s in scores],
                    "chars": [s.chars for s in scores],
                    **({"labels": item.meta["labels"]} if "labels" in item.meta else {}),
                }, {})
            else:
                text = scorer.generate(context, item, task, zlib.crc32(f"{seed}\x1f{task.name}\x1f{item.id}".encode()))
                per = metrics.generation_scores(task.metric, item.answers, text)
                count({"id": item.id, "prediction": text, "answers": item.answers, **per}, per)
            if progress is not None:
                progress(task.name, index + 1, len(items))
            if keep is not None and time.monotonic() - last_keep >= keep_every_s:
                keep(predictions)
                kept, last_keep = len(predictions), time.monotonic()
    except BaseException:
        if keep is not None and len(predictions) > kept:
            keep(predictions)
        raise

    n = len(items)
    # n_available + the skipped counts = the records of the file (n: those evaluated, the --limit subset)
    summary: dict[str, Any] = {**base, "status": "ok", "n": n, "n_available": len(data.items), "split": data.split,
                               "file": data.path, **skipped}
    if task.method == "ppl":
        variants = {v: {"acc": round(100.0 * correct[v] / n, 4)} for v in VARIANTS}
        summary.update(
            scores={"acc": variants[PRIMARY_VARIANT]["acc"]},
            primary_variant=PRIMARY_VARIANT,
            ppl_variants=variants,
            chance={"published": task.chance, "expected": round(chance_level(task, items), 4)},
            mean_candidates=round(sum(len(i.candidates) for i in items) / n, 4),
        )
    else:
        summary.update(scores={k: round(100.0 * v / n, 4) for k, v in totals.items()},
                       chance={"published": 0.0, "expected": 0.0})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return TaskRun(summary, predictions, resumed=resumed_count)


def evaluate(
    scorer: Scorer,
    tasks: str | Sequence[str],
    data_dir: str,
    *,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    split: str = "eval",
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(results dict, task → per-example predictions). Tasks whose data is missing are reported with
    status `not_found` and their message; they do not stop the others. A `data_dir` that is not a
    directory raises FileNotFoundError (NotADirectoryError for a file) before any task runs."""
    require_data_dir(data_dir)
    clear_cache()  # list the data directory afresh
    runs = {task.name: run_task(task, scorer, data_dir, shots=shots, seed=seed, limit=limit, split=split,
                                progress=progress)
            for task in resolve_tasks(tasks)}
    return assemble_results(scorer.name, runs, data_dir, shots=shots, seed=seed, limit=limit, split=split)


def assemble_results(
    scorer_name: str,
    runs: dict[str, TaskRun],
    data_dir: str,
    *,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    split: str = "eval",
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(results dict, task → per-example predictions) from task name → `TaskRun`, in the order given."""
    results: dict[str, Any] = {
        "meta": {"scorer": scorer_name, "data_dir": str(data_dir), "shots": shots, "seed": seed, "limit": limit,
                 "split": split, "primary_variant": PRIMARY_VARIANT, "variants": list(VARIANTS)},
        "tasks": {name: run.summary for name, run in runs.items()},
    }
    return results, {name: run.predictions for name, run in runs.items()}


class EvalConfig(BaseModel):
    """`pangu eval` / the evaluate flow's parameters."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="checkpoint dir (model.safetensors + config.json); None with oracle")
    tokenizer: str | None = Field(None, description="tokenizer dir; default: found next to the checkpoint")
    tasks: str = Field("all", description="comma-separated task or group names (all, paper, fewclue, extra, ppl, gen)")
    data_dir: str = Field(..., description="directory (any fsspec URI) holding the public datasets")
    output: str = Field(..., description="where results.json, report.md and predictions/ go")
    shots: int = Field(0, ge=0)
    seed: int = 1234
    limit: int | None = Field(None, ge=1, description="evaluate a seeded random subset of this many examples per task")
    split: str = Field("eval", pattern="^(eval|train|dev|test)$")
    oracle: bool = Field(False, description="score with the gold labels (sanity check: 100 %)")
    share_prefix: bool = Field(True, description="run the candidates' shared prefix once (KV cache)")
    min_shared: int = Field(16, ge=0, description="share only prefixes of at least this many tokens")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="CPU threads of torch's operators (default: torch's, one "
                                "per core)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16 (default: as stored)")
    domain: int | str | None = Field(
        None, description="PanGu-Σ: evaluate this domain's sub-model (an id or a name of the export's domains.json); "
        "default: the domain with the most training tokens")


def load_scorer(config: EvalConfig) -> tuple[Scorer, dict[str, Any]]:
    """The scorer `config` asks for (the oracle, or its checkpoint's model and tokenizer) and what
    results.json's meta records of that model ({} for the oracle)."""
    if config.oracle:
        scorer: Scorer = OracleScorer()
        model_meta: dict[str, Any] = {}
    else:
        if not config.checkpoint:
            raise ValueError("give a checkpoint (or oracle=True)")
        import torch

        from .model_io import choose_domain, find_tokenizer, imported_from, load_for_eval, model_config

        if config.threads is not None:
            torch.set_num_threads(config.threads)
        dtype = getattr(torch, config.dtype) if config.dtype else None
        # Which sub-model of a PanGu-Σ export is scored: named in results.json and the report.
        domain = choose_domain(config.checkpoint, model_config(config.checkpoint), config.domain)
        model, tok = load_for_eval(config.checkpoint, config.tokenizer, config.device, dtype,
                                   domain["id"] if domain else None)
        scorer = ModelScorer(model, tok, share_prefix=config.share_prefix, min_shared=config.min_shared)
        model_meta = {"checkpoint": str(config.checkpoint), "tokenizer": str(find_tokenizer(config.checkpoint, config.tokenizer)),
                      "model": model.config.name, "vocab_size": model.config.vocab_size,
                      "max_seq_len": model.config.max_seq_len, "domain": domain,
                      "tokenizer_name": tok.meta.get("name"),
                      "tokenizer_package": (tok.meta.get("source") or {}).get("package"),
                      "imported": imported_from(config.checkpoint)}
    return scorer, model_meta


def write_results(config: EvalConfig, results: dict[str, Any], predictions: dict[str, list[dict[str, Any]]],
                  model_meta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Complete the results' meta and write `results.json`, `report.md` and `predictions/<task>.jsonl`
    under `config.output`; return the results. A task without predictions leaves its file as it is."""
    results["meta"].update(model_meta, seconds=round(seconds, 3))
    write_outputs(results, predictions, Path(config.output))
    return results


def run_key(config: EvalConfig) -> dict[str, Any]:
    """What a finished task's result depends on (`evaluation.resume`): the settings less the task list
    and the output, and the checkpoint's content (none for the oracle)."""
    checkpoint_xxh3 = None
    if not config.oracle and config.checkpoint:
        import xxhash

        from cleaning.assets import pangu_home
        from cleaning.inputs import remembered_content_hash
        from pangu_model.checkpoint import WEIGHTS_NAME

        from .model_io import model_config

        model_config(config.checkpoint)  # not a checkpoint: one clear error, before anything is read
        weights = str((Path(config.checkpoint) / WEIGHTS_NAME).resolve())
        memo = pangu_home() / "cache" / "checkpoint-hashes" / f"{xxhash.xxh3_64_hexdigest(weights.encode())}.json"
        checkpoint_xxh3 = remembered_content_hash(weights, str(memo))
    # The thread count changes how long a task takes, not what it computes: a rerun with another one goes on.
    return {"settings": config.model_dump(mode="json", exclude={"tasks", "output", "threads"}),
            "checkpoint_xxh3": checkpoint_xxh3}


@dataclass
class EvaluationPlan:
    """The tasks of one evaluation, those a previous run under the same output finished, and what to run."""

    config: EvalConfig
    key: dict[str, Any]
    tasks: list[Task]
    finished: dict[str, dict[str, Any]]  # task name → its `evaluation.resume` marker

    @property
    def todo(self) -> list[Task]:
        return [task for task in self.tasks if task.name not in self.finished]

    def results_as_written(self) -> dict[str, Any] | None:
        """results.json when it already holds every task of this plan, finished with this key."""
        path = Path(self.config.output) / RESULTS_FILE
        if self.todo or not path.is_file():
            return None
        results = json.loads(path.read_text(encoding="utf-8"))
        same = results.get("meta", {}).get("run_key") == self.key and list(results.get("tasks", {})) == \
            [task.name for task in self.tasks] and \
            all(results["tasks"][name] == marker["summary"] for name, marker in self.finished.items())
        return results if same else None


def _data_still_missing(task: Task, config: EvalConfig) -> bool:
    """Whether a task kept as `not_found` or `empty` would find the same now (its data may have come)."""
    try:
        if not task.load(config.data_dir, config.split, config.seed).items:
            return True
        if config.shots > 0:
            task.load(config.data_dir, "train", config.seed)
    except DataNotFound:
        return True
    except DataUnreadable:  # there, but not readable: run again, to report it
        return False
    return False


def _require_some_data(tasks: Sequence[Task], config: EvalConfig) -> None:
    """Refuses a data directory that holds none of the tasks' data: the evaluation wrote an empty report and
    exited 0. (Some tasks missing is not an error: they are reported as not found.)"""
    for task in tasks:
        try:
            task.load(config.data_dir, config.split, config.seed)
            return
        except DataUnreadable:  # the data is there: the task's run reports why it cannot be read, the others run
            return
        except DataNotFound:
            continue
    names = ", ".join(t.name for t in tasks[:4]) + (", ..." if len(tasks) > 4 else "")
    if _is_builtin_set(config.data_dir):  # given or not, the advice to leave --data-dir out would not help
        raise DataNotFound(f"the built-in evaluation set ({config.data_dir}) holds none of the {len(tasks)} task(s) "
                           f"asked for ({names}): its tasks are {', '.join(BUILTIN_TASKS)} (--tasks builtin); for "
                           f"the others give --data-dir, the directory that holds the public datasets' folders "
                           f"(README: Evaluation)")
    raise DataNotFound(f"--data-dir {config.data_dir} holds data for none of the {len(tasks)} task(s) asked for "
                       f"({names}): give the directory that holds the datasets' folders (README: Evaluation), or "
                       f"leave --data-dir out for the built-in set")


def _is_builtin_set(data_dir: str) -> bool:
    """Whether `data_dir` is a built-in evaluation set (`pangu data fetch-eval`, the default without --data-dir)."""
    from .builtin import EVAL_FILE

    try:
        fs, path = fsspec.core.url_to_fs(data_dir)
        return fs.isfile(f"{path.rstrip('/')}/{EVAL_FILE}")
    except (OSError, ValueError):
        return False


def data_set_name(data_dir: str | None) -> str:
    """The name of an evaluation's folder (`<run>/eval/<name>/`, the pipeline's `eval/<preset>-<version>/<name>/`):
    `builtin` for the built-in set (None: the default), else the data directory's name. An output folder holds
    one evaluation (a run with other settings replaces it), so a model's results on each set are kept apart."""
    if not data_dir or _is_builtin_set(data_dir):
        return "builtin"
    name = re.sub(r"[^\w.-]+", "_", Path(data_dir).expanduser().resolve().name).strip("._")
    return name or "data"


def _require_enough_demonstrations(tasks: Sequence[Task], config: EvalConfig) -> None:
    """Refuses `shots` larger than a task's train split can give: its prompts would hold fewer than the
    results say. (The example itself is never its own demonstration, when the train split is evaluated.)
    A task whose data is missing is left to its run, which records it as not found."""
    if config.shots == 0:
        return
    for task in tasks:
        try:
            data = task.load(config.data_dir, config.split, config.seed)
            train = task.load(config.data_dir, "train", config.seed)
        except (DataNotFound, DataUnreadable):  # left to the task's run, which reports it; the others run
            continue
        pool = len(train.items) - (1 if train.path == data.path else 0)
        if config.shots > pool:
            raise ValueError(f"--shots {config.shots}: {task.name}'s train split ({train.path}) gives at most "
                             f"{pool} demonstrations")


def plan_evaluation(config: EvalConfig) -> EvaluationPlan:
    """The plan of `config`'s evaluation. What cannot run is refused here, before the model is loaded or
    anything is written under `config.output`: a data directory that does not exist (or is a file), an
    output that is a file, a task list naming no task, and (before the checkpoint is hashed) a checkpoint,
    tokenizer, device or domain the model cannot be loaded with (`model_io.check_model_options`); then
    more shots than an unfinished task's train split holds."""
    require_data_dir(config.data_dir)
    require_output_dir(config.output)
    tasks = resolve_tasks(config.tasks)
    if not tasks:
        raise ValueError(f"--tasks {config.tasks!r} names no task")
    if not config.oracle:
        from .model_io import check_model_options

        if not config.checkpoint:
            raise ValueError("give a checkpoint (or oracle=True)")
        check_model_options(config.checkpoint, config.tokenizer, config.device, config.domain)
    key = run_key(config)
    clear_cache()  # list the data directory afresh
    _require_some_data(tasks, config)
    finished = finished_tasks(Path(config.output), key)
    kept = {t.name: finished[t.name] for t in tasks if t.name in finished and
            (finished[t.name]["summary"]["status"] == "ok" or _data_still_missing(t, config))}
    _require_enough_demonstrations([t for t in tasks if t.name not in kept], config)
    return EvaluationPlan(config, key, tasks, kept)


def _finish(plan: EvaluationPlan, runs: dict[str, TaskRun], scorer_name: str | None,
            model_meta: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """results.json and report.md of every task of the plan: those run now (`runs`) and those reused;
    `scorer_name` and `model_meta` are None when no task ran now (the reused tasks' are used)."""
    config = plan.config
    if scorer_name is None or model_meta is None:
        first = next(iter(plan.finished.values()))
        scorer_name, model_meta = first["scorer"], first["model"]
    runs = {task.name: runs[task.name] if task.name in runs else TaskRun(plan.finished[task.name]["summary"])
            for task in plan.tasks}
    results, _ = assemble_results(scorer_name, runs, config.data_dir, shots=config.shots, seed=config.seed,
                                  limit=config.limit, split=config.split)
    # Each task's predictions were written when it ended (`execute`); another run's are not left beside them.
    drop_other_runs(Path(config.output), plan.key)
    return write_results(config, results, {}, {**model_meta, "run_key": plan.key}, seconds)


def run_kept_task(task: Task, scorer: Scorer, config: EvalConfig, key: dict[str, Any],
                  progress: Callable[[str, int, int], None] | None = None) -> TaskRun:
    """`run_task` for an evaluation into `config.output` whose run key is `key`: it goes on from the predictions an
    unfinished run with the same key kept there, and keeps its own as it goes (`evaluation.resume`)."""
    output = Path(config.output)
    return run_task(task, scorer, config.data_dir, shots=config.shots, seed=config.seed, limit=config.limit,
                    split=config.split, progress=progress, resumed=partial_predictions(output, key, task.name),
                    keep=lambda predictions: keep_partial(output, key, task.name, predictions))


class EvaluationFailed(ReportedFailure):
    """Some tasks crashed (task name → error, of `total`); the others' results are written under `output`.
    Its message names each task and its error, and where the rest is: the command line shows it as one line
    (exit 1), not the traceback of the code that collected it (`PANGU_DEBUG=1` shows the first task's)."""

    def __init__(self, failed: dict[str, Exception], total: int, output: str) -> None:
        super().__init__(f"{len(failed)} of {total} evaluation tasks failed: "
                         + "; ".join(f"{name} ({type(error).__name__}: {error})" for name, error in failed.items())
                         + f". The others' results are in {Path(output) / RESULTS_FILE}; a rerun runs only the failed ones.")


def execute(plan: EvaluationPlan, run_one: Callable[[Task, Scorer], TaskRun],
            after_each: Callable[[int], None] | None = None) -> tuple[dict[str, Any], dict[str, Exception]]:
    """Runs the plan's unfinished tasks with `run_one` (which raises when a task crashes: the others
    still run; the data listing is the plan's), keeping each as it ends; writes results.json and report.md of the whole plan. Returns
    the results and the crashed tasks' errors. `after_each(tasks done)` follows every task."""
    # Two evaluations started into one output (a double start, a rerun while the first still runs) both
    # computed every task; the second is refused now, naming the first (pangu_model/run_lock.py).
    claim = claim_output(Path(plan.config.output))
    try:
        return _execute(plan, run_one, after_each)
    finally:
        if claim is not None:
            os.close(claim)


def _execute(plan: EvaluationPlan, run_one: Callable[[Task, Scorer], TaskRun],
             after_each: Callable[[int], None] | None) -> tuple[dict[str, Any], dict[str, Exception]]:
    scorer_name = model_meta = None
    runs: dict[str, TaskRun] = {}
    failed: dict[str, Exception] = {}
    started = time.perf_counter()
    if plan.todo:
        scorer, model_meta = load_scorer(plan.config)
        scorer_name = scorer.name
        for task in plan.todo:
            try:
                run = run_one(task, scorer)
            except Exception as exc:  # one task's crash leaves the others' results
                run = failed_task_run(task, exc, shots=plan.config.shots, seed=plan.config.seed)
                failed[task.name] = exc
            # kept as soon as it ends, so that a kill later does not lose it
            keep_task(Path(plan.config.output), plan.key, scorer.name, model_meta, run.summary, run.predictions)
            runs[task.name] = run
            if after_each is not None:
                after_each(len(plan.finished) + len(runs))
    return _finish(plan, runs, scorer_name, model_meta, time.perf_counter() - started), failed


def run_evaluation(config: EvalConfig, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Load, evaluate, write `results.json`, `report.md` and `predictions/<task>.jsonl`; return the results.

    Tasks a previous run with the same settings and checkpoint finished under `config.output` are
    reused (`evaluation.resume`), and each task is kept as it ends, so a rerun after a kill runs only
    the rest. A task that crashes does not stop the others; `EvaluationFailed` names it afterwards."""
    plan = plan_evaluation(config)
    written = plan.results_as_written()
    if written is not None:
        return written

    def run_one(task: Task, scorer: Scorer) -> TaskRun:
        return run_kept_task(task, scorer, config, plan.key, progress=progress)

    results, failed = execute(plan, run_one)
    if failed:  # the first crash's traceback goes with the message, for PANGU_DEBUG=1 and the flow's log
        raise EvaluationFailed(failed, len(plan.tasks), config.output) from next(iter(failed.values()))
    return results


__all__ = ["EvalConfig", "EvaluationFailed", "EvaluationPlan", "ModelScorer", "OracleScorer", "PRIMARY_VARIANT", "TaskRun",
           "assemble_results", "evaluate", "execute", "failed_task_run", "load_scorer", "plan_evaluation", "run_evaluation",
           "run_kept_task", "run_key", "run_task", "write_results"]
