#!/usr/bin/env bash
# `make serve`: a local Prefect server on 127.0.0.1, the deployments of deploy/prefect.yaml on the
# `pangu` process work pool, and a worker in the foreground. Ctrl-C stops the worker and the server.
#
# Environment: PREFECT_HOME (default: .prefect/ in the repository; the server's SQLite lives there),
# PANGU_PREFECT_PORT (4200), PANGU_POOL (pangu), PREFECT (the prefect executable, default .venv's).
# A server already healthy on the port is reused (and left running on exit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"  # also sets $PWD, which deploy/prefect.yaml's pull step records

PREFECT="${PREFECT:-$ROOT/.venv/bin/prefect}"
PYTHON="$ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
HOST=127.0.0.1
PORT="${PANGU_PREFECT_PORT:-4200}"
POOL="${PANGU_POOL:-pangu}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://$HOST:$PORT/api"
mkdir -p "$PREFECT_HOME"
SERVER_LOG="$PREFECT_HOME/server.log"

SERVER_PID=""
WORKER_PID=""
INTERRUPTED=0  # Ctrl-C reached the worker too (same terminal process group)
stop_worker() {
    [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null || return 0
    # Prefect's worker stops gracefully on its first SIGINT and is killed on the next signal.
    if [[ $INTERRUPTED -eq 0 ]]; then
        kill -INT "$WORKER_PID" 2>/dev/null || true
    fi
    echo "stopping the worker ($WORKER_PID)"
    for _ in $(seq 1 40); do kill -0 "$WORKER_PID" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$WORKER_PID" 2>/dev/null || true
}
cleanup() {
    trap - EXIT INT TERM
    stop_worker
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "stopping the Prefect server (process group $SERVER_PID)"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'INTERRUPTED=1; exit 130' INT
trap 'exit 143' TERM

healthy() { curl -fsS --max-time 2 "$PREFECT_API_URL/health" >/dev/null 2>&1; }

if healthy; then
    echo "a Prefect server is already running on $HOST:$PORT: using it"
else
    echo "starting the Prefect server on $HOST:$PORT (PREFECT_HOME=$PREFECT_HOME, log: $SERVER_LOG)"
    # Its own process group, so that stopping it reaches the API server's children too.
    setsid "$PREFECT" server start --host "$HOST" --port "$PORT" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    for i in $(seq 1 240); do
        healthy && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "the Prefect server exited; last lines of $SERVER_LOG:" >&2
            tail -n 30 "$SERVER_LOG" >&2
            exit 1
        fi
        if [[ $i -eq 240 ]]; then
            echo "the Prefect server was not healthy after 120 s; see $SERVER_LOG" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "server healthy after ${SECONDS}s"
fi

if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
    "$PREFECT" work-pool create "$POOL" --type process
fi
"$PREFECT" --no-prompt deploy --all --prefect-file deploy/prefect.yaml

echo
echo "Prefect UI:  http://$HOST:$PORT   (API: $PREFECT_API_URL)"
echo "Run:         PREFECT_API_URL=$PREFECT_API_URL $PREFECT deployment run pretrain/sigma --watch"
echo "Worker on pool '$POOL' below; Ctrl-C stops the worker and the server."
echo
# In the background so that the traps above run on Ctrl-C or SIGTERM. Bash starts background jobs with
# SIGINT ignored, and Prefect's worker "restores" that disposition in its own handler, so a plain `&`
# would make it deaf to Ctrl-C: reset SIGINT to the default before exec.
"$PYTHON" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
    "$PREFECT" worker start --pool "$POOL" --type process &
WORKER_PID=$!
wait "$WORKER_PID"
