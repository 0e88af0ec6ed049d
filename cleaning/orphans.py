"""Helper processes that end with the process that started them, however it ends.

A command killed outright (`kill -9`, the out-of-memory killer) runs no `finally` and no `atexit`:
its worker pools and its temporary Prefect server used to go on running, adopted by init, the
workers idle forever on a queue whose writer is gone, the server holding its port and database.
Linux's PR_SET_PDEATHSIG cannot serve here: it fires when the *thread* that started the child
ends, and pools are started from task threads that end long before the command does.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

#: how often a worker checks that its parent still runs (a second of an orphan's life at most)
POLL_S = 1.0

#: seconds a process given its stop signal by `stop_with_this_process` has before SIGKILL (Prefect's own stop
#: of its temporary server waits 5 s)
STOP_GRACE_S = 10.0


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """In a worker process (a pool's initializer): exit as soon as the process that started it ends.
    A killed worker's temporaries are removed by the next run (`cleaning.temporaries`)."""
    # The parent's pid as multiprocessing recorded it: a parent killed while this worker was starting has
    # already given it to init, and os.getppid() would now name init.
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # a process whose parent ends is adopted: its parent id changes
            time.sleep(poll_s)
        os._exit(128 + signal.SIGHUP)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (which may hold spaces and parentheses): [0] is the
    state (field 3), [19] the start time (field 22). None without such a process, or without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot): with the pid, a process's identity,
    as a pid alone is reused."""
    fields = process_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


# The watcher: it reads its stdin, a pipe whose only writer is the process that started it, until the end
# of file that the writer's end brings; then it stops the process it watches, if that is still the same one.
_WATCHER = """
import os, signal, sys, time
from cleaning.orphans import _start_time
pid, started, grace, stop = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
sys.stdin.buffer.read()
if _start_time(pid) == started:
    os.kill(pid, stop)
    deadline = time.monotonic() + grace
    while _start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.1)
    if _start_time(pid) == started:
        os.kill(pid, signal.SIGKILL)
"""

_WATCHERS: list[subprocess.Popen] = []  # their stdin pipes stay open as long as this process runs


def stop_with_this_process(pid: int, grace_s: float = STOP_GRACE_S, stop_signal: int = signal.SIGTERM) -> None:
    """`stop_signal` (then, after `grace_s`, SIGKILL) to process `pid` when this process ends, however it ends:
    a watcher process in a session of its own (out of reach of the terminal's Ctrl-C) waits for it. A
    process that has already ended, or stopped `pid` itself, leaves nothing to do. Linux only."""
    started = _start_time(pid)
    if started is None:
        return
    _WATCHERS.append(subprocess.Popen([sys.executable, "-c", _WATCHER, str(pid), started, str(grace_s),
                                       str(int(stop_signal))],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      start_new_session=True))
