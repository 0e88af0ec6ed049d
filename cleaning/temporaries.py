"""Temporary files: every writer writes to one beside its target and renames it into place, so a
reader never sees a partial file. A killed writer leaves its temporary behind; these helpers name
temporaries after their writer and remove the ones whose writer is gone.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec

from cleaning.orphans import process_stat


def _host_tag(host: str | None = None) -> str:
    return f"{zlib.crc32((host or socket.gethostname()).encode()):08x}"


def temporary_path(path: str) -> str:
    """`.NAME.PID-HOST-RANDOM.tmp` beside `path`: the name says which process writes it, so that
    `remove_orphaned_temporaries` can tell a killed writer's leftover from a file being written."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}.tmp")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host. A zombie does not: a writer killed with its job has ended, but
    stays in the process table until init reaps it, which took longer than a rerun on a busy machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if pid <= 0:
        return False
    fields = process_stat(pid)
    if not fields:  # no /proc (not Linux), or it ended just now: as os.kill said
        return True
    return fields[0] not in ("Z", "X")  # the state


_TEMPORARY = re.compile(r"^\..+\.(?:(\d+)-([0-9a-f]{8})-)?[0-9a-f]{8}\.tmp$")


def is_orphaned_temporary(name: str) -> bool:
    """A temporary whose writer is gone: its process has ended on this host, or its name predates
    writer tags. One written on another host is left alone (nothing here can tell whether it runs)."""
    found = _TEMPORARY.match(name)
    if found is None:
        return False
    pid, host = found.groups()
    return pid is None or (host == _host_tag() and not process_alive(int(pid)))


def remove_orphaned_temporaries(root_uri: str) -> list[str]:
    """Deletes, anywhere under `root_uri`, the temporary files and directories that killed writers
    left (`temporary_path`); files other processes are writing now stay. Returns what it removed.
    A stage's driver calls it once before the stage's work starts, so that a rerun after a kill
    ends with no partial file even where the killed work is not redone (another shard with the same
    content finished it, or its cache entry was completed by another version)."""
    fs, path = fsspec.core.url_to_fs(root_uri)
    if not fs.exists(path):
        return []
    found = fs.find(path, withdirs=True)
    removed: list[str] = []
    for p in sorted(found):
        if any(p.startswith(r.rstrip("/") + "/") for r in removed):
            continue  # inside a temporary directory already removed
        if is_orphaned_temporary(os.path.basename(p.rstrip("/"))):
            fs.rm(p, recursive=True)
            removed.append(p)
    return removed


@contextmanager
def temporary_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh local directory beside `target` to build it in (the caller moves it, or a part of it,
    into place); removed when the block ends. Directories that killed builders of the same target
    left are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for left in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if is_orphaned_temporary(left.name):
            shutil.rmtree(left, ignore_errors=True)
    work = Path(temporary_path(str(target)))
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
