"""The `pretrain` flow: runs the training program (`python -m pangu_model.train`) under a launcher.

Thin: `pangu_model.train` trains, checkpoints, resumes and exports; `pangu_model.topology` writes the
hostfile and the launcher flags. This module picks the packed token version, builds the command
(one process; `torchrun` for several local ranks; the `deepspeed` launcher and a generated hostfile
for several nodes), streams the job's output into the Prefect run, turns a failed rank or a
preemption into a failed flow run with a clear message, and publishes the results as artifacts and
as an asset (`file://…/export/model.safetensors`).

Overrides are `TrainConfig` fields with dotted keys (`{"optimizer.lr": 3e-4, "seq_len": 64}`), the
same as the training program's `--set key=value`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled

from cleaning.errors import ReportedFailure, one_line
from cleaning.yamlfile import names_a_file
from flows.lineage import record_asset
from flows.reports import loss_figure, png_markdown, validation_figure

REPO = Path(__file__).resolve().parents[1]
TRAIN_MODULE = "pangu_model.train"
PREEMPTED_EXIT_CODES = (143, -signal.SIGTERM)  # the trainer's own 128 + SIGTERM, or killed by it
TAIL_LINES = 40  # kept for the result line
ERROR_TAIL_LINES = 12  # quoted in a failure message
_CAUSE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+)(?:Error|Exception|Interrupt)\b.*)$")
LOSS_TABLE_ROWS = 100
PROGRESS_EVERY_S = 30.0
STOP_GRACE_S = 120.0  # at least this long from SIGTERM to SIGKILL: the trainer finishes its step and checkpoints
# Launcher variables a flow run may have inherited; a one-process run must start a world of its own.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TrainingFailed(ReportedFailure):
    """The launcher or a rank exited non-zero; the message names the exit code and the last lines."""


class TrainingPreempted(TrainingFailed):
    """SIGTERM: the trainer checkpointed and exited 143; a rerun with the same output resumes."""


# ---------------------------------------------------------------------------------------------
# Data and command
# ---------------------------------------------------------------------------------------------
def resolve_data(data: str | os.PathLike[str]) -> tuple[Path, str]:
    """A packed token dir (has domains.json), or the newest version under a root of versions.

    Returns the directory and a sentence saying which one was picked and why.
    """
    root = Path(data).expanduser().resolve()
    if (root / "domains.json").is_file():
        return root, f"packed tokens {root}"
    if not root.is_dir():
        what = "a file, not a directory" if root.exists() else "no such directory"
        raise FileNotFoundError(f"data {str(data)!r}: {what} (expected a packed token dir with "
                                "domains.json, or a root of versions such as runs/tokens/<version>/)")
    versions = [p for p in root.iterdir() if p.is_dir() and (p / "domains.json").is_file()]
    if not versions:
        raise FileNotFoundError(f"data {str(data)!r} has no domains.json and no version subdirectory with one: "
                                "not a packed token dir (`pangu tokenizer pack` / `pangu tokenizer run` write one)")
    versions.sort(key=lambda p: ((p / "domains.json").stat().st_mtime_ns, p.name))
    newest = versions[-1]
    others = f", newest of {len(versions)} versions" if len(versions) > 1 else ""
    return newest, f"packed tokens version {newest.name} under {root}{others}"


def describe_model(config: Any) -> str:
    """One line: the model's shape as derived from the preset and the data."""
    pangu = config.pangu_config()
    text = f"{pangu.name}, {pangu.num_layers} layers, d {pangu.d_model}, vocabulary {pangu.vocab_size:,}"
    if pangu.tokenizer_pieces is not None and pangu.tokenizer_pieces != pangu.vocab_size:
        text += f" ({pangu.tokenizer_pieces:,} tokenizer pieces + padding)"
    if pangu.router == "rre":
        def count(n: int, noun: str) -> str:
            return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

        text += (f", {count(pangu.num_domains, 'domain')} × {count(pangu.experts_per_domain, 'expert')} = "
                 f"{pangu.total_experts} per RRE layer in the top {count(pangu.moe_layers, 'layer')}")
    return text


