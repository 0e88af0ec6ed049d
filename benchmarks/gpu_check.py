"""GPU check: CUDA tests, 350m dense MFU, ECSS vs all-on-device, host↔device copies, tensor parallel → one JSON.

    bash benchmarks/gpu_check.sh                          # the wrapper: environment, then this module
    python -m benchmarks.gpu_check                        # every part (CUDA parts skip without a GPU)
    python -m benchmarks.gpu_check --parts dense_350m --steps 50
    python -m benchmarks.gpu_check --cpu-smoke            # every CPU-safe part at tiny size (tests)
    python -m benchmarks.gpu_check --summary FILE         # the human summary of a written JSON

Parts (each a function returning a dict with `status` — ok / skipped: reason / failed: one line — and
`seconds`; one part failing never stops the others, and the JSON is rewritten after every part and
every training run, so a part cut off by its time budget leaves the figures of the ones before it):

* `environment`: torch / DeepSpeed versions, CUDA device, nvcc (not needed: DeepSpeed's cpu_adam builds
  with the host C++ compiler, and the dense optimizer is torch's fused AdamW), CPUs, host RAM;
* `h2d_bandwidth`: pinned and pageable host→device / device→host copies, CUDA events;
* `dense_350m`: the `alpha-350m` preset in bf16 on synthetic packed tokens, through
  `pangu_model.train.Trainer` (world of one), tokens/s and MFU from metrics.csv beside the planner's
  prediction (pangu_model/plan.py); attention "auto" (FlexAttention on CUDA) first, then "sdpa" and
  `compile=True` if time is left;
* `cuda_tests`: `pytest -m cuda` on the test files that carry the marker;
* `ecss_vs_device`: a `sigma-tiny`-shaped model widened to d_model 1024 / d_ff 4096, experts on the
  device vs ECSS (pinned host masters, host Adam) at growing experts per domain (4 domains),
  until the device runs out of memory or the time budget ends;
* `tensor_parallel_2` (a machine with 2 GPUs or more; skipped on one): `alpha-350m` in bf16 at
  tensor_parallel 2 on 2 GPUs (torchrun, NCCL) against tensor_parallel 1 on one, the same rows a step
  and dropout off: the losses step by step, tokens/s and memory per GPU of both, beside the planner's.

Every training run is a fresh process (`--run-one SPEC`): DeepSpeed and process-group state do not
reset in-process, and a run past its time is killed with its process group. Checkpoints are not written
(the trainer's end-of-run save is replaced by a no-op: a 64-experts-per-domain ECSS shard is ~50 GB).

This module imports only the standard library at the top, so `--summary` and `--setup-failed` work in
an interpreter without torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = ROOT / "runs" / "gpu_check"  # /runs/ is git-ignored
JSON_NAME = "gpu_check.json"
SCHEMA = 1
PARTS = ["environment", "cuda_tests", "dense_350m", "ecss_vs_device", "h2d_bandwidth", "tensor_parallel_2"]
MFU_TARGET = 0.45
GIB = 2**30

# Seconds per part (a part also never runs into the reserve of the parts after it, below). The order
# of `schedule()` is the order of importance: the 350m MFU figure before the CUDA tests, the ECSS
# ladder, tensor parallel 2 (machines with 2 GPUs), and last the extra dense variants ("if time allows").
PART_CAPS = {"environment": 60, "h2d_bandwidth": 45, "dense_350m": 150, "cuda_tests": 120,
             "ecss_vs_device": 220, "tensor_parallel_2": 150, "dense_350m_variants": 200}
PART_RESERVES = {"environment": 5, "h2d_bandwidth": 10, "dense_350m": 60, "cuda_tests": 45,
                 "ecss_vs_device": 90, "tensor_parallel_2": 70, "dense_350m_variants": 0}
# bf16 losses of tensor_parallel 2 against 1 part by rounding (other reduction orders) that grows over the steps;
# fp32 (the CPU smoke run) agrees to fp32 noise.
TP_LOSS_RTOL = {"bf16": 2e-2, "fp32": 1e-5}
MIN_RUN_S = 20.0  # a training run is not started with less time than this left


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    # Not cleaning.writers.write_json_atomic: this module runs with the standard library alone, so that a GPU image
    # missing the project's packages still gets a report saying so.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def rounded(value: Any, digits: int = 1) -> float | None:
    value = finite(value)
    return None if value is None else round(value, digits)


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def child_env(cpu_only: bool) -> dict[str, str]:
    """The environment of a training process: a world of one (no launcher variables), unbuffered."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
            "LOCAL_SIZE", "CROSS_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


