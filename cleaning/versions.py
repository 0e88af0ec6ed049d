"""Versioned corpora under one root: `ROOT/<version>/` per build, `ROOT/LATEST` naming the newest.

A refresh plans the inputs, and builds a new version only when their contents or the config
changed. Versions share `ROOT/_work`, a cache keyed by content (cleaning/build.py), and each
refresh extends the previous version's dedup index (cleaning/dedup_index.py): a refresh with one
new input file cleans and signs that file, looks its documents up in the index, rewrites only the
final shards whose duplicates changed, and links every other file of the new version to the bytes
the previous one already has.

`collect_garbage` (`pangu corpus gc`) removes the versions nobody needs any more and the cache
entries no remaining version uses.
"""
from __future__ import annotations

import os
import re
import socket
import time
from collections import defaultdict
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cleaning.build import CorpusBuild
from cleaning.stages import run_local
from cleaning.config import CorpusConfig
from cleaning.inputs import InputShard
from cleaning.temporaries import process_alive
from cleaning.writers import read_json, write_json_atomic

LATEST = "LATEST"
_VERSION_NAME = re.compile(r"[0-9a-f]{16}")  # CorpusBuild.run_key
PINNED = "PINNED"  # ROOT/<version>/PINNED: gc keeps the version whatever its age
BUILDING = "_work/building"  # ROOT/_work/building/<version>.json while a refresh runs
# The work directory's cache entries, one directory each under these folders. `dedup` and `final`
# are the layout of builds made before the index existed: no version's record names them.
CACHE_FOLDERS = ("inputs", "clean", "minhash", "kept", "dups", "index/segments", "index/versions", "dedup", "final")


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


def plan_refresh(inputs: Sequence[str], root: str, config: CorpusConfig, exclude: Sequence[str] = ()) -> RefreshPlan:
    """The version the inputs and config make under ROOT, and what changed since LATEST; `exclude`: directories
    whose files are no input (besides ROOT), as `CorpusBuild` takes them."""
    root = root.rstrip("/")
    work = f"{root}/_work"
    previous = latest_version(root)
    # The names of files LATEST already held are kept (`input_names`), so the probe reads them as the build will
    probe = CorpusBuild(inputs, root, config, work=work, previous=f"{root}/{previous}" if previous else None,
                        exclude=exclude)
    shards = probe.plan()
    version = probe.run_key(shards)
    manifest = read_json(f"{root}/{previous}/manifest.json") if previous else None
    output = f"{root}/{version}"
    fs, path = fsspec.core.url_to_fs(f"{output}/manifest.json")
    return RefreshPlan(version, previous, output, work, fs.exists(path), input_diff(manifest, shards))


def previous_output(root: str, plan: RefreshPlan) -> str | None:
    """The version a refresh extends (LATEST before it), whose dedup index it looks new documents up in."""
    return f"{root.rstrip('/')}/{plan.previous}" if plan.previous else None


def mark_latest(root: str, plan: RefreshPlan) -> None:
    """LATEST names the plan's version and the one before it. A refresh that finds LATEST current leaves it
    as it is (it made LATEST its own previous version, losing the one before)."""
    if plan.version != plan.previous:
        write_json_atomic(f"{root.rstrip('/')}/{LATEST}", {"version": plan.version, "previous": plan.previous})