def local_devices() -> int:
    """Visible CUDA devices (0 on a CPU machine)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means: run on the CPU
        return 0


def _set_args(values: dict[str, Any]) -> list[str]:
    """`--set key=value` pairs; JSON is YAML, so every value reads back exactly as given."""
    args: list[str] = []
    for key, value in values.items():
        args += ["--set", f"{key}={json.dumps(value, ensure_ascii=False)}"]
    return args


@dataclass
class Launch:
    """One training job: the command, its environment, and what it will be."""

    argv: list[str]
    launcher: str  # python, torchrun or deepspeed
    world_size: int
    nodes: int
    env: dict[str, str] = field(default_factory=dict)
    hostfile: str | None = None  # where the deepspeed launcher reads the cluster's hosts
    note: str | None = None  # a choice the caller should hear about
    grace_s: float = STOP_GRACE_S  # from a stop (SIGTERM, the stop file) to SIGKILL
    cluster: Any = None  # the nodes of a multi-node job (pangu_model.topology.ClusterSpec): its hostfile
    signal_stop: bool = True  # False: the flow's own stops reach the ranks through the stop file alone

    def describe(self) -> str:
        return " ".join(self.argv)

    def write_files(self) -> None:
        """Write what the job reads (the hostfile, into the run's output dir): only once it starts, so a run
        refused before that leaves nothing behind."""
        if self.hostfile is not None and self.cluster is not None:
            from pangu_model.topology import write_hostfile

            write_hostfile(self.cluster, self.hostfile)


def build_launch(
    preset: str,
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    nodes: int = 1,
    gpus_per_node: int = 8,
    hostfile: str | None = None,
    expert_parallel: int = 1,
    tensor_parallel: int = 1,
    devices: int | None = None,
    grace_s: float = STOP_GRACE_S,
    fewest_ranks: int = 1,
) -> Launch:
    """The command line for a run. `devices`: visible GPUs on this node (default: asked of torch).
    `fewest_ranks`: the smallest world the run's parallel layout needs (pangu_model.train.fewest_ranks).

    * one node, no hostfile: with GPUs, `torchrun --standalone --nproc_per_node K` for K = min(gpus_per_node,
      visible GPUs) > 1, else one process; on a CPU machine one process, or `fewest_ranks` CPU ranks (gloo)
      under torchrun where the layout needs more (a tensor- or pipeline-parallel run tried on a laptop);
    * several nodes (a hostfile, required: the hosts' real names): `deepspeed` with
      `pangu_model.topology.launcher_args` and the hostfile copied into the run's output dir when the job
      starts (`Launch.write_files`).
    """
    from pangu_model.topology import ParallelPlan, launcher_args

    output = Path(output)
    preset_arg = str(Path(preset).resolve()) if names_a_file(preset) and Path(preset).exists() else preset
    values: dict[str, Any] = {"data": str(data), "output": str(output)}
    if steps is not None:
        values["train_steps"] = int(steps)
    values.update(overrides or {})
    program = ["--config", preset_arg, *_set_args(values)]
    env = {"PYTHONUNBUFFERED": "1"}
    bin_dir = Path(sys.executable).parent

    if hostfile is not None or nodes > 1:
        cluster = cluster_of(nodes, hostfile)
        written = output / "hostfile"
        deepspeed = str(bin_dir / "deepspeed") if (bin_dir / "deepspeed").exists() else "deepspeed"
        parallel = ParallelPlan(tensor=tensor_parallel, expert=expert_parallel)
        argv = [deepspeed, *launcher_args(cluster, parallel, written), "--module", TRAIN_MODULE, *program]
        return Launch(argv, "deepspeed", cluster.world_size, cluster.nodes, env, str(written), grace_s=grace_s,
                      cluster=cluster)

    devices = local_devices() if devices is None else devices
    ranks = min(gpus_per_node, devices) if devices > 0 else fewest_ranks
    note = None
    if devices == 0 and fewest_ranks > 1:
        note = (f"no GPU visible: {fewest_ranks} CPU ranks (gloo), the fewest the parallel layout needs "
                f"(gpus_per_node {gpus_per_node} applies to GPU nodes)")
    elif devices == 0 and gpus_per_node > 1:
        note = f"no GPU visible: one CPU process (gpus_per_node {gpus_per_node} applies to GPU nodes)"
    elif 0 < devices < gpus_per_node:
        note = f"gpus_per_node {gpus_per_node} but {devices} GPU(s) visible: {ranks} local rank(s)"
    if ranks <= 1:
        return Launch([sys.executable, "-m", TRAIN_MODULE, *program], "python", 1, 1, env, note=note, grace_s=grace_s)
    # torchrun passes a SIGTERM on to its ranks and SIGKILLs them 30 s later unless told otherwise.
    grace = ["--shutdown-timeout", str(math.ceil(grace_s))]
    if not torchrun_takes_shutdown_timeout():
        # An older torchrun cannot be told: a SIGTERM that reaches it gives the ranks 30 s. The flow's own stops
        # (a cancellation, a SIGTERM to the flow run) then leave torchrun alone and reach the ranks through
        # the stop file, which they read after every step; torchrun sees them end.
        import torch

        grace = []
        note = "; ".join(filter(None, [note, (
            f"torchrun of torch {torch.__version__} has no --shutdown-timeout: a SIGTERM sent to it gives the "
            f"ranks 30 s to checkpoint (not the {grace_s:.0f} s grace); the flow stops the job through the "
            f"stop file instead")]))
    # Without --log-dir torchrun makes a /tmp/torchelastic_* tree per launch and never removes it (empty: the
    # ranks' output is streamed, not redirected, and they write no error files); os.devnull makes none.
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "--log-dir", os.devnull, *grace, "-m", TRAIN_MODULE, *program]
    return Launch(argv, "torchrun", ranks, 1, env, note=note, grace_s=grace_s, signal_stop=bool(grace))


def cluster_of(nodes: int, hostfile: str | None) -> Any:
    """The nodes of a multi-node job (pangu_model.topology.ClusterSpec), from its hostfile; raises when there
    is none or it lists another number of hosts than `nodes`."""
    from pangu_model.topology import ClusterSpec

    if hostfile is None:
        raise ValueError(f"--nodes {nodes} needs the hosts to run on: give --hostfile (one `host slots=N` line "
                         "per node, as DeepSpeed's launcher reads it; a scheduler's node list written that way)")
    cluster = ClusterSpec.from_hostfile(hostfile)
    if nodes > 1 and cluster.nodes != nodes:
        raise ValueError(f"--nodes {nodes} but hostfile {hostfile} lists {cluster.nodes} hosts")
    return cluster


@functools.lru_cache(maxsize=1)
def torchrun_takes_shutdown_timeout() -> bool:
    """Whether this torch's torchrun has `--shutdown-timeout` (torch 2.13's has; 2.11's has not, and a job
    launched with it would end at once with a usage error)."""
    from torch.distributed.run import get_args_parser

    known, _ = get_args_parser().parse_known_args(["--shutdown-timeout", "1", "train.py"])
    return getattr(known, "shutdown_timeout", None) == 1


# ---------------------------------------------------------------------------------------------
# Running the job
# ---------------------------------------------------------------------------------------------
def parse_result(lines: list[str] | deque[str]) -> dict[str, Any] | None:
    """The training program's final JSON line (`{"status": …, "step": …}`), if it printed one."""
    for line in reversed(list(lines)):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "status" in value:
                return value
    return None


def read_metrics_csv(output: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of the trainer's metrics.csv (step, loss, …, tokens_per_s) found under `output`."""
    output = Path(output)
    path = output / "metrics.csv"
    if not path.is_file():
        found = sorted(output.rglob("metrics.csv")) if output.is_dir() else []
        if not found:
            return []
        path = found[0]
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if None in row or None in row.values():
                continue  # a row being written
            try:
                rows.append({k: float(v) for k, v in row.items()})
            except ValueError:
                continue
    return rows


class ProgressLine:
    """The run's progress line from metrics.csv's last row: step of total, loss, tokens/s and the time left, at
    the pace of the steps logged over the last PACE_LINES lines whose step moved on (before there are two, the
    last step's own seconds). A window, not the last line alone: on a shared machine the pace between two lines
    swung by 4× and the time left with it."""

    PACE_LINES = 10

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.marks: deque[tuple[int, float]] = deque(maxlen=self.PACE_LINES)  # (step, when) of those lines

    def line(self, row: dict[str, float], now: float) -> str:
        step = int(row.get("step", 0))
        if not self.marks or step > self.marks[-1][0]:
            self.marks.append((step, now))
        (first_step, first_time), (last_step, last_time) = self.marks[0], self.marks[-1]
        per_step = ((last_time - first_time) / (last_step - first_step) if last_step > first_step
                    else row.get("seconds", math.nan))
        text = (f"progress: step {step}/{self.total_steps}, loss {row.get('loss', math.nan):.4f}, "
                f"{row.get('tokens_per_s', 0.0):.0f} tokens/s")
        if step < self.total_steps and math.isfinite(per_step) and per_step > 0:
            text += f", about {_duration((self.total_steps - step) * per_step)} left"
        return text


def _duration(seconds: float) -> str:
    """`2 h 05 min`, `4 min 10 s`, `35 s`."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def last_metrics_row(output: str | os.PathLike[str]) -> dict[str, float] | None:
    """The last complete row of output/metrics.csv, reading only the file's header and tail."""
    path = Path(output) / "metrics.csv"
    try:
        with open(path, "rb") as fh:
            header = fh.readline().decode("utf-8").strip().split(",")
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        values = line.strip().split(",")
        if len(values) == len(header) and values != header:
            try:
                return dict(zip(header, map(float, values)))
            except ValueError:
                continue
    return None


def sample_rows(rows: list[dict[str, Any]], limit: int = LOSS_TABLE_ROWS) -> list[dict[str, Any]]:
    """At most `limit` rows, evenly spaced, first and last included."""
    if len(rows) <= limit:
        return list(rows)
    picks = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in picks]


def failure_cause(lines: list[str] | deque[str]) -> str | None:
    """The last `SomeError: message` line of a traceback (rank prefixes removed)."""
    for line in reversed(list(lines)):
        match = _CAUSE.match(line.strip())
        if match:
            return match.group(1)
    return None


def signal_cause(code: int | None) -> str | None:
    """What the exit code of a job killed by a signal says (the process's -N, or a shell's 128 + N)."""
    if code is None:
        return None
    number = -code if code < 0 else code - 128 if 128 < code < 160 else 0  # 0: not a signal
    try:
        name = signal.Signals(number).name
    except ValueError:
        return None
    if number == signal.SIGKILL:
        # Nothing is printed when the kernel's out-of-memory killer ends a process: say that it is the usual cause.
        return (f"killed by {name}, most often the kernel's out-of-memory killer when the machine has run out of "
                "memory (`dmesg` says 'Out of memory: Killed process'; a smaller micro_batch_size or seq_len with "
                "--set), or a kill -9")
    return f"killed by {name}"


def _pump(stream: Any, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\n"))
    lines.put(None)


def default_stop_grace(config: Any, nodes: int, gpus_per_node: int) -> float:
    """Time for a stopped job to finish its step and checkpoint: twice the planner's step time plus
    checkpoint write time for this preset on this cluster, at least STOP_GRACE_S."""
    from pangu_model.plan import plan_for

    try:
        plan = plan_for(config, nodes=nodes, gpus_per_node=gpus_per_node)
    except ValueError:  # a layout the planner cannot place: the trainer says why; keep the floor
        return STOP_GRACE_S
    return max(STOP_GRACE_S, 2.0 * (plan.step_time_s + plan.checkpoint_s))


def request_stop(proc: subprocess.Popen, output: str | os.PathLike[str], signal_job: bool = True) -> None:
    """Ask every rank to finish its step and checkpoint: the stop file (it reaches ranks on other nodes,
    which the deepspeed launcher does not signal) and, with `signal_job`, SIGTERM to the job's process
    group."""
    from pangu_model.train import STOP_FILE

    try:
        Path(output, STOP_FILE).touch()
    except OSError:
        pass
    if not signal_job:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen, logger: Any, grace_s: float, output: str | os.PathLike[str],
          signal_job: bool = True) -> None:
    """Stop a job that is still running (the trainer checkpoints), SIGKILL after `grace_s` seconds."""
    if proc.poll() is not None:
        return
    logger.warning("stopping the training job (process group %d): it checkpoints first, SIGKILL in %.0fs",
                   proc.pid, grace_s)
    request_stop(proc, output, signal_job)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        logger.error("the training job did not stop within %.0fs: SIGKILL", grace_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _is_cancellation() -> bool:
    """True when the SIGTERM that reached this flow run is Prefect's own cancellation (the runner said so
    first), False for an outside SIGTERM (a scheduler preempting the job)."""
    try:
        from prefect._internal import control_listener

        return control_listener.get_intent() is not None
    except Exception:  # noqa: BLE001 - an API this version lacks: treat it as a cancellation, as before
        return True


def _terminate_with_parent() -> None:
    """In the job's process, before exec: SIGTERM when the process that started it dies (Linux
    PR_SET_PDEATHSIG). A flow-run process killed outright (a cancellation in the UI, an OOM kill) never
    reaches its `finally`; the launcher then still gets SIGTERM and stops its ranks, which checkpoint."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the flow's own stop is all there is
        pass


def start_job(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The training job in a session of its own (a stop reaches every rank through its process group),
    tied to the life of this process, its output one text stream."""
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            start_new_session=True, preexec_fn=_terminate_with_parent)


@task(name="train", task_run_name="train-{launch.launcher}-{launch.world_size}", cache_policy=NO_CACHE)
def run_training(launch: Launch, output: str, total_steps: int) -> dict[str, Any]:
    """Runs the job, streaming every output line into this run's logs; fails on a non-zero exit."""
    logger = get_run_logger()
    env = {k: v for k, v in os.environ.items() if not (launch.launcher == "python" and k in _DIST_VARS)}
    env.update(launch.env)
    logger.info("launching %s (%d rank%s on %d node%s): %s", launch.launcher, launch.world_size,
                "s" if launch.world_size != 1 else "", launch.nodes, "s" if launch.nodes != 1 else "",
                launch.describe())
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    from pangu_model.train import STOP_FILE

    Path(output, STOP_FILE).unlink(missing_ok=True)  # left by a job that died before it could read it
    launch.write_files()
    proc = start_job(launch.argv, env)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()

    progress = ProgressLine(total_steps)

    def follow(deadline: float | None = None) -> int:
        """Log the job's lines (and progress every PROGRESS_EVERY_S) until it exits; SIGKILL at `deadline`."""
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                return proc.wait()
            if line:
                tail.append(line)
                logger.info("%s", line)
            if deadline is not None and time.monotonic() > deadline and proc.poll() is None:
                logger.error("the training job did not stop within %.0fs: SIGKILL", launch.grace_s)
                os.killpg(proc.pid, signal.SIGKILL)
                deadline = None
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_EVERY_S
                last = last_metrics_row(output)
                if last:
                    logger.info("%s", progress.line(last, time.monotonic()))

    try:
        try:
            code = follow()
        except TerminationSignal:
            if _is_cancellation():
                raise  # `finally` stops the job (it checkpoints); Prefect records the cancellation
            # SIGTERM to this flow process: a scheduler preempting the run. The job stops as a preempted job
            # does (every rank checkpoints) and the run ends Preempted below.
            logger.warning("SIGTERM: the training job checkpoints and stops (SIGKILL in %.0fs)", launch.grace_s)
            request_stop(proc, output, launch.signal_stop)
            code = follow(deadline=time.monotonic() + launch.grace_s)
    finally:
        _stop(proc, logger, launch.grace_s, output, launch.signal_stop)
        reader.join(timeout=5)
    seconds = time.monotonic() - started
    result = parse_result(tail)
    last_lines = "\n".join(list(tail)[-ERROR_TAIL_LINES:])
    # Under torchrun or the deepspeed launcher the launcher's own exit code says little (torchrun exits 1
    # when SIGTERM reached it): the trainer's result line says whether it checkpointed and stopped.
    if code in PREEMPTED_EXIT_CODES or (result or {}).get("status") == "preempted":
        from pangu_model.train import latest_checkpoint_tag

        tag = latest_checkpoint_tag(output)
        raise TrainingPreempted(
            f"training was preempted (SIGTERM; {launch.launcher} exit code {code}) after {seconds:.0f}s: "
            f"a checkpoint was written ({Path(output) / 'checkpoints' / (tag or 'latest')}); rerun with the same "
            f"output ({output}) to resume from it.\nLast lines:\n{last_lines}")
    if code != 0:
        who = "the training process" if launch.launcher == "python" else f"{launch.launcher} (a rank failed)"
        cause = failure_cause(tail) or signal_cause(code)
        raise TrainingFailed(f"training failed: {who} exited with code {code} after {seconds:.0f}s"
                             f"{': ' + cause if cause else ''}\nLast lines:\n{last_lines}")
    if result is None:
        raise TrainingFailed(f"training exited 0 but printed no result line.\nLast lines:\n{last_lines}")
    result["seconds"] = seconds
    logger.info("training %s at step %s in %.0fs", result["status"], result.get("step"), seconds)
    return result


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------
def record_model_asset(model_file: Path, data_dir: Path, metadata: dict[str, Any]) -> str | None:
    """Materialise `file://…/model.safetensors` (upstream: the packed data) as a Prefect asset."""
    info = {**metadata, "bytes": model_file.stat().st_size}
    return record_asset(model_file, [data_dir / "domains.json"], f"{metadata.get('preset', 'pretrain')} model",
                        "deepspeed", info)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


SAMPLE_MAX_BYTES = 4 << 30  # samples come from the export on the flow's CPU: skipped for larger models


@task(name="generate-samples", cache_policy=NO_CACHE)
def sample_task(export: str) -> dict[str, Any] | None:
    """A few texts generated from fixed prompts by the export (evaluation.samples)."""
    from evaluation.samples import generate_samples

    size = (Path(export) / "model.safetensors").stat().st_size
    if size > SAMPLE_MAX_BYTES:
        get_run_logger().info("no samples: the export (%.1f GB) is too large to sample on this CPU", size / 1e9)
        return None
    return generate_samples(export)


def _sample_lines(samples: dict[str, Any] | None) -> list[str]:
    if not samples:
        return []
    domain = samples["domain"]
    which = f" (PanGu-Σ sub-model of domain {domain['id']} {domain.get('name') or ''})" if domain else ""
    lines = ["", f"## Samples{which}", "", "| prompt | continuation |", "|---|---|"]
    for sample in samples["samples"]:
        text = sample["text"].replace("|", "\\|").replace("\n", " ⏎ ")
        lines.append(f"| {sample['prompt']} | {text} |")
    return lines


def publish(preset: str, config: Any, data_dir: Path, data_note: str, output: Path, result: dict[str, Any],
            launch: Launch, resumed_from: str | None, samples: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = read_metrics_csv(output)
    final_loss = rows[-1]["loss"] if rows else None
    recent = [r["tokens_per_s"] for r in rows[-20:] if r.get("tokens_per_s", 0) > 0]
    tokens_per_s = sum(recent) / len(recent) if recent else None
    from pangu_model.metrics import OVERALL_DOMAIN, read_validation
    from pangu_model.train import latest_checkpoint_tag

    validation = read_validation(output)
    overall = validation.get(OVERALL_DOMAIN, [])
    export = result.get("export")
    model_file = Path(export) / "model.safetensors" if export else None
    checkpoint = output / "checkpoints" / (latest_checkpoint_tag(output) or "")
    lines = [
        f"# Pretrain `{preset}` (model `{config.model}`)",
        "",
        "| | |",
        "|---|---|",
        f"| status | {result.get('status')} at step {result.get('step')} of {config.train_steps} |",
        f"| model | {describe_model(config)} |",
        f"| final loss | {_fmt(final_loss, '.4f')} |",
        f"| validation loss / perplexity | "
        f"{f'{overall[-1][1]:.4f} / {overall[-1][2]:,.1f} at step {overall[-1][0]}' if overall else 'n/a'} |",
        f"| tokens/s | {_fmt(tokens_per_s, ',.0f')} (mean of the last {len(recent)} steps, all ranks) |",
        f"| wall time | {result.get('seconds', 0):.0f} s |",
        f"| launcher | {launch.launcher}, {launch.world_size} rank(s) on {launch.nodes} node(s)"
        f"{'' if result.get('launched', True) else ' (not launched: the run was finished and exported)'} |",
        f"| data | `{data_dir}` ({data_note}) |",
        f"| checkpoint dir | `{checkpoint}` |",
        f"| export dir | `{export}` |",
        f"| resumed from | {resumed_from or 'no checkpoint (fresh run)'} |",
        "",
        f"Command: `{launch.describe()}`",
    ]
    per_domain = {name: curve[-1] for name, curve in validation.items() if name != OVERALL_DOMAIN}
    if per_domain:
        lines += ["", "## Validation (held-out documents)", "", "| domain | loss | perplexity |", "|---|---:|---:|"]
        lines += [f"| {name} | {loss:.4f} | {ppl:,.1f} |" for name, (_, loss, ppl) in sorted(per_domain.items())]
    lines += _sample_lines(samples)
    create_markdown_artifact(key="pretrain-summary", markdown="\n".join(lines),
                             description=f"pretrain {preset}: result, validation, samples, where the outputs are")
    if rows:
        fields = ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s")
        table = [{k: (int(r[k]) if k == "step" else round(r[k], 6)) for k in fields if k in r} for r in sample_rows(rows)]
        create_table_artifact(key="pretrain-loss", table=table,
                              description=f"loss curve ({len(table)} of {len(rows)} steps) from {output}/metrics.csv")
        validation_at = {step: loss for step, loss, _ in overall}
        plotted = [{**r, **({"val_loss": validation_at[int(r["step"])]} if int(r["step"]) in validation_at else {})}
                   for r in rows]
        plots = ["# Training curves", "", png_markdown(loss_figure(plotted), "training loss and learning rate")]
        if per_domain:
            curves = {name: [(step, loss) for step, loss, _ in curve] for name, curve in validation.items()}
            plots += ["", png_markdown(validation_figure(curves), "validation loss per domain")]
        create_markdown_artifact(key="pretrain-loss-plot", markdown="\n".join(plots),
                                 description="training loss, learning rate and validation loss per domain")
    asset = None
    if model_file is not None and model_file.is_file():
        create_link_artifact(key="pretrain-model", link=model_file.resolve().as_uri(),
                             link_text=str(model_file), description=f"exported {preset} model (safetensors)")
        asset = record_model_asset(model_file, data_dir, {
            "preset": preset, "model": config.model, "step": result.get("step"), "final_loss": final_loss,
            "data": str(data_dir)})
    return {"final_loss": final_loss, "tokens_per_s": tokens_per_s, "asset": asset,
            "validation_loss": overall[-1][1] if overall else None,
            "model": str(model_file) if model_file else None}


# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------
@flow(name="pretrain", log_prints=True)
def pretrain(preset: str = "sigma-tiny", data: str = "runs/tokens", output: str = "runs/pretrain",
             steps: int | None = None, nodes: int = 1, gpus_per_node: int = 8, hostfile: str | None = None,
             overrides: dict[str, Any] | None = None, stop_grace_s: float | None = None,
             init_from: str | None = None) -> dict[str, Any]:
    """Pretrain PanGu-α / PanGu-Σ from a preset with DeepSpeed; a rerun with the same output resumes.

    A preempted run (SIGTERM: every rank checkpointed) ends in the state "Preempted", not Failed.

    Args:
        preset: pretrain preset (alpha-tiny, sigma-tiny, alpha-350m, sigma-1t) or a YAML path.
        data: packed token directory, or a root of versions (the newest is used); the model's vocabulary
            and PanGu-Σ's expert groups (one per domain) come from it.
        output: run directory (checkpoints/, export/, metrics); the same directory resumes.
        steps: optimizer steps (default: the preset's train_steps).
        nodes: servers; more than one uses the deepspeed launcher and a hostfile.
        gpus_per_node: ranks per node (one process on a machine without GPUs).
        hostfile: DeepSpeed hostfile (`host slots=N` per node); needed for more than one node.
        overrides: TrainConfig fields with dotted keys, e.g. {"optimizer.lr": 3e-4, "validation_every": 50}.
        init_from: an export to start from instead of random weights: the same model, or, for PanGu-Σ, a
            dense PanGu-α export (`pangu model import` of a released checkpoint, for one) whose FFN every
            expert copies; its vocabulary must be the data's tokenizer's.
        stop_grace_s: seconds a stopped job (a cancellation, a SIGTERM) has to finish its step and write its
            checkpoint before it is killed; default: the planner's step and checkpoint times for the preset
            on this cluster, doubled, and at least 120 s.
    """
    from pangu_model.train import (EXPORT_DIR, DataMismatch, LayoutError, ResumeMismatch, check_layout,
                                   check_resumable, fewest_ranks, finished_run, fit_to_data, latest_checkpoint_tag,
                                   load_train_config)

    logger = get_run_logger()
    data_dir, data_note = resolve_data(data)
    logger.info("data: %s", data_note)
    out = Path(output).expanduser().resolve()
    overrides = dict(overrides or {})
    if init_from is not None:
        overrides["init_from"] = str(Path(init_from).expanduser().resolve())
    fields: dict[str, Any] = {"data": str(data_dir), "output": str(out), **overrides}
    if steps is not None:
        fields["train_steps"] = steps
    try:
        # The model's vocabulary and PanGu-Σ's expert groups come from the data; checked before launching.
        config = fit_to_data(load_train_config(preset, fields))
    except DataMismatch:
        raise
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ValueError(f"pretrain preset {preset!r} with {fields}: {one_line(exc)}") from exc
    logger.info("model: %s", describe_model(config))
    finished = finished_run(out, config)  # the same request, done: what follows is said of a job only if one runs
    grace = stop_grace_s if stop_grace_s is not None else default_stop_grace(config, nodes, gpus_per_node)
    if finished is None:
        logger.info("a stop (cancellation, SIGTERM) gives the job %.0fs to checkpoint before SIGKILL", grace)
    try:  # a hostfile that does not give the nodes, a plan that does not fit them: one line
        launch = build_launch(preset, data_dir, out, steps, overrides, nodes=nodes, gpus_per_node=gpus_per_node,
                              hostfile=hostfile, expert_parallel=config.expert_parallel,
                              tensor_parallel=config.tensor_parallel, grace_s=grace,
                              fewest_ranks=fewest_ranks(config))
    except ValueError as exc:
        raise ValueError(f"pretrain {preset}: {one_line(exc)}") from None
    if launch.note and finished is None:
        logger.info("%s", launch.note)
    try:  # the trainer's own check, before anything starts: a layout it cannot run on this many ranks
        check_layout(config, launch.world_size, launch.world_size // launch.nodes)
    except LayoutError as exc:
        where = launch.note or f"{launch.world_size} rank(s) on {launch.nodes} node(s) ({launch.launcher})"
        raise ValueError(f"pretrain {preset}: {exc}; this launch: {where}") from None
    try:  # a checkpoint of another model or data in the output: refused here, not by every rank after launching
        check_resumable(out, config)
    except ResumeMismatch as exc:
        raise ValueError(f"pretrain {preset}: {exc}") from None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    resumed_from = latest_checkpoint_tag(out)
    if finished is not None:
        logger.info("output %s holds this run finished at step %d (checkpoint %s) and exported: nothing to "
                    "train, the job is not launched", out, finished, resumed_from)
    elif resumed_from:
        logger.info("output %s has checkpoint %s: the trainer resumes from it (same output = resume)", out,
                    resumed_from)
    else:
        logger.info("output %s has no checkpoint: fresh run of %d steps", out, config.train_steps)
    if launch.hostfile and finished is None:
        logger.info("hostfile for %d nodes written to %s", launch.nodes, launch.hostfile)
    try:
        if finished is not None:
            result = {"status": "completed", "step": finished, "output": str(out), "seconds": 0.0,
                      "export": str(out / EXPORT_DIR), "launched": False}
        else:
            result = run_training(launch, str(out), config.train_steps)
    except TrainingPreempted as exc:
        # Not a failure: every rank checkpointed and the same call resumes. The run ends in a state of
        # its own (of type Cancelled, so nothing downstream treats it as done), named so in the UI.
        logger.warning("%s", exc)
        return Cancelled(name="Preempted", message=str(exc).splitlines()[0])
    except TrainingFailed:
        if created:  # a job refused at start (a plan that cannot fit, bad data) wrote nothing: leave nothing
            with contextlib.suppress(OSError):
                out.rmdir()  # only an empty directory goes
        raise
    samples = sample_task(result["export"]) if result.get("export") else None
    published = publish(preset, config, data_dir, data_note, out, result, launch, resumed_from, samples)
    summary = {"preset": preset, "status": result["status"], "step": result.get("step"), "data": str(data_dir),
               "output": str(out), "export": result.get("export"), "launcher": launch.launcher,
               "world_size": launch.world_size, "resumed_from": resumed_from,
               "launched": result.get("launched", True), **published}
    logger.info("pretrain %s: step %s, final loss %s, export %s", preset, summary["step"],
                _fmt(summary["final_loss"], ".4f"), summary["export"])
    return summary


def check_before_launch(args: argparse.Namespace) -> None:
    """What `pangu pretrain` can refuse before a flow run starts: the data, the output, the preset, the steps,
    the nodes, the model to start from, and a checkpoint in the output that another config wrote (raises)."""
    from cleaning.outputs import check_output_directory
    from cleaning.yamlfile import parse_overrides
    from pangu_model.run_lock import check_output_free
    from pangu_model.train import check_resumable, fit_to_data, load_train_config

    data_dir, _ = resolve_data(args.data)
    check_output_directory(Path(args.output), "the training run")
    check_output_free(Path(args.output))
    if args.hostfile is not None or args.nodes > 1:
        cluster_of(args.nodes, args.hostfile)
    fields = {"data": str(data_dir), **parse_overrides(args.set)}
    if args.steps is not None:
        fields["train_steps"] = args.steps
    if getattr(args, "init_from", None):
        fields["init_from"] = str(Path(args.init_from).expanduser().resolve())
    check_resumable(args.output, fit_to_data(load_train_config(args.preset, fields)))


def pretrain_from_cli(args: argparse.Namespace) -> int:
    from cleaning.yamlfile import parse_overrides

    state = pretrain(preset=args.preset, data=args.data, output=args.output, steps=args.steps, nodes=args.nodes,
                     gpus_per_node=args.gpus_per_node, hostfile=args.hostfile, overrides=parse_overrides(args.set),
                     stop_grace_s=args.stop_grace, init_from=args.init_from, return_state=True)
    if not state.is_completed():
        print(f"pretrain {args.preset}: {state.name}: {state.message}", file=sys.stderr)
        return 143 if state.message and "preempted" in state.message else 1
    result = state.result()
    print(json.dumps(result, indent=2, ensure_ascii=False), file=sys.stderr)
    return 0
