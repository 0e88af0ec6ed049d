"""What the training thread gets beside the host optimizer: DeepSpeedCPUAdam against HostAdam.

    python benchmarks/host_adam_gil.py                      # 4 rows of 32M fp32 values (1.5 GiB with states)
    python benchmarks/host_adam_gil.py --rows 2 --row-mib 64 --threads 2 --json out.json

ECSS's delayed host update (pangu_model/ecss.py) runs Adam on a worker thread while the training thread
runs the next step. The stand-in for the training thread here is a loop of small torch ops, as a thread
launching kernels is (Python glue between calls that release the GIL). It runs alone (its baseline rate),
then beside each optimizer's update of the rows. Printed per optimizer: the update's time alone and beside
the stand-in, the stand-in's rate beside the update as a share of its baseline, and its longest wait
(median over the repeats). DeepSpeed's binding of its kernel (`adam_update`) holds the GIL for the whole
tensor it is given, so the stand-in stops for each row; `HostAdam` (pangu_model/host_adam.py) calls the same
kernel through a binding that releases it. DeepSpeed's own `cpu_adam` build is needed here (the first run
builds it, under a minute). On a machine with few cores, leave the stand-in a core (`--threads` below the
core count).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pangu_model  # noqa: E402,F401  (TORCH_EXTENSIONS_DIR: the cpu_adam build `make ops` made)
from pangu_model.host_adam import HostAdam  # noqa: E402


def standin_op() -> None:
    torch.add(_A, _B, out=_C)


_A, _B, _C = torch.ones(64), torch.ones(64), torch.empty(64)


def standin_rate(seconds: float = 0.5) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        standin_op()
        count += 1
    return count / (time.perf_counter() - start)


def measure(optimizer: Any, repeats: int, baseline: float) -> dict[str, float]:
    alone = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        alone.append(time.perf_counter() - start)
    gaps, work, shares = [], [], []
    for _ in range(repeats):
        done = threading.Event()
        took: list[float] = []

        def update() -> None:
            start = time.perf_counter()
            optimizer.step()
            took.append(time.perf_counter() - start)
            done.set()

        worker = threading.Thread(target=update)
        gap, iterations = 0.0, 0
        start = last = time.perf_counter()
        worker.start()
        while not done.is_set():
            standin_op()
            now = time.perf_counter()
            gap, last, iterations = max(gap, now - last), now, iterations + 1
        worker.join()
        gaps.append(gap)
        work.append(took[0])
        shares.append(iterations / (time.perf_counter() - start) / baseline)
    return {"update_alone_s": round(statistics.median(alone), 3), "update_beside_s": round(statistics.median(work), 3),
            "standin_share": round(statistics.median(shares), 3),
            "longest_wait_ms": round(1e3 * statistics.median(gaps), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="expert rows stepped (parameters)")
    parser.add_argument("--row-mib", type=int, default=128, help="fp32 MiB per row (sigma-1t's w_in row: 400)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OpenMP threads of Adam")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    n = args.row_mib * 2**20 // 4
    baseline = standin_rate()
    results: dict[str, Any] = {"rows": args.rows, "values_per_row": n, "threads": args.threads,
                               "standin_ops_per_s": round(baseline)}
    print(f"stand-in alone: {baseline:,.0f} ops/s; {args.rows} rows of {n:,} values, {args.threads} Adam thread(s)")
    for name, kind in (("DeepSpeedCPUAdam", DeepSpeedCPUAdam), ("HostAdam", HostAdam)):
        params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(args.rows)]
        for p in params:
            p.grad = torch.full((n,), 1e-3)
        optimizer = kind(params, lr=1e-4, adamw_mode=True)
        optimizer.step()  # states made, kernel warm
        results[name] = measure(optimizer, args.repeats, baseline)
        r = results[name]
        print(f"{name:17s} update {r['update_alone_s']:.3f} s alone, {r['update_beside_s']:.3f} s beside the stand-in; "
              f"stand-in at {100 * r['standin_share']:.0f} % of its rate, longest wait {r['longest_wait_ms']:.1f} ms",
              flush=True)
        del optimizer, params
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
