"""The temporary Prefect server of a command run without a Prefect API, out of reach of Ctrl-C.

Without PREFECT_API_URL, Prefect starts a temporary server for the process (its ephemeral mode): a
child process in the terminal's process group. Ctrl-C then stops the server at the same moment as
the command, and the command spends minutes retrying to tell the stopped server that its runs
crashed. Started here, with SIGINT blocked (a blocked signal stays blocked across fork and exec,
and uvicorn's handlers do not unblock it), the server outlives the Ctrl-C: the command records its
runs as crashed, then stops the server on its way out (SIGTERM, as Prefect does). A command killed
outright never gets there: a watcher process stops the server then (`cleaning.orphans`).
"""
from __future__ import annotations

import signal

from cleaning.orphans import stop_with_this_process

#: seconds the temporary server may take to answer, at least (as long as `make serve` waits for its
#: server). Prefect waits 20 s by default (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a first
#: start creates and migrates its database, which took longer than that on a busy 2-core machine, and
#: `make run` on a fresh clone then failed with a traceback.
STARTUP_TIMEOUT_S = 120


class ServerStartError(ConnectionError):
    """The temporary server did not answer in time (a user's problem to fix: a message is enough)."""


def start_temporary_server() -> None:
    """Prefect's temporary server, started now from this thread with SIGINT blocked; nothing when the
    user gave a Prefect API or turned the temporary server off."""
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
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start(timeout=timeout)
    except (RuntimeError, httpx.HTTPError) as exc:  # no answer; or, at the end, not a healthy one
        server.stop()
        raise ServerStartError(
            f"the temporary Prefect server did not answer within {timeout} s ({str(exc).splitlines()[0].rstrip('.')}); "
            "allow it longer with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with "
            "`make serve` and set PREFECT_API_URL=http://127.0.0.1:4200/api") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # a Ctrl-C meanwhile arrives now
    stop_with_this_process(server.server_process.pid)
