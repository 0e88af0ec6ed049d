"""The temporary Prefect server of a command run without a Prefect API, out of reach of the signals that stop
the command.

Without PREFECT_API_URL, Prefect starts a temporary server for the process (its ephemeral mode): a
child process in the terminal's process group. Ctrl-C, `timeout` or a batch scheduler (SIGINT or SIGTERM to
the whole group, or to every process of the job) then stopped the server at the same moment as the command,
and the command spent minutes retrying to tell the stopped server that its runs crashed or were preempted
(`timeout -s TERM` of a training: 4 minutes of tracebacks, exit 1 instead of 143). Started here, the server
runs in a session of its own (no signal to the command's process group reaches it) with SIGTERM blocked (a
blocked signal stays blocked across fork and exec, and uvicorn's handlers do not unblock it; a scheduler that
signals every process of a job reaches it, without effect). It outlives the command's stop: the command
records its runs, then stops the server on its way out with SIGINT, which uvicorn takes as a graceful
shutdown. A command killed outright never gets there: a watcher process stops the server then
(`cleaning.orphans`).

The server writes to `$PREFECT_HOME/temporary-server.log`, not to the command's terminal: its own errors
would come between the command's lines, and a server stopped while its services were still starting (a
Ctrl-C in the first seconds) printed a 20-line traceback of Prefect's ("Reactive triggers not started")
after the command's "interrupted". A server that does not start is reported with its log's last line.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from cleaning.orphans import STOP_GRACE_S, stop_with_this_process

#: seconds the temporary server may take to answer, at least (as long as `make serve` waits for its
#: server). Prefect waits 20 s by default (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a first
#: start creates and migrates its database, which took longer than that on a busy 2-core machine, and
#: `make run` on a fresh clone then failed with a traceback.
STARTUP_TIMEOUT_S = 120


#: the size past which the temporary servers' log is set aside for a new one (`server_log`)
SERVER_LOG_MAX_BYTES = 8 << 20


class ServerStartError(ConnectionError):
    """The temporary server did not answer in time (a user's problem to fix: a message is enough)."""


def start_temporary_server() -> None:
    """Prefect's temporary server, started now from this thread with SIGINT blocked and its output going to
    `server_log()`; nothing when the user gave a Prefect API or turned the temporary server off."""
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    server = SubprocessASGIServer()  # the one instance every Prefect client of this process uses
    if server.running:
        return
    timeout = max(STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    log = server_log()
    print(f"[pangu] starting a temporary Prefect server (its log: {log})", file=sys.stderr, flush=True)
    written = log.stat().st_size if log.exists() else 0
    _in_a_session_of_its_own(server)
    server.stop = functools.partial(_stop_gracefully, server, server.stop)  # Prefect's atexit calls this one
    # SIGTERM blocked for the server (SIGINT, its stop, is not); meanwhile for this thread too, whose SIGTERM
    # arrives once the server is up (a Ctrl-C meanwhile stops the start, and the server with atexit's stop)
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with _output_to(log):  # the server inherits it; Prefect's own "Starting..." lines go there too
            server.start(timeout=timeout)
    except (RuntimeError, httpx.HTTPError) as exc:  # no answer; or, at the end, not a healthy one
        server.stop()
        said = _last_line(log, written)
        raise ServerStartError(
            f"the temporary Prefect server did not answer within {timeout} s ({str(exc).splitlines()[0].rstrip('.')}); "
            + (f"its log ({log}) ends: {said}; " if said else f"its log: {log}; ")
            + "allow it longer with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with "
            "`make serve` and set PREFECT_API_URL=http://127.0.0.1:4200/api") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # a SIGTERM meanwhile arrives now
    stop_with_this_process(server.server_process.pid, stop_signal=SERVER_STOP_SIGNAL)


#: what stops the temporary server: uvicorn shuts down gracefully on SIGINT (or SIGTERM, which it has blocked)
SERVER_STOP_SIGNAL = signal.SIGINT


def _in_a_session_of_its_own(server: Any) -> None:
    """Prefect starts its server with `subprocess.Popen(args, env=...)` (`SubprocessASGIServer._run_uvicorn_command`,
    also to retry on a taken port): the same call, made to start a new session, for this server."""
    import prefect.server.api.server as prefect_server

    class _NewSession:  # `subprocess` as that module sees it meanwhile: Popen with start_new_session
        def __getattr__(self, name: str) -> Any:
            return getattr(subprocess, name)

        @staticmethod
        def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - subprocess's name
            return subprocess.Popen(*args, start_new_session=True, **kwargs)

    start = server._run_uvicorn_command

    def run_uvicorn_command() -> subprocess.Popen:
        prefect_server.subprocess = _NewSession()
        try:
            return start()
        finally:
            prefect_server.subprocess = subprocess

    server._run_uvicorn_command = run_uvicorn_command


def _stop_gracefully(server: Any, prefect_stop: Callable[[], None], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to the server and a wait for it to finish (SIGKILL after `grace_s`), then Prefect's own stop,
    which finds it ended (its SIGTERM, blocked, would only have waited 5 s for nothing)."""
    process = server.server_process
    if process is not None and process.poll() is None:
        process.send_signal(SERVER_STOP_SIGNAL)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    prefect_stop()


def server_log() -> Path:
    """Where temporary servers write: `$PREFECT_HOME/temporary-server.log`, appended to by each. One that
    has grown past `SERVER_LOG_MAX_BYTES` becomes `temporary-server.log.1` (replacing the one before), so
    that commands run for months keep at most two logs' worth (a server still writing to the moved file
    goes on writing there)."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "temporary-server.log"
    with contextlib.suppress(FileNotFoundError):  # another command may have moved it meanwhile
        if log.stat().st_size > SERVER_LOG_MAX_BYTES:
            log.replace(log.with_name(log.name + ".1"))
    return log


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Standard output and error (file descriptors 1 and 2) go to `path` meanwhile: what a child process
    started meanwhile inherits for good."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to `path` after `offset` bytes, shortened; "" when none."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