def refresh(inputs: Sequence[str], root: str, config: CorpusConfig, executor: Executor | None = None,
            log: Callable[[str], None] = lambda message: None, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Build `ROOT/<version>` if the inputs or config changed since `LATEST`; returns a summary. Files under
    ROOT and `exclude` are no input."""
    plan = plan_refresh(inputs, root, config, exclude)
    with building(root, plan.version):
        if plan.current:
            log(f"corpus version {plan.version} is current: nothing to build")
            manifest = read_json(f"{plan.output}/manifest.json")
        else:
            log(f"building corpus version {plan.version}: {describe_diff(plan.diff)}")
            build = CorpusBuild(inputs, plan.output, config, work=plan.work, previous=previous_output(root, plan),
                                exclude=[root, *exclude])
            manifest = run_local(build, executor, log)
        mark_latest(root, plan)
    return {"version": plan.version, "previous": plan.previous, "output": plan.output, "built": not plan.current,
            "diff": plan.diff, "totals": manifest["totals"], "work": manifest.get("work")}


@contextmanager
def building(root: str, version: str) -> Iterator[None]:
    """Marks a refresh of `version` in progress, so that `collect_garbage` leaves the version and
    the cache alone meanwhile (the new cache entries are not in any manifest yet). The mark goes
    when the refresh ends, failed or not; a killed refresh leaves it, and gc ignores a mark whose
    process is gone from this host."""
    uri = f"{root.rstrip('/')}/{BUILDING}/{version}.json"
    write_json_atomic(uri, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        yield
    finally:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)


def describe_diff(diff: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(diff[k])} {k}" for k in ("new", "changed", "unchanged", "removed")) + " inputs"


# -- garbage collection -------------------------------------------------------------------------
@dataclass
class Garbage:
    """What `collect_garbage` removed (or, with dry_run, would remove)."""

    removed_versions: list[str]
    kept_versions: dict[str, str]  # version -> why it stays
    removed_entries: list[str]  # cache entries, relative to ROOT/_work
    files: int
    bytes_freed: int  # bytes no longer held by any name (a hard-linked file frees its bytes with its last name)
    notes: list[str]
    dry_run: bool

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"kept {v} ({why})" for v, why in sorted(self.kept_versions.items())]
        out += [f"{verb} version {v}" for v in self.removed_versions]
        kinds: dict[str, int] = defaultdict(int)
        for entry in self.removed_entries:
            kinds[entry.rsplit("/", 1)[0]] += 1
        out += [f"{verb} {n} cache entries of _work/{kind}/" for kind, n in sorted(kinds.items())]
        out += self.notes
        out.append(f"{verb} {self.files} files, {self.bytes_freed:,} bytes freed")
        return out


def _live_builds(fs: fsspec.AbstractFileSystem, root: str, dry_run: bool, notes: list[str]) -> set[str]:
    """Versions a refresh is building now. A mark left by a killed refresh on this host is stale."""
    folder = f"{root}/{BUILDING}"
    live = set()
    for path in (fs.ls(folder, detail=False) if fs.exists(folder) else []):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        mark = read_json(fs.unstrip_protocol(path))
        if mark.get("host") == socket.gethostname() and not process_alive(int(mark.get("pid", 0))):
            notes.append(f"the refresh of {name[:-5]} was interrupted (process {mark.get('pid')} is gone); "
                         "its leftovers are garbage")
            if not dry_run:
                fs.rm(path)
            continue
        live.add(name[:-5])
    return live


def _files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return fs.find(path) if fs.isdir(path) else [path]


def _freed(fs: fsspec.AbstractFileSystem, files: Sequence[str]) -> int:
    """Bytes that removing `files` frees. On a local disk a file's bytes go with its last link, so
    an inode counts only when every one of its links is among `files`."""
    if not isinstance(fs, LocalFileSystem):
        return sum(int(fs.info(f).get("size") or 0) for f in files)
    links: dict[tuple[int, int], list[os.stat_result]] = defaultdict(list)
    for f in files:
        st = os.stat(f)
        links[(st.st_dev, st.st_ino)].append(st)
    return sum(stats[0].st_size for stats in links.values() if len(stats) >= stats[0].st_nlink)


def _remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Completion markers (the JSON files) first: a kill in the middle leaves a directory that no
    build reads as finished and that the next gc removes."""
    files = _files(fs, path)
    for f in sorted(files, key=lambda f: not f.endswith(".json")):
        if f.endswith(".json"):
            fs.rm(f)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def collect_garbage(root: str, keep: int = 1, dry_run: bool = False,
                    log: Callable[[str], None] = lambda message: None) -> Garbage:
    """Removes the versions under ROOT that are not LATEST, not among the `keep` newest (LATEST
    counted first) and not pinned (`ROOT/<version>/PINNED`), and the unfinished ones no refresh is building; then the cache
    entries in ROOT/_work that no remaining version's manifest lists (`cache.entries`). A version is
    self-contained (its files are links or copies, never references into another version), so
    removing one never breaks another. Safe to kill at any point: see `_remove_tree`."""
    root = root.rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(f"{base}/{LATEST}"):
        raise FileNotFoundError(f"{root} is not a root of corpus versions (no {LATEST})")
    notes: list[str] = []
    live = _live_builds(fs, base, dry_run, notes)
    latest = latest_version(root)
    manifests: dict[str, dict[str, Any]] = {}
    versions = []
    for path in fs.ls(base, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        # a version's name is its run key (16 hex digits): a folder of the user's in ROOT is no version to remove
        if name.startswith(("_", ".")) or not _VERSION_NAME.fullmatch(name) or not fs.isdir(path):
            continue
        versions.append(name)
        if fs.exists(f"{path}/manifest.json"):
            manifests[name] = read_json(f"{root}/{name}/manifest.json")
    # LATEST counts as the newest, whenever it was built (a refresh can go back to an older version)
    by_age = sorted(manifests, key=lambda v: (v == latest, manifests[v].get("created", ""), v), reverse=True)
    newest = set(by_age[:max(0, keep)])
    kept: dict[str, str] = {}
    for version in versions:
        if version == latest:
            kept[version] = LATEST
        elif version in live:
            kept[version] = "a refresh is building it"
        elif fs.exists(f"{base}/{version}/{PINNED}"):
            kept[version] = "pinned"
        elif version in newest:
            kept[version] = f"one of the {keep} newest"
    removed = sorted(v for v in versions if v not in kept)

    entries: list[str] = []
    unrecorded = [v for v in kept if v in manifests and "cache" not in manifests[v]]
    if live:
        notes.append(f"a refresh is running ({', '.join(sorted(live))}): the cache is left as it is")
    elif unrecorded:
        notes.append(f"{', '.join(sorted(unrecorded))} predates cache records: the cache is left as it is")
    else:
        used = {e for v in kept if v in manifests for e in manifests[v]["cache"]["entries"]}
        for folder in CACHE_FOLDERS:
            path = f"{base}/_work/{folder}"
            if fs.exists(path):
                entries += [f"{folder}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in fs.ls(path, detail=False)]
        entries = sorted(e for e in entries if e not in used)

    targets = [f"{base}/{v}" for v in removed] + [f"{base}/_work/{e}" for e in entries]
    files = [f for target in targets for f in _files(fs, target)]
    garbage = Garbage(removed, kept, entries, len(files), _freed(fs, files), notes, dry_run)
    if not dry_run:
        for target in targets:
            _remove_tree(fs, target)
    for line in garbage.lines():
        log(line)
    return garbage
