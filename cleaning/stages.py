"""The corpus build's stages, in order, written once for every orchestrator.

A `Stage` is a name and the calls of one `CorpusBuild` method (over input files, shards or
partitions, or a single call). `run_build` walks the stages in order, does the cheap steps that
join them (assembling the shards, the dedup plan, the manifest) itself, and hands each stage to a
`Mapper`: the one thing an orchestrator supplies. `run_local` maps a stage with `map` or an
executor; the Prefect flow (`flows.corpus`) submits each call as a task run, on threads, worker
processes or a Dask cluster. Each stage's method skips work behind its completion marker and
commits its files atomically (`cleaning.writers`), so any stage can be killed and rerun anywhere.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cleaning.build import CorpusBuild, describe_work, empty_corpus, input_problems
from cleaning.inputs import describe_unsupported, unsupported_summary
from cleaning.outputs import check_output_uri
from cleaning.pipeline import check_steps


@dataclass(frozen=True)
class Stage:
    """One stage: `fn(*args)` for every `args` in `calls`, in any order, anywhere; `labels` name the
    calls (task run names, logs) and `describe` turns one result into a log line (or None)."""

    name: str
    fn: Callable[..., Any]  # a CorpusBuild method: it pickles, so it runs in other processes
    calls: Sequence[tuple]
    labels: Sequence[str]
    describe: Callable[[Any], str | None] = lambda result: None


#: runs every call of a stage and returns the results in the order of `stage.calls`
Mapper = Callable[[Stage], list[Any]]


def run_build(build: CorpusBuild, map_stage: Mapper, log: Callable[[str], None] = lambda message: None,
              warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every stage of one corpus version; returns its manifest."""
    warn = warn or log
    started = time.perf_counter()
    listed = build.list_inputs()  # no input found at all: refused here, before OUTPUT is touched
    check_output_uri(build.output, "the corpus")  # so is an output that is a file, or below one
    check_steps(build.config)  # and a missing word list or model
    if build.own_files:  # an input directory that holds the output: its files are no input
        log(f"left out {len(build.own_files):,} file(s) under the corpus output, which an input directory holds "
            f"(first: {build.own_files[0]})")
    if build.unsupported:  # found but not read: said, and counted in the manifest
        warn(f"not read: {describe_unsupported(unsupported_summary(build.unsupported))}")
    leftovers = build.remove_leftovers()
    if leftovers:
        log(f"removed {len(leftovers)} temporary files that a killed build left (first: {leftovers[0]})")
    files = [uri for uri, error, _ in listed if not error]
    shards = build.shards(listed, hash_inputs(build, files, map_stage))
    run_key = build.run_key(shards)
    for shard in shards:
        if shard.error:
            warn(f"input problem: {shard.error}")
    parts = sum(s.part is not None for s in shards)
    log(f"{len(shards)} input shards ({len(files)} files{f', {parts} shards are parts of large files' if parts else ''}; "
        f"{sum(s.size for s in shards) / 1e6:.1f} MB), build {run_key}")
    labels = [f"{s.index:05d}" for s in shards]
    cleaned = map_stage(Stage("clean", build.clean, [(s,) for s in shards], labels, _describe_clean))
    dedup_done, mapped = None, []
    if build.dedup_enabled:
        mapped = map_stage(Stage("dedup-map", build.dedup_map, [(s, run_key) for s in shards], labels,
                                 lambda m: f"signatures of {m['input']}: {m['documents']} documents "
                                           f"({'signed now' if m['signed'] else 'signed already'})"))
        plan = build.dedup_plan(mapped, run_key)
        log("dedup index: " + (f"extends {plan['previous']}" if plan["previous"] else f"built afresh ({plan['reason']})"))
        partitions = range(build.config.dedup.partitions)
        map_stage(Stage("dedup-reduce", build.dedup_reduce, [(p, run_key) for p in partitions],
                        [f"{p:03d}" for p in partitions]))
        dedup_done = map_stage(Stage("dedup-cluster", build.dedup_cluster, [(run_key,)], ["all"]))[0]
        log(f"dedup: {dedup_done['summary']}")
    finals = map_stage(Stage("finalize", build.finalize, [(s, shards, run_key) for s in shards], labels))
    manifest = build.write_manifest(shards, cleaned, finals, dedup_done, run_key, time.perf_counter() - started,
                                    mapped)
    log(f"work: {describe_work(manifest['work'])}")
    unread = sum(1 for entry in manifest["inputs"] if entry.get("error"))
    if unread:  # said shard by shard above (the files no reader takes, at the start); gathered here
        warn(f"{unread} of {len(manifest['inputs'])} inputs not read in full:\n  "
             + "\n  ".join(input_problems(manifest, unsupported=False, empty=False)))
    if said := empty_corpus(manifest):  # it exits 0, like any finished build: the log says what it holds
        warn(said)
    return manifest


def hash_inputs(build: CorpusBuild, files: Sequence[str], map_stage: Mapper) -> dict[str, dict[str, Any]]:
    """uri → content hash, size and parts of each input file: the cached ones looked up here, the
    others hashed by the `hash-input` stage (`CorpusBuild.hash_input`), so a rerun or a refresh
    makes a call only for a new or changed file."""
    found = {uri: build.cached_input(uri) for uri in files}
    missing = [(i, uri) for i, uri in enumerate(files) if found[uri] is None]
    hashed = map_stage(Stage("hash-input", build.hash_input, [(uri,) for _, uri in missing],
                             [f"{i:05d}" for i, _ in missing]))
    return {**found, **{uri: h for (_, uri), h in zip(missing, hashed)}}


def _describe_clean(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    shard = summary["shard"]
    where = shard["uri"] + (f" (part {shard['part'][0]}-{shard['part'][1]})" if shard.get("part") else "")
    done = "already done" if summary.get("skipped") else f"{summary['seconds']:.1f}s"
    line = f"clean {where}: {sum(counts['input'].values())} read, {sum(counts['kept'].values())} kept ({done})"
    return line + (f"; {summary['error']}" if summary["error"] else "")


def run_local(build: CorpusBuild, executor: Executor | None = None,
              log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every stage without an orchestrator (tests, benchmarks, library users): each stage's calls
    through `executor.map` (or in this process)."""
    map_ = executor.map if executor is not None else map

    def map_stage(stage: Stage) -> list[Any]:
        return list(map_(stage.fn, *zip(*stage.calls))) if stage.calls else []

    return run_build(build, map_stage, log)
