"""The `corpus` flow: maps the corpus build's stages over shards as Prefect tasks.

Thin by design: all logic is in `cleaning.build`; this module decides where each call runs,
reports progress, and publishes the counts as artifacts.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from cleaning.build import CorpusBuild, describe_work, input_problems
from cleaning.config import CorpusConfig, load_preset
from cleaning.orphans import exit_with_parent
from cleaning.stages import Stage, run_build
from cleaning.stages import hash_inputs as hash_stage_inputs
from cleaning.versions import building, describe_diff, mark_latest, plan_refresh, previous_output
from cleaning.writers import read_json
from flows.lineage import record_asset
from flows.reports import corpus_figure, corpus_markdown, plot_stats, png_markdown, source_table

# Compute runs in worker processes (true parallelism, no GIL); Prefect task runs are threads that
# hand work to them, so each shard is still one task run with its own state and logs, and no
# process has to start its own Prefect API server.
_POOL: Executor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def _pool() -> Executor | None:
    return _POOL


def _new_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(workers, initializer=exit_with_parent)  # no idle orphans after a kill -9


@contextmanager
def _worker_pool(workers: int) -> Iterator[None]:
    """`workers` processes that the task runs of this flow hand their calls to (none for 1)."""
    global _POOL, _POOL_WORKERS
    _POOL, _POOL_WORKERS = (_new_pool(workers) if workers > 1 else None), workers
    try:
        yield
    finally:
        with _POOL_LOCK:
            pool, _POOL = _POOL, None
        if pool is not None:
            pool.shutdown()


def _replace_broken(pool: Executor) -> None:
    """A pool one of whose processes died (the out-of-memory killer, a crash in native code) takes no more
    calls: a new one takes the retries, of the call that died and of every call the death failed with it."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL = _new_pool(_POOL_WORKERS)
    pool.shutdown(wait=False)


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    pool = _pool()
    if pool is None:
        return fn(*args)
    try:
        return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        _replace_broken(pool)
        raise  # the task run's retry (SHARD_RETRIES) runs the call again, in the new pool


# Stage calls read and write through fsspec (object stores time out now and then). Rerunning one is
# safe: each stage removes its own temporaries, writes atomically and skips work behind a marker.
SHARD_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 10}


# NO_CACHE: each stage skips finished work behind its own completion markers; a cache key would
# hash every argument of every call (finalize's take the whole shard list).
@task(name="corpus-stage", cache_policy=NO_CACHE, **SHARD_RETRIES)
def run_call(stage: str, fn: Callable[..., Any], args: tuple, describe: Callable[[Any], str | None]) -> Any:
    """One call of a stage (`cleaning.stages.Stage`) as one task run, with its own state and logs."""
    result = _run(fn, *args)
    line = describe(result)
    if line:
        logger = get_run_logger()
        (logger.warning if isinstance(result, dict) and result.get("error") else logger.info)(line)
    return result


def map_stage(stage: Stage) -> list[Any]:
    """Submits every call of a stage (task runs named STAGE-LABEL), then waits for them in
    completion order, logging and updating the stage's progress bar."""
    futures = [run_call.with_options(name=stage.name, task_run_name=f"{stage.name}-{label}")
               .submit(stage.name, stage.fn, args, stage.describe)
               for args, label in zip(stage.calls, stage.labels)]
    if not futures:
        return []
    logger = get_run_logger()
    progress = create_progress_artifact(progress=0.0, description=f"corpus: {stage.name} ({len(futures)} calls)") \
        if len(futures) > 1 else None
    started = time.perf_counter()
    for done, _ in enumerate(as_completed(futures), start=1):
        if progress is not None:
            update_progress_artifact(progress, progress=100.0 * done / len(futures))
    logger.info("%s: %d done (%.1fs)", stage.name, len(futures), time.perf_counter() - started)
    return [future.result() for future in futures]


@flow(name="corpus", log_prints=True)
def corpus(inputs: list[str], output: str, config: CorpusConfig | None = None,
           workers: int = 2, work: str | None = None, previous: str | None = None,
           exclude: list[str] | None = None) -> dict[str, Any]:
    """Clean, filter, deduplicate and quality-score raw Chinese text into a versioned corpus;
    `config`: default the `default` preset (as `pangu corpus build`); `previous`: the version whose
    dedup index to extend (default: what OUTPUT holds); `exclude`: directories whose files are no input
    (besides OUTPUT and the work directory), where an input directory holds them."""
    config = config or load_preset("default")
    logger = get_run_logger()
    build = CorpusBuild(inputs, output, config, work=work, previous=previous, exclude=exclude or ())
    with _worker_pool(workers):
        manifest = run_build(build, map_stage, log=logger.info, warn=logger.warning)
    run_key = manifest["version"]
    create_table_artifact(key="corpus-counts", table=source_table(manifest),
                          description="documents per source: input, kept, rejected per rule")
    stats = read_json(f"{output.rstrip('/')}/stats.json")
    markdown = corpus_markdown(manifest, stats, output)
    markdown += "\n## Distributions\n\n" + png_markdown(corpus_figure(stats), "length and quality distributions") + "\n"
    plot = plot_stats(stats, f"{output.rstrip('/')}/stats.png")
    if plot:
        markdown += f"\nAlso saved as `{plot}`.\n"
    create_markdown_artifact(key="corpus-summary", markdown=markdown,
                             description="corpus build summary, with the length and quality distributions")
    _record_corpus_asset(output, manifest)
    totals = manifest["totals"]
    logger.info("corpus %s: %d documents in, %d kept, %d rejected → %s", run_key, totals["input"],
                totals["kept"], totals["rejected"], output)
    return {"version": run_key, "output": output, "totals": totals, "work": manifest["work"],
            "problems": input_problems(manifest)}


