"""The `corpus` flow: maps the corpus build's stages over shards as Prefect tasks.

Thin by design: all logic is in `cleaning.build`; this module decides where each call runs,
reports progress, and publishes the counts as artifacts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from cleaning.build import CorpusBuild, describe_work
from cleaning.config import CorpusConfig, load_preset
from cleaning.inputs import InputShard
from cleaning.versions import building, describe_diff, mark_latest, plan_refresh, previous_output
from cleaning.writers import read_json
from flows.lineage import record_asset
from flows.reports import corpus_figure, corpus_markdown, plot_stats, png_markdown, source_table

# Compute runs in worker processes (true parallelism, no GIL); Prefect task runs are threads that
# hand work to them, so each shard is still one task run with its own state and logs, and no
# process has to start its own Prefect API server.
_POOL: Executor | None = None


def _pool() -> Executor | None:
    return _POOL


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    pool = _pool()
    return pool.submit(fn, *args).result() if pool is not None else fn(*args)


# Shard stages read and write through fsspec (object stores time out now and then). Rerunning one is
# safe: each stage removes its own temporaries, writes atomically and skips work behind a marker.
SHARD_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 10}


@task(name="clean-shard", task_run_name="clean-{shard.index:05d}", **SHARD_RETRIES)
def clean_shard(build: CorpusBuild, shard: InputShard) -> dict[str, Any]:
    summary = _run(build.clean, shard)
    logger = get_run_logger()
    counts = summary["counts"]
    read, kept = sum(counts["input"].values()), sum(counts["kept"].values())
    if summary["error"]:
        logger.warning("shard %s: %s", shard.uri, summary["error"])
    verb = "already done" if summary.get("skipped") else f"{summary['seconds']:.1f}s"
    logger.info("clean %s: %d read, %d kept (%s)", shard.uri, read, kept, verb)
    return summary


@task(name="dedup-map", task_run_name="dedup-map-{shard.index:05d}", **SHARD_RETRIES)
def dedup_map(build: CorpusBuild, shard: InputShard, run_key: str) -> dict[str, Any]:
    mapped = _run(build.dedup_map, shard, run_key)
    get_run_logger().info("signatures of %s: %d documents (%s)", shard.uri, mapped["documents"],
                          "signed now" if mapped["signed"] else "cached")
    return mapped


@task(name="dedup-reduce", task_run_name="dedup-reduce-{partition:03d}", **SHARD_RETRIES)
def dedup_reduce(build: CorpusBuild, partition: int, run_key: str) -> dict[str, Any]:
    return _run(build.dedup_reduce, partition, run_key)


@task(name="dedup-cluster")
def dedup_cluster(build: CorpusBuild, run_key: str) -> dict[str, Any]:
    done = _run(build.dedup_cluster, run_key)
    get_run_logger().info("dedup: %s", json.dumps(done["summary"], ensure_ascii=False))
    return done


@task(name="finalize-shard", task_run_name="finalize-{shard.index:05d}", **SHARD_RETRIES)
def finalize_shard(build: CorpusBuild, shard: InputShard, shards: list[InputShard], run_key: str) -> dict[str, Any]:
    return _run(build.finalize, shard, shards, run_key)


def _gather(futures: list, stage: str, progress_id) -> list:
    """Waits for a stage's futures in completion order, logging and updating the progress bar."""
    logger = get_run_logger()
    total = len(futures)
    started = time.perf_counter()
    for done, _ in enumerate(as_completed(futures), start=1):
        if progress_id is not None:
            update_progress_artifact(progress_id, progress=100.0 * done / max(1, total))
        logger.info("%s: %d/%d done (%.1fs)", stage, done, total, time.perf_counter() - started)
    return [future.result() for future in futures]


