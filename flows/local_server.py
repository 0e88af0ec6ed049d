"""The temporary Prefect server of a command run without a Prefect API, out of reach of Ctrl-C.

Without PREFECT_API_URL, Prefect starts a temporary server for the process (its ephemeral mode): a
child process in the terminal's process group. Ctrl-C then stops the server at the same moment as
the command, and the command spends minutes retrying to tell the stopped server that its runs
crashed. Started here, with SIGINT blocked (a blocked signal stays blocked across fork and exec,
and uvicorn's handlers do not unblock it), the server outlives the Ctrl-C: the command records its
runs as crashed, then stops the server on its way out (SIGTERM, as Prefect does).
"""
from __future__ import annotations

import signal


def start_temporary_server() -> None:
    """Prefect's temporary server, started now from this thread with SIGINT blocked; nothing when the
    user gave a Prefect API or turned the temporary server off."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    server = SubprocessASGIServer()  # the one instance every Prefect client of this process uses
    if server.running:
        return
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # a Ctrl-C meanwhile arrives now