def local_path(uri: str) -> Path | None:
    """The local file system path of `uri` (a plain path or file://), None for other file systems."""
    path = uri.removeprefix("file://")
    return None if "://" in path else Path(path)


def _record_corpus_asset(output: str, manifest: dict[str, Any]) -> None:
    """The corpus version (its manifest.json) as a `file://` asset made from the local raw inputs."""
    manifest_path = local_path(f"{output.rstrip('/')}/manifest.json")
    if manifest_path is None:  # asset keys are file:// paths (flows.lineage): nothing to record off local disk
        get_run_logger().info("corpus %s is not on local disk: no asset recorded", output)
        return
    raw_inputs = [path for path in (local_path(i["uri"]) for i in manifest["inputs"]) if path is not None]
    record_asset(manifest_path, raw_inputs, "corpus version", "corpus", manifest["totals"])


@flow(name="corpus-refresh", log_prints=True)
def corpus_refresh(inputs: list[str], root: str = "runs/corpus", config: CorpusConfig | None = None,
                   workers: int = 2, dask_address: str | None = None,
                   exclude: list[str] | None = None) -> dict[str, Any]:
    """A new corpus version under ROOT when inputs or config changed since ROOT/LATEST (the scheduled
    refresh): only new or changed input shards are cleaned and signed, their documents are looked
    up in the previous version's dedup index, and unchanged shards' files are linked, not copied.
    `config`: default the `default` preset, as `make run` and `pangu pipeline` use it, so that the
    scheduled refresh and a pipeline run over the same inputs make the same version.
    `dask_address`: run every stage's calls on that Dask cluster (its workers must reach ROOT).
    `exclude`: directories whose files are no input, besides ROOT (a pipeline's root)."""
    config = config or load_preset("default")
    logger = get_run_logger()
    # The inputs are hashed as tasks (on the Dask cluster when given); planning then reads the cache.
    hash_inputs.with_options(task_runner=_task_runner(workers, dask_address))(
        inputs, root, config, workers=1 if dask_address else workers, exclude=exclude)
    plan = plan_refresh(inputs, root, config, exclude or ())
    since = ("LATEST already" if plan.version == plan.previous else
             f"previous {plan.previous}" if plan.previous else "no previous version")
    logger.info("corpus %s (%s): %s", plan.version, since, describe_diff(plan.diff))
    work = None
    with building(root, plan.version):
        if plan.current:
            logger.info("%s is already built: nothing to do", plan.output)
            manifest = read_json(f"{plan.output}/manifest.json")
            totals, problems = manifest["totals"], input_problems(manifest)
        else:
            # On Dask the cluster's workers do the compute; no local process pool beside them.
            result = corpus_with_runner(workers, dask_address)(inputs=inputs, output=plan.output, config=config,
                                                               workers=1 if dask_address else workers,
                                                               work=plan.work, previous=previous_output(root, plan),
                                                               exclude=[root, *(exclude or [])])
            totals, work, problems = result["totals"], result["work"], result["problems"]
        mark_latest(root, plan)
    lines = [f"# Corpus refresh → {plan.version}", "", f"{since[0].upper()}{since[1:]}; "
             f"{'built' if not plan.current else 'already current'} at `{plan.output}`.", "",
             "| inputs | count |", "|---|---:|"]
    lines += [f"| {kind} | {len(uris)} |" for kind, uris in plan.diff.items()]
    if work is not None:
        lines += ["", f"Work: {describe_work(work)}."]
    create_markdown_artifact(key="corpus-refresh", markdown="\n".join(lines), description="manifest diff")
    return {"version": plan.version, "previous": plan.previous, "output": plan.output,
            "built": not plan.current, "diff": {k: len(v) for k, v in plan.diff.items()}, "totals": totals,
            "work": work, "problems": problems}


@flow(name="corpus-hash-inputs")
def hash_inputs(inputs: list[str], root: str, config: CorpusConfig, workers: int = 2,
                exclude: list[str] | None = None) -> int:
    """Content hash, size and parts of every input file under ROOT/_work/inputs (the cache that
    planning reads), one task run per file; returns the number of files."""
    build = CorpusBuild(inputs, root, config, work=f"{root.rstrip('/')}/_work", exclude=exclude or ())
    files = [uri for uri, error, _ in build.list_inputs() if not error]
    with _worker_pool(workers):
        hash_stage_inputs(build, files, map_stage)
    return len(files)


def _task_runner(workers: int, dask_address: str | None) -> Any:
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return ThreadPoolTaskRunner(max_workers=max(1, workers) * 2)


def corpus_with_runner(workers: int, dask_address: str | None):
    """The flow with the task runner the user asked for."""
    return corpus.with_options(task_runner=_task_runner(workers, dask_address))


def build_from_cli(args: argparse.Namespace) -> int:
    config = load_preset(args.preset, args.set)
    # On Dask the cluster's workers do the compute; no local process pool beside them.
    workers = 1 if args.dask_address else args.workers
    result = corpus_with_runner(args.workers, args.dask_address)(
        inputs=list(args.inputs), output=args.output, config=config, workers=workers)
    totals = result["totals"]
    print(f"corpus {result['version']}: {totals['input']} documents in, {totals['kept']} kept, "
          f"{totals['rejected']} rejected", file=sys.stderr)
    print(f"  work:     {describe_work(result['work'])}", file=sys.stderr)
    print(f"  data:     {args.output}/data/", file=sys.stderr)
    print(f"  rejected: {args.output}/rejected/", file=sys.stderr)
    print(f"  manifest: {args.output}/manifest.json", file=sys.stderr)
    if result["problems"]:
        print("  problems:\n    " + "\n    ".join(result["problems"]), file=sys.stderr)
    return 0