@flow(name="corpus", log_prints=True)
def corpus(inputs: list[str], output: str, config: CorpusConfig = CorpusConfig(),
           workers: int = 2, work: str | None = None, previous: str | None = None) -> dict[str, Any]:
    """Clean, filter, deduplicate and quality-score raw Chinese text into a versioned corpus;
    `previous`: the version whose dedup index to extend (default: what OUTPUT holds)."""
    global _POOL
    logger = get_run_logger()
    build = CorpusBuild(inputs, output, config, work=work, previous=previous)
    started = time.perf_counter()
    shards = build.plan()
    run_key = build.run_key(shards)
    missing = [s for s in shards if s.error]
    for shard in missing:
        logger.warning("input problem: %s", shard.error)
    logger.info("%d input shards (%.1f MB), build %s", len(shards), sum(s.size for s in shards) / 1e6, run_key)
    _POOL = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        progress = create_progress_artifact(progress=0.0, description="corpus: shards cleaned")
        cleaned = _gather([clean_shard.submit(build, s) for s in shards], "clean", progress)
        dedup_done, mapped = None, []
        if build.dedup_enabled:
            mapped = _gather([dedup_map.submit(build, s, run_key) for s in shards], "dedup map", None)
            plan = build.dedup_plan(mapped, run_key)
            logger.info("dedup index: %s", f"extends {plan['previous']}" if plan["previous"]
                        else f"built afresh ({plan['reason']})")
            partitions = range(config.dedup.partitions)
            _gather([dedup_reduce.submit(build, p, run_key) for p in partitions], "dedup reduce", None)
            dedup_done = dedup_cluster(build, run_key)
        finals = _gather([finalize_shard.submit(build, s, shards, run_key) for s in shards], "finalize", None)
    finally:
        if _POOL is not None:
            _POOL.shutdown()
        _POOL = None
    manifest = build.write_manifest(shards, cleaned, finals, dedup_done, run_key, time.perf_counter() - started,
                                    mapped)
    logger.info("work: %s", describe_work(manifest["work"]))
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
    return {"version": run_key, "output": output, "totals": totals, "work": manifest["work"]}


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
def corpus_refresh(inputs: list[str], root: str = "runs/corpus", config: CorpusConfig = CorpusConfig(),
                   workers: int = 2) -> dict[str, Any]:
    """A new corpus version under ROOT when inputs or config changed since ROOT/LATEST (the scheduled
    refresh): only new or changed input shards are cleaned and signed, their documents are looked
    up in the previous version's dedup index, and unchanged shards' files are linked, not copied."""
    logger = get_run_logger()
    plan = plan_refresh(inputs, root, config)
    logger.info("corpus %s (previous %s): %s", plan.version, plan.previous, describe_diff(plan.diff))
    work = None
    with building(root, plan.version):
        if plan.current:
            logger.info("%s is already built: nothing to do", plan.output)
            totals = read_json(f"{plan.output}/manifest.json")["totals"]
        else:
            result = corpus_with_runner(workers, None)(inputs=inputs, output=plan.output, config=config,
                                                       workers=workers, work=plan.work,
                                                       previous=previous_output(root, plan))
            totals, work = result["totals"], result["work"]
        mark_latest(root, plan)
    lines = [f"# Corpus refresh → {plan.version}", "", f"Previous version: {plan.previous or '–'}; "
             f"{'built' if not plan.current else 'already current'} at `{plan.output}`.", "",
             "| inputs | count |", "|---|---:|"]
    lines += [f"| {kind} | {len(uris)} |" for kind, uris in plan.diff.items()]
    if work is not None:
        lines += ["", f"Work: {describe_work(work)}."]
    create_markdown_artifact(key="corpus-refresh", markdown="\n".join(lines), description="manifest diff")
    return {"version": plan.version, "previous": plan.previous, "output": plan.output,
            "built": not plan.current, "diff": {k: len(v) for k, v in plan.diff.items()}, "totals": totals,
            "work": work}


def corpus_with_runner(workers: int, dask_address: str | None):
    """The flow with the task runner the user asked for."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return corpus.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return corpus.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers) * 2))


def build_from_cli(args: argparse.Namespace) -> int:
    config = load_preset(args.preset)
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
    return 0
