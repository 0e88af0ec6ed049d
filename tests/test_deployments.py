"""deploy/prefect.yaml against a REAL Prefect server: how a run is stopped (SIGTERM to the flow process, a
cancellation through the API while a process worker runs it), and the helpers with which
tests/test_end_to_end.py runs `prefect deployment run pretrain/sigma --watch` under a `prefect worker start
--pool pangu --run-once` (the deployment test itself runs there, on a fresh copy of the repository).

Everything listens on and talks to 127.0.0.1 only; the server's SQLite lives in a tmp PREFECT_HOME.
Every wait is bounded, and the server and the worker are killed (process groups) in teardown.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from flows.pretrain import read_metrics_csv
from tests.test_train_common import VOCAB, packed_tokens, training_processes

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "pangu"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1 only
        return response.read()


def _post(url: str, body: dict, timeout: float = 5.0) -> object:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1 only
        return json.loads(response.read())


@contextmanager
def local_server(home: Path, checkout: Path, **extra_env: str) -> Iterator[dict]:
    """A `prefect server start` subprocess on a free 127.0.0.1 port with its SQLite in `home`; yields the
    env for child commands (`PWD` = `checkout`, which `prefect deploy` records) and the API URL."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONUNBUFFERED="1",
               # deploy/prefect.yaml's pull step is `{{ $PWD }}`, read by `prefect deploy` from its environment
               PWD=str(checkout), **extra_env)
    log = open(home / "server.log", "w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if json.loads(_get(f"{api}/health")) is True:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server not healthy ({server.poll()}):\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"env": env, "api": api, "home": home}
    finally:
        _kill_group(server)
        log.close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with local_server(tmp_path_factory.mktemp("prefect-home"), ROOT) as server:
        yield server


def _prefect(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_deployment(name: str, params: dict, env: dict, api: str, cwd: Path, worker_cwd: Path,
                   timeout: float) -> tuple[subprocess.Popen, str, subprocess.Popen, str]:
    """`prefect deployment run NAME --watch` served by a `--run-once` process worker: both processes and their
    output, once the watch has ended."""
    args = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    run = worker = None
    try:
        run = subprocess.Popen([PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", str(int(timeout)),
                                *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        # A --run-once worker polls once: start it when the run is scheduled.
        deadline = time.monotonic() + 60
        while not _post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}):
            assert run.poll() is None, run.stdout.read()
            assert time.monotonic() < deadline, "no flow run was scheduled"
            time.sleep(0.5)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--run-once", "--limit", "1"],
                                  cwd=worker_cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        out, _ = run.communicate(timeout=timeout + 30)
        worker_out, _ = worker.communicate(timeout=60)
    finally:
        _kill_group(run)
        _kill_group(worker)
    return run, out, worker, worker_out


def test_no_flow_module_hides_a_library_package():
    """A worker imports an entrypoint file (flows/pretrain.py) with flows/ on sys.path: a flows/tokenizer.py
    would then be what `import tokenizer` finds, and the pretrain flow run fails in the worker."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"tokenizer", "cleaning", "pangu_model", "evaluation"} <= packages
    assert not packages & {p.stem for p in (ROOT / "flows").glob("*.py")}


# ---- stopping a run: SIGTERM to the flow, a cancellation in the UI ---------------------------------------
TINY_SETS = ["seq_len=64", f"model_overrides.vocab_size={VOCAB}", "model_overrides.max_seq_len=64",
             "progress_bar=false", "throttle_s=0.3", "checkpoint_every=0"]


def _metrics_rows(output: Path) -> int:
    return len(read_metrics_csv(output))


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _flow_run(api: str, run_id: str) -> dict:
    return json.loads(_get(f"{api}/flow_runs/{run_id}"))


def _flow_runs_with_output(api: str, output: Path) -> list[dict]:
    runs = _post(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    return [r for r in runs if r.get("parameters", {}).get("output") == str(output)]


@pytest.mark.slow
def test_sigterm_to_the_flow_process_checkpoints_and_ends_preempted(prefect_server, tmp_path):
    """A scheduler preempting the flow process itself (not the job): the job used to be stopped from the
    flow's `finally` while Prefect marked the run Crashed and re-killed the process (exit -15). Now every
    rank checkpoints, the run ends Preempted and `pangu pretrain` exits 143."""
    env, api = prefect_server["env"], prefect_server["api"]
    output = tmp_path / "sigterm-flow"
    sets = [arg for item in TINY_SETS for arg in ("--set", item)]
    flow = subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", "--preset", "alpha-tiny",
                             "--data", str(packed_tokens()), "--output", str(output), "--steps", "400", *sets],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait(lambda: _metrics_rows(output) >= 3 or flow.poll() is not None, 240, "3 training steps")
        assert flow.poll() is None, flow.stdout.read()[-3000:]
        flow.send_signal(signal.SIGTERM)  # the flow process only
        out, _ = flow.communicate(timeout=120)
    finally:
        _kill_group(flow)
    assert flow.returncode == 143, out[-3000:]
    steps = _metrics_rows(output)
    assert 3 <= steps < 400
    assert (output / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    assert not (output / "STOP").exists()
    assert training_processes(str(output)) == []
    (run,) = _flow_runs_with_output(api, output)
    assert run["state"]["type"] == "CANCELLED" and run["state"]["name"] == "Preempted", run["state"]


@pytest.mark.slow
def test_cancelling_a_run_through_the_api_leaves_no_training_process(prefect_server, tmp_path):
    """Cancel a running `pretrain/alpha` flow run through the server's API (what the UI's Cancel does) while a
    process worker runs it: the run ends Cancelled and no training process is left."""
    env, api = prefect_server["env"], prefect_server["api"]
    _prefect(["work-pool", "create", POOL, "--type", "process"], env, timeout=60)  # may exist already
    deployed = _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], env, timeout=120)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    deployment = json.loads(_get(f"{api}/deployments/name/pretrain/alpha"))
    output = tmp_path / "cancelled"
    overrides = {"seq_len": 64, "model_overrides": {"vocab_size": VOCAB, "max_seq_len": 64}, "progress_bar": False,
                 "throttle_s": 0.3, "checkpoint_every": 0}
    run = _post(f"{api}/deployments/{deployment['id']}/create_flow_run",
                {"parameters": {"data": str(packed_tokens()), "output": str(output), "steps": 400,
                                "overrides": overrides}})
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"], cwd=tmp_path,
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait(lambda: _metrics_rows(output) >= 2 or _flow_run(api, run["id"])["state"]["type"] in
              ("FAILED", "CRASHED", "COMPLETED"), 240, "2 training steps")
        assert training_processes(str(output)), _flow_run(api, run["id"])["state"]
        _post(f"{api}/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"},
                                                         "force": True})
        _wait(lambda: _flow_run(api, run["id"])["state"]["type"] == "CANCELLED", 120, "the run to be cancelled")
        _wait(lambda: not training_processes(str(output)), 60, "the training processes to end")
    finally:
        _kill_group(worker)
        for pid in training_processes(str(output)):
            os.kill(pid, signal.SIGKILL)
    assert _metrics_rows(output) < 400
