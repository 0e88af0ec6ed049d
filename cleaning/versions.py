"""Versioned corpora under one root: `ROOT/<version>/` per build, `ROOT/LATEST` naming the newest.

A refresh plans the inputs, and builds a new version only when their contents or the config
changed; versions share `ROOT/_work`, so only new or changed input shards are cleaned again (dedup
and the final shards are redone, since a new document can duplicate an old one).
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import fsspec

from cleaning.build import CorpusBuild, run_local
from cleaning.config import CorpusConfig
from cleaning.inputs import InputShard
from cleaning.writers import read_json, write_json_atomic

LATEST = "LATEST"


def latest_version(root: str) -> str | None:
    root = root.rstrip("/")
    fs, path = fsspec.core.url_to_fs(f"{root}/{LATEST}")
    return read_json(f"{root}/{LATEST}")["version"] if fs.exists(path) else None


def input_diff(previous: dict[str, Any] | None, shards: Sequence[InputShard]) -> dict[str, list[str]]:
    """Which inputs are new, changed, unchanged or gone since the previous version's manifest."""
    before = {i["uri"]: i["content_hash"] for i in (previous or {}).get("inputs", [])}
    now = {s.uri: s.content_hash for s in shards}
    return {
        "new": sorted(u for u in now if u not in before),
        "changed": sorted(u for u in now if u in before and before[u] != now[u]),
        "unchanged": sorted(u for u in now if u in before and before[u] == now[u]),
        "removed": sorted(u for u in before if u not in now),
    }


@dataclass(frozen=True)
class RefreshPlan:
    version: str  # the build key of the current inputs and config
    previous: str | None  # the version LATEST named before
    output: str  # ROOT/<version>
    work: str  # ROOT/_work, shared by every version
    current: bool  # ROOT/<version> is already built
    diff: dict[str, list[str]]


def plan_refresh(inputs: Sequence[str], root: str, config: CorpusConfig) -> RefreshPlan:
    root = root.rstrip("/")
    work = f"{root}/_work"
    probe = CorpusBuild(inputs, root, config, work=work)
    shards = probe.plan()
    version = probe.run_key(shards)
    previous = latest_version(root)
    manifest = read_json(f"{root}/{previous}/manifest.json") if previous else None
    output = f"{root}/{version}"
    fs, path = fsspec.core.url_to_fs(f"{output}/manifest.json")
    return RefreshPlan(version, previous, output, work, fs.exists(path), input_diff(manifest, shards))


def mark_latest(root: str, plan: RefreshPlan) -> None:
    write_json_atomic(f"{root.rstrip('/')}/{LATEST}", {"version": plan.version, "previous": plan.previous})


def refresh(inputs: Sequence[str], root: str, config: CorpusConfig, executor: Executor | None = None,
            log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Build `ROOT/<version>` if the inputs or config changed since `LATEST`; returns a summary."""
    plan = plan_refresh(inputs, root, config)
    if plan.current:
        log(f"corpus version {plan.version} is current: nothing to build")
        manifest = read_json(f"{plan.output}/manifest.json")
    else:
        log(f"building corpus version {plan.version}: {describe_diff(plan.diff)}")
        manifest = run_local(CorpusBuild(inputs, plan.output, config, work=plan.work), executor, log)
    mark_latest(root, plan)
    return {"version": plan.version, "previous": plan.previous, "output": plan.output, "built": not plan.current,
            "diff": plan.diff, "totals": manifest["totals"]}


def describe_diff(diff: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(diff[k])} {k}" for k in ("new", "changed", "unchanged", "removed")) + " inputs"
