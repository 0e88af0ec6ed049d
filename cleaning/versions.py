"""Versioned corpora under one root: `ROOT/<version>/` per build, `ROOT/LATEST` naming the newest.

A refresh plans the inputs, and builds a new version only when their contents or the config
changed; versions share `ROOT/_work`, so only new or changed input shards are cleaned again (dedup
and the final shards are redone, since a new document can duplicate an old one).
"""
from __future__ import annotations

from concurrent.futures import Executor
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


def refresh(inputs: Sequence[str], root: str, config: CorpusConfig, executor: Executor | None = None,
            log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Build `ROOT/<version>` if the inputs or config changed since `LATEST`; returns a summary."""
    root = root.rstrip("/")
    work = f"{root}/_work"
    probe = CorpusBuild(inputs, root, config, work=work)
    shards = probe.plan()
    version = probe.run_key(shards)
    previous_version = latest_version(root)
    previous = read_json(f"{root}/{previous_version}/manifest.json") if previous_version else None
    diff = input_diff(previous, shards)
    output = f"{root}/{version}"
    fs, path = fsspec.core.url_to_fs(f"{output}/manifest.json")
    if fs.exists(path):
        log(f"corpus version {version} is current: nothing to build")
        manifest = read_json(f"{output}/manifest.json")
        built = False
    else:
        log(f"building corpus version {version}: {len(diff['new'])} new, {len(diff['changed'])} changed, "
            f"{len(diff['unchanged'])} unchanged, {len(diff['removed'])} removed inputs")
        manifest = run_local(CorpusBuild(inputs, output, config, work=work), executor, log)
        built = True
    write_json_atomic(f"{root}/{LATEST}", {"version": version, "previous": previous_version})
    return {"version": version, "previous": previous_version, "output": output, "built": built,
            "diff": diff, "totals": manifest["totals"]}