_CHILD_GROUPS: set[int] = set()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM / SIGINT (the wrapper's hard time limit): end the running child's group, then unwind so
    that the report is written with what finished."""
    for pgid in list(_CHILD_GROUPS):
        _kill_group(pgid)
    raise SystemExit(128 + signum)


def run_process(cmd: list[str], timeout: float, log: Path, env: dict[str, str], header: str) -> tuple[int | None, float, str]:
    """Run `cmd` in its own process group, output appended to `log`; on timeout the whole group is
    killed. Returns (exit code or None on timeout, seconds, tail of this process's output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n===== {header} ({now_iso()}) =====\n$ {' '.join(cmd)}\n")
        fh.flush()
        offset = fh.tell()
        start = time.monotonic()
        # Its own process group (same session, so a machine that ends a command's session ends it too):
        # a run past its time goes with everything it started (inductor's compile workers included).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)
        _CHILD_GROUPS.add(proc.pid)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(proc.pid)
            proc.wait()
        finally:
            _CHILD_GROUPS.discard(proc.pid)
        seconds = time.monotonic() - start
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        tail = fh.read()[-3000:]
    return code, seconds, tail


# ---------------------------------------------------------------------------------------------
# The report: one JSON, rewritten after every change
# ---------------------------------------------------------------------------------------------
class Report:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"schema": SCHEMA, **meta, "parts": {}}
        self.save()

    def set_part(self, name: str, result: dict[str, Any]) -> None:
        self.data["parts"][name] = result
        self.save()

    def save(self) -> None:
        self.data["updated"] = now_iso()
        write_json_atomic(self.path, self.data)


class Context:
    """What every part gets: the options, CUDA or not, where to write, and the clock."""

    def __init__(self, args: argparse.Namespace, cuda: bool, workdir: Path, out_dir: Path, report: Report,
                 deadline: float) -> None:
        self.args = args
        self.cuda = cuda
        self.smoke = bool(args.cpu_smoke) or not cuda
        self.workdir = workdir
        self.out_dir = out_dir
        self.report = report
        self.deadline = deadline
        self.part_deadline = deadline
        self.runs_log = out_dir / "runs.log"
        self.current: str | None = None  # the part running now (an interrupted one is marked failed)
        self._data: dict[str, Path] = {}

    def left(self) -> float:
        return self.part_deadline - time.monotonic()

    def gpus(self) -> int:
        if not self.cuda:
            return 0
        import torch

        return torch.cuda.device_count()

    def runs(self, part: str) -> bool:
        """Whether `part` will do work here (a skipped part reserves no time of the parts before it)."""
        return part != "tensor_parallel_2" or not self.cuda or self.gpus() >= 2

    def tokens_dir(self, vocab: int, tokens_needed: int) -> Path:
        """A synthetic packed token dir (benchmarks/train_throughput.py) with 4 domains, enough tokens
        for `tokens_needed` without cycling."""
        from benchmarks.train_throughput import synthetic_tokens

        documents = max(400, math.ceil(1.5 * tokens_needed / 1025))
        key = f"tokens-v{vocab}-d{documents}"
        if key not in self._data:
            self._data[key] = synthetic_tokens(self.workdir / key, vocab=vocab, domains=4, documents=documents)
        return self._data[key]


# ---------------------------------------------------------------------------------------------
# One training run in a fresh process
# ---------------------------------------------------------------------------------------------
def plan_summary(config: Any, gpu: str, gpus: int = 1) -> dict[str, Any]:
    """The planner's prediction for `config` on `gpus` GPUs of kind `gpu` in one node (pangu_model/plan.py)."""
    from pangu_model.plan import plan_for

    plan = plan_for(config, nodes=1, gpus_per_node=gpus, gpu=gpu)
    return {
        "gpu": gpu, "fits": plan.fits, "step_time_s": rounded(plan.step_time_s, 4), "mfu": rounded(plan.mfu, 4),
        "tokens_per_s": rounded(plan.tokens_per_s), "gpu_bytes_per_gpu": int(plan.gpu_bytes_per_gpu),
        "gpu_gib_per_gpu": rounded(plan.gpu_bytes_per_gpu / GIB, 2),
        "host_bytes_per_gpu": int(plan.host_bytes_per_gpu),
        "h2d_bytes_per_step": int(plan.h2d_bytes_per_gpu_per_step),
        "reasons": list(plan.reasons)[:3],
    }


def run_one(spec: dict[str, Any]) -> int:
    """`--run-one`: one training run of `spec` in this process; the result goes to spec["result"]
    (written before the run too, so a run killed at its time limit still leaves the plan). Under torchrun
    rank 0 writes it and reads the run's metrics; rank r > 0 writes its status and memory to
    `<result>.rank<r>`."""
    rank = int(os.environ.get("RANK", "0"))
    result_path = Path(spec["result"] + (f".rank{rank}" if rank else ""))
    result: dict[str, Any] = {"name": spec["name"], "rank": rank, "status": "starting"}

    def save() -> None:
        write_json_atomic(result_path, result)

    started = time.monotonic()
    try:
        import torch

        from pangu_model.plan import PlanDoesNotFit
        from pangu_model.metrics import read_metrics
        from pangu_model.train import Trainer, fit_to_data, load_train_config

        config = load_train_config(spec["preset"], spec["overrides"])
        result["config"] = {k: v for k, v in config.model_dump(mode="json").items()
                            if k in ("model", "model_overrides", "micro_batch_size", "seq_len", "precision",
                                     "zero_stage", "ecss", "attention_backend", "compile", "train_steps")}
        try:
            result["planned"] = plan_summary(fit_to_data(config), spec.get("plan_gpu", "h200"),
                                             int(spec.get("ranks", 1)))
        except Exception as exc:  # the plan is context, not the measurement
            result["planned"] = {"error": one_line(exc)}
        result["status"] = "running"
        save()
        cuda = torch.cuda.is_available()
        trainer = None
        try:
            trainer = Trainer(config)
            # No checkpoints: the run's end-of-training save would write every expert and Adam state.
            trainer.save_checkpoint = lambda: None  # type: ignore[method-assign]
            result["setup_s"] = round(time.monotonic() - started, 2)
            save()
            run_start = time.monotonic()
            trainer.run()
            result["run_s"] = round(time.monotonic() - run_start, 2)
            if rank:
                result["status"] = "ok"  # the run's metrics are rank 0's to read
            else:
                history = read_metrics(config.output)
                warmup = int(spec.get("warmup", 0))
                timed = history[warmup:] or history
                tokens = sum(r["tokens"] for r in timed)
                seconds = sum(r["seconds"] for r in timed)
                mfu = finite(statistics.median(r["mfu"] for r in timed))
                result.update({
                    "status": "ok",
                    "steps": len(history), "timed_steps": len(timed),
                    "tokens_per_step": int(timed[-1]["tokens"]),
                    "tokens_per_s": rounded(statistics.median(r["tokens_per_s"] for r in timed)),
                    "tokens_per_s_mean": rounded(tokens / seconds if seconds else float("nan")),
                    "step_s": rounded(statistics.median(r["seconds"] for r in timed), 4),
                    "first_step_s": rounded(history[0]["seconds"], 2),
                    "mfu": None if mfu is None else round(mfu, 4),
                    "loss_first": rounded(history[0]["loss"], 4), "loss_last": rounded(history[-1]["loss"], 4),
                    "losses": [float(r["loss"]) for r in history],
                })
                if trainer.ecss is not None:
                    banks = trainer.ecss.banks.values()
                    pinned = sum(t.numel() * t.element_size() for b in banks for t in b.host.values()
                                 if t.is_pinned())
                    result["host_bytes"] = int(trainer.ecss.host_bytes())
                    result["host_gib"] = round(result["host_bytes"] / GIB, 2)
                    result["pinned_host_bytes"] = int(pinned)
                    result["pinned_host_gib"] = round(pinned / GIB, 2)
                    if cuda and hasattr(torch.cuda, "host_memory_stats"):  # what the allocator pinned for them
                        held = torch.cuda.host_memory_stats().get("allocated_bytes.current")
                        result["pinned_allocator_gib"] = None if held is None else round(held / GIB, 2)
        except PlanDoesNotFit as exc:
            result.update(status="does_not_fit", error=one_line(exc, 500))
        except Exception as exc:
            text = one_line(exc, 500)
            oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text.lower()
            result.update(status="oom" if oom else f"failed: {one_line(exc)}", error=text)
        finally:
            if trainer is not None:
                trainer.close()
        if cuda:
            result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        import resource

        result["host_max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
    except Exception as exc:
        result.update(status=f"failed: {one_line(exc)}")
    result["process_s"] = round(time.monotonic() - started, 2)
    save()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    return 0


def train_run(ctx: Context, name: str, preset: str, overrides: dict[str, Any], warmup: int,
              timeout: float | None = None, ranks: int = 1) -> dict[str, Any]:
    """One `--run-one` process (`ranks` > 1: under torchrun, one per GPU); its result dict (with `status`,
    `wall_s`; with ranks, `ranks`: each rank's status and memory)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    run_dir = ctx.workdir / "runs" / slug
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {"name": name, "preset": preset, "warmup": warmup, "result": str(run_dir / "result.json"),
            "plan_gpu": ctx.args.plan_gpu, "ranks": ranks,
            "overrides": {**overrides, "output": str(run_dir / "output"), "checkpoint_every": 0, "export": False,
                          "resume": False, "progress_bar": False, "validation_every": 0,
                          "validation_fraction": 0.0}}
    limit = ctx.left() if timeout is None else min(timeout, ctx.left())
    if limit < MIN_RUN_S:
        return {"name": name, "status": f"skipped: time budget ({max(0, int(limit))} s left)"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-one", json.dumps(spec)]
    if ranks > 1:
        from pangu_model.train import _free_port

        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_free_port())]
    code, seconds, tail = run_process(cmd, limit, ctx.runs_log, child_env(not ctx.cuda), name)
    result_file = Path(spec["result"])
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {"name": name}
    if ranks > 1:
        result["ranks"] = []
        for rank in range(1, ranks):
            try:
                other = json.loads(Path(f"{spec['result']}.rank{rank}").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                other = {"rank": rank, "status": "no result"}
            result["ranks"].append({k: other.get(k) for k in ("rank", "status", "max_memory_allocated_gib",
                                                              "max_memory_reserved_gib", "host_max_rss_gib")})
        if result.get("status") == "ok" and any(r["status"] != "ok" for r in result["ranks"]):
            result["status"] = f"failed: rank(s) {[r['rank'] for r in result['ranks'] if r['status'] != 'ok']} did not finish"
    if code is None:
        result["status"] = f"timed_out: killed after {seconds:.0f} s (was {result.get('status', 'starting')})"
    elif code != 0 or result.get("status") in (None, "starting", "running"):
        result["status"] = f"failed: exit code {code}: {one_line(_last_error(tail))}"
    if not str(result.get("status")).startswith(("ok", "oom", "does_not_fit")):
        result["log_tail"] = tail[-1500:]
    result["wall_s"] = round(seconds, 1)
    shutil.rmtree(run_dir / "output", ignore_errors=True)
    return result


def _last_error(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:)", line):
            return line
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def environment(ctx: Context) -> dict[str, Any]:
    import platform

    import torch

    out: dict[str, Any] = {
        "status": "ok",
        "python": platform.python_version(), "executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "host_ram_gib": rounded((host_ram_bytes() or 0) / GIB, 1),
        "torch_extensions_dir": None,
        "features": {
            "grouped_mm": hasattr(torch.nn.functional, "grouped_mm"),
            "flex_attention": _has_module("torch.nn.attention.flex_attention"),
            "varlen_attention": _has_module("torch.nn.attention.varlen"),
        },
    }
    try:
        import pangu_model  # noqa: F401  (sets TORCH_EXTENSIONS_DIR beside the interpreter)

        out["torch_extensions_dir"] = os.environ.get("TORCH_EXTENSIONS_DIR")
    except Exception as exc:
        out["pangu_model_import"] = one_line(exc)
    try:
        from pangu_model.ops import deepspeed_accelerator_follows_torch

        deepspeed_accelerator_follows_torch()  # as the training program chooses it (no probe warning on CPU)
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception as exc:
        out["deepspeed"] = None
        out["status"] = f"failed: deepspeed does not import: {one_line(exc)}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update({
            "device": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "device_memory_gib": round(props.total_memory / GIB, 1),
        })
        from pangu_model.metrics import peak_flops

        out["peak_bf16_tflops"] = rounded((peak_flops("bf16") or 0) / 1e12, 1) or None  # MFU's denominator
        try:
            out["matmul_bf16_tflops"] = _matmul_tflops()  # what the chip reaches on one large GEMM
        except Exception as exc:
            out["matmul_bf16_tflops"] = one_line(exc)
    nvcc = shutil.which("nvcc") or next((str(p) for p in [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"]
                                         if p.exists()), None)
    out["nvcc"] = nvcc
    if nvcc:
        try:
            text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
            out["nvcc_version"] = next((l.strip() for l in text.splitlines() if "release" in l), text.strip()[-80:])
        except Exception as exc:
            out["nvcc_version"] = one_line(exc)
    out["cxx"] = next((shutil.which(c) for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    out["ninja"] = shutil.which("ninja") or (_has_module("ninja") and "python package") or None
    out["note"] = ("no CUDA JIT build is needed: the dense optimizer is torch's fused AdamW and ECSS's "
                   "host Adam (DeepSpeed's CPU kernel) builds with the host C++ compiler (cxx, ninja)")
    return out


def _matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n×n×n matrix products on random data: the median TFLOP/s of `repeats` after 3 warm-ups."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def h2d_bandwidth(ctx: Context) -> dict[str, Any]:
    if not ctx.cuda:
        return {"status": "skipped: no CUDA"}
    import torch

    repeats = 5
    device = torch.device("cuda", 0)
    sizes = [256, 512, 1024] if not ctx.args.quick_bandwidth else [64]
    rows = []

    def timed(fn: Callable[[], Any]) -> list[float]:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times

    for mb in sizes:
        if ctx.left() < 3:
            break
        n = mb * 2**20
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
        pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        cases = {
            "h2d_pinned": lambda: dev.copy_(pinned, non_blocking=True),
            "d2h_pinned": lambda: pinned.copy_(dev, non_blocking=True),
            "h2d_pageable": lambda: dev.copy_(pageable),
            "d2h_pageable": lambda: pageable.copy_(dev),
        }
        row: dict[str, Any] = {"mb": mb}
        for key, fn in cases.items():
            times = timed(fn)
            row[key + "_gbs"] = round(n / statistics.median(times) / 1e9, 2)
            row[key + "_best_gbs"] = round(n / min(times) / 1e9, 2)
        rows.append(row)
        del pinned, pageable, dev
        torch.cuda.empty_cache()
    # fp32 pinned masters cast to bf16 on the device: what ECSS copied before its pinned bf16 shadows (the
    # fp32 bytes cross PCIe, SPEC §10); the shadows' copies are the h2d_pinned rows above.
    n = 2**28  # 1 GiB of fp32
    master = torch.empty(n, dtype=torch.float32, pin_memory=True).fill_(1.0)
    times = timed(lambda: master.to(device, torch.bfloat16, non_blocking=True))
    ecss_like = round(n * 4 / statistics.median(times) / 1e9, 2)
    del master
    torch.cuda.empty_cache()
    # The caching host allocator keeps freed pinned blocks: give them back before the training runs.
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache", "_cuda_hostEmptyCache"):
        if hasattr(torch._C, name):
            getattr(torch._C, name)()
            break
    best = {key: max(r[key + "_gbs"] for r in rows) for key in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")}
    return {"status": "ok", "repeats": repeats, "sizes": rows, "best_median_gbs": best,
            "fp32_pinned_to_bf16_device_gbs": ecss_like,
            "reference": "SPEC §10: PCIe Gen5 ≈ 55 GB/s pinned host→device per GPU"}


def cuda_test_files() -> list[str]:
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"pytest\.mark\.cuda\b", text):
            files.append(str(path.relative_to(ROOT)))
    return files


def cuda_tests(ctx: Context) -> dict[str, Any]:
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *files]
    if not ctx.cuda:
        return {"status": "skipped: no CUDA", "files": files, "command": " ".join(cmd[1:])}
    if not files:
        return {"status": "skipped: no test file carries the cuda marker"}
    log = ctx.out_dir / "cuda_tests.log"
    log.unlink(missing_ok=True)
    code, seconds, _ = run_process(cmd, ctx.left(), log, child_env(False), "pytest -m cuda")
    text = log.read_text(encoding="utf-8", errors="replace")
    counts = {key: 0 for key in ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed")}
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)]
    if summary:
        for number, key in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary[-1]):
            counts["errors" if key.startswith("error") else key] = int(number)
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "files": files, "exit_code": code, **counts,
                           "log": str(log), "tail": text[-2500:]}
    if code is None:
        out["status"] = f"failed: timed out after {seconds:.0f} s"
    elif counts["failed"] or counts["errors"] or code not in (0, 5):
        out["status"] = f"failed: {counts['failed']} failed, {counts['errors']} errors (exit {code})"
    elif counts["passed"] == 0:
        out["status"] = "ok" if code == 0 else "failed: no CUDA test ran"
    else:
        out["status"] = "ok"
    return out


def _dense_runs(ctx: Context, variants: list[str]) -> list[dict[str, Any]]:
    args = ctx.args
    if ctx.smoke:
        preset, steps, mbs, seq, vocab, precision = "alpha-tiny", 2, 2, 128, 2000, "fp32"
    else:
        preset, steps, mbs, seq, vocab, precision = "alpha-350m", args.steps, args.micro_batch, args.seq_len, 40000, "bf16"
    data = ctx.tokens_dir(vocab, steps * mbs * (seq + 1))
    warmup = min(args.warmup, steps - 1) if not ctx.smoke else 1
    runs = []
    for variant in variants:
        backend = "sdpa" if variant == "sdpa" else "auto"
        overrides = {"data": str(data), "train_steps": steps, "micro_batch_size": mbs, "seq_len": seq,
                     "gradient_accumulation_steps": 1, "precision": precision,
                     "attention_backend": backend, "compile": variant == "compile"}
        cap = args.dense_run_s if variant == "auto" else args.dense_variant_s
        result = train_run(ctx, f"{preset} {variant}", preset, overrides, warmup, timeout=cap)
        result["variant"] = variant
        runs.append(result)
    return runs


def _dense_result(ctx: Context, runs: list[dict[str, Any]], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    by_variant = dict((previous or {}).get("runs", {}))
    for run in runs:
        by_variant[run["variant"]] = run
    out: dict[str, Any] = {"preset": "alpha-tiny" if ctx.smoke else "alpha-350m", "runs": by_variant}
    if ctx.smoke:
        out["substitute"] = ("cpu-smoke: alpha-tiny, 2 steps, fp32 on CPU" if ctx.args.cpu_smoke
                             else "no CUDA: alpha-tiny, 2 steps, fp32 on CPU instead of alpha-350m")
    else:
        out.update(micro_batch_size=ctx.args.micro_batch, seq_len=ctx.args.seq_len, steps=ctx.args.steps,
                   warmup_steps_excluded=ctx.args.warmup, mfu_target=MFU_TARGET)
    ok = [r for r in by_variant.values() if r.get("status") == "ok"]
    main = by_variant.get("auto")
    if ok:
        best = max(ok, key=lambda r: r.get("tokens_per_s") or 0)
        out["best_variant"] = best["variant"]
        out["tokens_per_s"] = best.get("tokens_per_s")
        out["mfu"] = best.get("mfu")
        out["max_memory_allocated_gib"] = best.get("max_memory_allocated_gib")
        planned = best.get("planned") or {}
        out["predicted_vs_measured"] = {
            "step_time_s": {"planned": planned.get("step_time_s"), "measured": best.get("step_s")},
            "mfu": {"planned": planned.get("mfu"), "measured": best.get("mfu")},
            "gpu_gib": {"planned": planned.get("gpu_gib_per_gpu"), "measured": best.get("max_memory_allocated_gib")},
        }
        out["meets_target"] = None if ctx.smoke or best.get("mfu") is None else bool(best["mfu"] >= MFU_TARGET)
    if main is None or not main.get("status"):
        out["status"] = "failed: the main run did not run"
    elif main["status"] == "ok":
        out["status"] = "ok"
    elif str(main["status"]).startswith("skipped"):
        out["status"] = main["status"]
    else:
        out["status"] = f"failed: {one_line(str(main['status']), 200)}"
    return out


def dense_350m(ctx: Context) -> dict[str, Any]:
    """The main run (attention "auto"); the variants are `dense_350m_variants`, run last."""
    runs = _dense_runs(ctx, ["auto"])
    return _dense_result(ctx, runs)


def dense_350m_variants(ctx: Context) -> dict[str, Any]:
    previous = ctx.report.data["parts"].get("dense_350m", {})
    if ctx.smoke:
        result = dict(previous)
        result["variants_skipped"] = "cpu: sdpa and compile are CUDA comparisons"
        return result
    started = time.monotonic()
    variants = [v for v in ctx.args.dense_variants if v != "auto"]
    runs = []
    for variant in variants:
        if ctx.left() < MIN_RUN_S:
            runs.append({"variant": variant, "status": f"skipped: time budget ({max(0, int(ctx.left()))} s left)"})
            continue
        runs += _dense_runs(ctx, [variant])
        ctx.report.set_part("dense_350m", {**_dense_result(ctx, runs, previous),
                                           "seconds": previous.get("seconds", 0)})
    result = _dense_result(ctx, runs, previous)
    result["seconds"] = round(previous.get("seconds", 0) + time.monotonic() - started, 1)
    return result


def ecss_vs_device(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    if ctx.smoke:
        counts, steps, warmup, mbs, seq, vocab, precision = [2], 2, 1, 2, 128, 2000, "fp32"
        shape: dict[str, Any] = {}
    else:
        counts, steps, warmup, mbs, seq, vocab, precision = (args.experts_per_domain, args.ecss_steps, args.ecss_warmup,
                                                             args.ecss_micro_batch or args.micro_batch, args.seq_len,
                                                             40000, "bf16")
        shape = {"d_model": args.ecss_d_model, "d_ff": args.ecss_d_ff, "num_heads": args.ecss_heads,
                 "max_seq_len": seq}
    data = ctx.tokens_dir(vocab, steps * mbs * (seq + 1))
    out: dict[str, Any] = {"model": "sigma-tiny", "shape": shape or "preset", "domains": 4,
                           "micro_batch_size": mbs, "seq_len": seq, "steps": steps, "warmup_steps_excluded": warmup,
                           "precision": precision, "attention_backend": args.ecss_attention, "rows": []}
    if ctx.smoke:
        out["substitute"] = "cpu-smoke: sigma-tiny as preset (d_model 64), 2 experts per domain, fp32 on CPU"
    # ECSS's host Adam (DeepSpeed's CPU kernel, pangu_model/host_adam.py) is JIT-built on first use (host
    # compiler): build it once, outside the timed runs.
    prebuild = [sys.executable, "-m", "pangu_model.ops", "HostAdamBuilder"]
    code, seconds, tail = run_process(prebuild, min(ctx.left(), args.cpu_adam_build_s), ctx.runs_log,
                                      child_env(not ctx.cuda), "cpu_adam build")
    out["cpu_adam_build"] = {"status": "ok" if code == 0 else ("timed_out" if code is None else f"failed: {one_line(_last_error(tail))}"),
                             "seconds": round(seconds, 1)}
    if code != 0:
        out["status"] = f"failed: the host Adam kernel did not build: {out['cpu_adam_build']['status']}"
        return out
    stop = None
    for per_domain in counts:
        row: dict[str, Any] = {"experts_per_domain": per_domain, "experts_per_layer": 4 * per_domain}
        for mode in ("device", "ecss"):
            if mode == "device" and stop == "device":
                row[mode] = {"status": "skipped: a smaller expert count did not fit on the device"}
                continue
            overrides = {"data": str(data), "train_steps": steps, "micro_batch_size": mbs, "seq_len": seq,
                         "gradient_accumulation_steps": 1, "precision": precision, "zero_stage": args.ecss_zero_stage,
                         "ecss": mode == "ecss", "attention_backend": args.ecss_attention, "log_every": 50,
                         "model_overrides": {**shape, "experts_per_domain": per_domain}}
            result = train_run(ctx, f"sigma-tiny x{per_domain} {mode}", "sigma-tiny", overrides, warmup,
                               timeout=args.ecss_run_s)
            keep = ("status", "tokens_per_s", "tokens_per_s_mean", "step_s", "first_step_s", "mfu",
                    "max_memory_allocated_gib", "max_memory_reserved_gib", "host_bytes", "host_gib",
                    "pinned_host_bytes", "pinned_host_gib", "pinned_allocator_gib", "host_max_rss_gib", "planned", "wall_s", "setup_s",
                    "loss_first", "loss_last", "error", "log_tail")
            row[mode] = {k: result[k] for k in keep if k in result}
            status = str(result["status"])
            if mode == "device" and status in ("oom", "does_not_fit"):
                stop = "device"  # ECSS still runs at this count; no larger counts after it
            elif not status.startswith("ok") and not (mode == "device" and status in ("oom", "does_not_fit")):
                stop = stop or "error"
        dev, ecss = row.get("device", {}), row.get("ecss", {})
        if dev.get("tokens_per_s") and ecss.get("tokens_per_s"):
            row["ecss_speed_vs_device"] = round(ecss["tokens_per_s"] / dev["tokens_per_s"], 3)
        out["rows"].append(row)
        ctx.report.set_part("ecss_vs_device", {**out, "status": "running"})
        if stop is not None or ctx.left() < MIN_RUN_S:
            out["stopped"] = {"device": "the all-on-device run did not fit (OOM or planner)",
                              "error": "a run failed or timed out"}.get(stop or "", "time budget")
            break
    statuses = [str(r.get(m, {}).get("status", "")) for r in out["rows"] for m in ("device", "ecss")]
    ran = [s for s in statuses if s == "ok"]
    failed = [s for s in statuses if s.startswith(("failed", "timed_out"))]
    if not ran:
        out["status"] = f"failed: no run completed ({'; '.join(statuses)[:200]})"
    elif failed and not ctx.cuda:
        out["status"] = f"failed: {failed[0][:200]}"
    else:
        out["status"] = "ok"
        if failed:
            out["note"] = f"{len(failed)} run(s) failed or timed out; the ladder stopped there"
    return out


def tensor_parallel_2(ctx: Context) -> dict[str, Any]:
    """tensor_parallel 2 on 2 GPUs (NCCL) against 1 on one GPU: the same rows a step, dropout off."""
    args = ctx.args
    if ctx.cuda and ctx.gpus() < 2:
        return {"status": f"skipped: needs 2 GPUs ({ctx.gpus()} visible)"}
    if ctx.smoke:
        preset, steps, warmup, mbs, seq, vocab, precision = "alpha-tiny", 3, 1, 2, 128, 2000, "fp32"
    else:
        preset, steps, warmup, mbs, seq, vocab, precision = ("alpha-350m", args.tp_steps, args.warmup, args.micro_batch,
                                                             args.seq_len, 40000, "bf16")
    data = ctx.tokens_dir(vocab, steps * mbs * (seq + 1))
    out: dict[str, Any] = {"preset": preset, "micro_batch_size": mbs, "seq_len": seq, "steps": steps,
                           "warmup_steps_excluded": warmup, "precision": precision, "attention_backend": "sdpa",
                           "loss_rtol": TP_LOSS_RTOL[precision]}
    if ctx.smoke:
        out["substitute"] = "no CUDA: alpha-tiny, 3 steps, fp32 on 2 gloo ranks instead of alpha-350m on 2 GPUs"
    runs = {}
    for tp in (1, 2):
        # sdpa on both sides: the comparison is of the collectives, not of FlexAttention's compile per process
        overrides = {"data": str(data), "train_steps": steps, "micro_batch_size": mbs, "seq_len": seq,
                     "gradient_accumulation_steps": 1, "precision": precision, "attention_backend": "sdpa",
                     "tensor_parallel": tp, "model_overrides": {"dropout": 0.0}}
        run = train_run(ctx, f"{preset} tp{tp}", preset, overrides, warmup, timeout=args.tp_run_s, ranks=tp)
        runs[f"tp{tp}"] = {k: run[k] for k in ("status", "tokens_per_s", "step_s", "first_step_s", "mfu",
                                                "max_memory_allocated_gib", "max_memory_reserved_gib", "planned",
                                                "ranks", "losses", "wall_s", "setup_s", "error", "log_tail")
                           if k in run}
        out["runs"] = runs
        ctx.report.set_part("tensor_parallel_2", {**out, "status": "running"})
        if run.get("status") != "ok":
            break
    one, two = runs.get("tp1", {}), runs.get("tp2", {})
    if one.get("status") != "ok" or two.get("status") != "ok":
        failed = one if one.get("status") != "ok" else two
        out["status"] = (failed["status"] if str(failed.get("status")).startswith("skipped")
                         else f"failed: tp{1 if failed is one else 2}: {one_line(str(failed.get('status')), 200)}")
        return out
    losses = list(zip(one["losses"], two["losses"]))
    worst = max(abs(b - a) / abs(a) for a, b in losses)
    out["loss_max_rel_diff"] = float(f"{worst:.3g}")
    if one.get("tokens_per_s") and two.get("tokens_per_s"):
        out["speed_tp2_vs_tp1"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
    if len(losses) != steps:
        out["status"] = f"failed: {len(losses)} of {steps} steps logged by both runs"
    elif worst > TP_LOSS_RTOL[precision]:
        out["status"] = f"failed: losses part by {worst:.3g} (relative) > {TP_LOSS_RTOL[precision]}"
    else:
        out["status"] = "ok"
    return out


PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": environment, "h2d_bandwidth": h2d_bandwidth, "dense_350m": dense_350m,
    "cuda_tests": cuda_tests, "ecss_vs_device": ecss_vs_device, "tensor_parallel_2": tensor_parallel_2,
    "dense_350m_variants": dense_350m_variants,
}


def schedule(parts: list[str]) -> list[tuple[str, str]]:
    """(step, part it reports under), in the order they run."""
    order = ["environment", "h2d_bandwidth", "dense_350m", "cuda_tests", "ecss_vs_device", "tensor_parallel_2",
             "dense_350m_variants"]
    steps = [s for s in order if (s if s != "dense_350m_variants" else "dense_350m") in parts]
    return [(s, "dense_350m" if s == "dense_350m_variants" else s) for s in steps]


def run_parts(ctx: Context, parts: list[str]) -> None:
    plan = schedule(parts)
    for index, (step, part) in enumerate(plan):
        ctx.current = step
        reserve = sum(ctx.args.reserve.get(s, PART_RESERVES[s]) for s, _ in plan[index + 1:] if ctx.runs(s))
        cap = ctx.args.caps.get(step, PART_CAPS[step])
        start = time.monotonic()
        ctx.part_deadline = min(ctx.deadline - reserve, start + cap)
        left = ctx.part_deadline - start
        print(f"[gpu_check] {step}: up to {left:.0f} s", flush=True)
        if left < 3 and step != "environment":
            result = {"status": f"skipped: time budget ({max(0, int(left))} s left)"}
            if step == "dense_350m_variants":
                result = {**ctx.report.data["parts"].get(part, {}), "variants_skipped": result["status"]}
        else:
            try:
                result = PART_FUNCTIONS[step](ctx)
            except Exception as exc:
                import traceback

                result = {"status": f"failed: {one_line(exc)}", "traceback": traceback.format_exc()[-2000:]}
            if step != "dense_350m_variants":
                result["seconds"] = round(time.monotonic() - start, 1)
        ctx.report.set_part(part, result)
        print(f"[gpu_check] {step}: {result.get('status')} ({time.monotonic() - start:.0f} s)", flush=True)
    ctx.current = None


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def _fmt_tps(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f} tok/s"


def _fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """The key figures of a report (also stored in it under "summary")."""
    parts = data.get("parts", {})
    out: dict[str, Any] = {"statuses": {name: parts.get(name, {}).get("status", "not run") for name in PARTS}}
    dense = parts.get("dense_350m", {})
    if dense.get("runs"):
        out["dense"] = {v: {"tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"), "status": r.get("status"),
                            "planned_mfu": (r.get("planned") or {}).get("mfu")} for v, r in dense["runs"].items()}
        out["dense_meets_target"] = dense.get("meets_target")
    ecss = parts.get("ecss_vs_device", {})
    if ecss.get("rows"):
        out["ecss"] = [{"experts_per_domain": r["experts_per_domain"],
                        **{m: {k: r.get(m, {}).get(k) for k in ("status", "tokens_per_s", "max_memory_allocated_gib",
                                                                  "pinned_host_gib", "pinned_allocator_gib")}
                           for m in ("device", "ecss")}}
                       for r in ecss["rows"]]
    bw = parts.get("h2d_bandwidth", {})
    if bw.get("best_median_gbs"):
        out["bandwidth_gbs"] = bw["best_median_gbs"]
    tests = parts.get("cuda_tests", {})
    if "passed" in tests:
        out["cuda_tests"] = {k: tests.get(k) for k in ("passed", "failed", "skipped", "errors")}
    tp = parts.get("tensor_parallel_2", {})
    if tp.get("runs"):
        out["tensor_parallel_2"] = {
            "loss_max_rel_diff": tp.get("loss_max_rel_diff"), "speed_tp2_vs_tp1": tp.get("speed_tp2_vs_tp1"),
            **{name: {k: run.get(k) for k in ("status", "tokens_per_s", "max_memory_allocated_gib")}
               for name, run in tp["runs"].items()}}
    return out


def summary_text(data: dict[str, Any], path: Path | None = None) -> str:
    parts = data.get("parts", {})
    lines = [f"gpu_check: {path or ''} (mode {data.get('mode')}, {data.get('elapsed_s', '?')} s, "
             f"finished {data.get('finished', 'no')})"]
    setup = data.get("setup") or {}
    if setup:
        lines.append(f"  {'setup':<17} {setup.get('status', '?')}: {setup.get('python', '')} "
                     f"{setup.get('detail', '')}".rstrip())

    def line(name: str, text: str) -> None:
        part = parts.get(name, {})
        status = part.get("status", "not run")
        seconds = part.get("seconds")
        sec = f"{seconds:6.1f} s" if isinstance(seconds, (int, float)) else "       -"
        lines.append(f"  {name:<17} {sec}  {status}" + (f" | {text}" if text else ""))

    env = parts.get("environment", {})
    line("environment", ", ".join(str(x) for x in [
        f"torch {env.get('torch')}", f"deepspeed {env.get('deepspeed')}",
        (f"{env.get('device')} (sm {env.get('capability')}, {env.get('device_memory_gib')} GiB)"
         if env.get("device") else "no CUDA device"),
        f"nvcc {'yes' if env.get('nvcc') else 'no'}", f"{env.get('cpu_count')} CPUs",
        f"{env.get('host_ram_gib')} GiB RAM"] if env))
    tests = parts.get("cuda_tests", {})
    line("cuda_tests", (f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                        f"{tests.get('skipped', 0)} skipped, {tests.get('errors', 0)} errors") if "passed" in tests else "")
    dense = parts.get("dense_350m", {})
    texts = []
    for variant, run in (dense.get("runs") or {}).items():
        if run.get("status") == "ok":
            planned = (run.get("planned") or {}).get("mfu")
            texts.append(f"{variant}: {_fmt_tps(run.get('tokens_per_s'))}, MFU {_fmt_pct(run.get('mfu'))}"
                         f" (planned {_fmt_pct(planned)}), {run.get('max_memory_allocated_gib', '-')} GiB")
        else:
            texts.append(f"{variant}: {run.get('status')}")
    if dense.get("meets_target") is not None:
        texts.append(f"target MFU ≥ {100 * MFU_TARGET:.0f} %: {'met' if dense['meets_target'] else 'NOT met'}")
    line("dense_350m", "; ".join(texts))
    ecss = parts.get("ecss_vs_device", {})
    texts = []
    for row in ecss.get("rows", []):
        cells = []
        for mode in ("device", "ecss"):
            run = row.get(mode, {})
            if run.get("status") == "ok":
                extra = f", {run.get('pinned_host_gib')} GiB pinned" if mode == "ecss" else ""
                cells.append(f"{mode} {_fmt_tps(run.get('tokens_per_s'))} {run.get('max_memory_allocated_gib', '-')} GiB{extra}")
            else:
                cells.append(f"{mode} {run.get('status')}")
        texts.append(f"{row['experts_per_domain']}/domain: " + ", ".join(cells))
    line("ecss_vs_device", "; ".join(texts))
    bw = parts.get("h2d_bandwidth", {}).get("best_median_gbs")
    line("h2d_bandwidth", (f"pinned H2D {bw['h2d_pinned']} GB/s, D2H {bw['d2h_pinned']}; pageable H2D "
                           f"{bw['h2d_pageable']}, D2H {bw['d2h_pageable']}") if bw else "")
    tp = parts.get("tensor_parallel_2", {})
    texts = []
    for name, run in (tp.get("runs") or {}).items():
        if run.get("status") == "ok":
            planned = (run.get("planned") or {}).get("gpu_gib_per_gpu")
            texts.append(f"{name}: {_fmt_tps(run.get('tokens_per_s'))}, {run.get('max_memory_allocated_gib', '-')} "
                         f"GiB/GPU (planned {planned})")
        else:
            texts.append(f"{name}: {run.get('status')}")
    if tp.get("loss_max_rel_diff") is not None:
        texts.append(f"losses within {tp['loss_max_rel_diff']:.2g} (relative; limit {tp.get('loss_rtol')})")
    line("tensor_parallel_2", "; ".join(texts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _seconds_map(text: str) -> dict[str, float]:
    out = {}
    for item in _str_list(text):
        key, _, value = item.partition("=")
        if key not in PART_CAPS:
            raise argparse.ArgumentTypeError(f"unknown part {key!r} (known: {', '.join(PART_CAPS)})")
        out[key] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--parts", type=_str_list, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--output", type=Path, help=f"JSON path (default: $OUT/{JSON_NAME}, else runs/gpu_check/{JSON_NAME})")
    p.add_argument("--budget", type=float, default=440.0, help="seconds for all parts together")
    p.add_argument("--caps", type=_seconds_map, default={}, help="per-part seconds, e.g. ecss_vs_device=300,cuda_tests=60")
    p.add_argument("--reserve", type=_seconds_map, default={}, help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke", action="store_true", help="hide CUDA; every CPU-safe part at tiny size")
    p.add_argument("--steps", type=int, default=30, help="dense optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the dense figures")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per step (1 GPU, no accumulation)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dense-variants", type=_str_list, default=["auto", "sdpa", "compile"],
                   help="auto (FlexAttention on CUDA), sdpa, compile (auto + per-block torch.compile)")
    p.add_argument("--dense-run-s", type=float, default=150.0, help="time limit of the main dense run")
    p.add_argument("--dense-variant-s", type=float, default=120.0, help="time limit of each extra dense variant")
    p.add_argument("--plan-gpu", default="h200", help="pangu_model/plan.py GPU kind for the predictions")
    p.add_argument("--experts-per-domain", type=_int_list, default=[2, 8, 32, 64])
    p.add_argument("--ecss-steps", type=int, default=6)
    p.add_argument("--ecss-warmup", type=int, default=2)
    p.add_argument("--ecss-micro-batch", type=int, default=None, help="default: --micro-batch")
    p.add_argument("--ecss-d-model", type=int, default=1024)
    p.add_argument("--ecss-d-ff", type=int, default=4096)
    p.add_argument("--ecss-heads", type=int, default=16)
    p.add_argument("--ecss-zero-stage", type=int, default=1, help="as the sigma-tiny preset (a world of one "
                   "partitions nothing)")
    p.add_argument("--ecss-attention", default="sdpa", choices=["auto", "sdpa", "flex"],
                   help="the same for both sides; sdpa spares each process the FlexAttention compile")
    p.add_argument("--ecss-run-s", type=float, default=120.0, help="time limit of one ECSS / device run")
    p.add_argument("--cpu-adam-build-s", type=float, default=180.0)
    p.add_argument("--tp-steps", type=int, default=20, help="steps of each tensor_parallel_2 run")
    p.add_argument("--tp-run-s", type=float, default=100.0, help="time limit of each tensor_parallel_2 run")
    p.add_argument("--quick-bandwidth", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help="scratch (synthetic tokens, run dirs); default: a temp dir")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--setup-json", type=Path, help="the wrapper's environment-setup record, merged in as `setup`")
    p.add_argument("--setup-failed", metavar="MESSAGE", help="write a report that says setup failed, exit 2")
    p.add_argument("--summary", type=Path, metavar="FILE", help="print the summary of a written report and exit")
    p.add_argument("--run-one", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def default_output() -> Path:
    out = os.environ.get("OUT")
    return (Path(out) if out else DEFAULT_OUTPUT_DIR) / JSON_NAME


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_one:
        return run_one(json.loads(args.run_one))
    if args.summary:
        data = json.loads(args.summary.read_text(encoding="utf-8"))
        print(summary_text(data, args.summary))
        return 0
    output = (args.output or default_output()).resolve()
    setup = None
    if args.setup_json and args.setup_json.is_file():
        try:
            setup = json.loads(args.setup_json.read_text(encoding="utf-8"))
        except ValueError as exc:
            setup = {"status": f"unreadable: {one_line(exc)}"}
    if args.setup_failed:
        setup = {**(setup or {}), "status": f"failed: {args.setup_failed}"}
        data = {"schema": SCHEMA, "mode": "setup-failed", "started": now_iso(), "finished": now_iso(), "setup": setup,
                "parts": {name: {"status": "skipped: environment setup failed"} for name in PARTS}}
        data["summary"] = summarize(data)
        write_json_atomic(output, data)
        print(f"gpu_check: environment setup failed: {args.setup_failed}\n  report: {output}", file=sys.stderr)
        return 2
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: this process and its children
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _on_terminate)
    signal.signal(signal.SIGINT, _on_terminate)
    import torch

    cuda = torch.cuda.is_available()
    mode = "cuda" if cuda else ("cpu-smoke" if args.cpu_smoke else "cpu (no CUDA: CPU-safe parts at tiny size)")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pangu-gpu-check-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = output.parent
    (out_dir / "runs.log").unlink(missing_ok=True)
    report = Report(output, {"mode": mode, "started": now_iso(), "argv": sys.argv[1:] if argv is None else argv,
                             "budget_s": args.budget, "host": os.uname().nodename, "setup": setup,
                             "parts_requested": args.parts})
    ctx = Context(args, cuda, workdir, out_dir, report, deadline=started + args.budget)
    print(f"[gpu_check] mode {mode}; report {output}; workdir {workdir}", flush=True)
    try:
        run_parts(ctx, args.parts)
    finally:
        if ctx.current == "dense_350m_variants":  # SIGTERM / SIGINT: the wrapper's hard limit or a person
            report.data["parts"]["dense_350m"]["variants_skipped"] = "interrupted (hard time limit or signal)"
        elif ctx.current is not None:
            previous = report.data["parts"].get(ctx.current, {})
            report.data["parts"][ctx.current] = {**previous, "status": "failed: interrupted (hard time limit or signal)"}
        for name in PARTS:
            report.data["parts"].setdefault(name, {"status": "skipped: not reached (interrupted)" if name in args.parts
                                                   else "skipped: not requested (--parts)"})
        report.data["parts"] = {name: report.data["parts"][name] for name in PARTS}
        report.data["finished"] = now_iso()
        report.data["elapsed_s"] = round(time.monotonic() - started, 1)
        report.data["summary"] = summarize(report.data)
        report.save()
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary_text(report.data, output), flush=True)
    failed = [n for n, p in report.data["parts"].items() if str(p.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
