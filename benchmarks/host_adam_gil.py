"""How long the host optimizer keeps the training thread waiting: DeepSpeedCPUAdam against SlicedCPUAdam.

    python benchmarks/host_adam_gil.py                      # 4 rows of 32M fp32 values (1.5 GiB with states)
    python benchmarks/host_adam_gil.py --rows 2 --row-mib 64 --threads 2 --json out.json

ECSS's delayed host update (pangu_model/ecss.py) runs Adam on a worker thread while the training thread
runs the next step. The stand-in for the training thread here is a loop of tiny Python calls, as a thread
launching kernels is: it records the longest time between two of its iterations while the worker steps the
rows. DeepSpeed's `adam_update` holds the GIL for the whole tensor it is given, so that gap is one row's
update; `SlicedCPUAdam` (pangu_model/host_adam.py) gives the GIL a chance between slices of 1M values.
Also printed: the worker's time for the update (the slices' cost) and the stand-in's iterations per second
beside each optimizer (its share of the interpreter).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pangu_model  # noqa: E402,F401  (TORCH_EXTENSIONS_DIR: the cpu_adam build `make ops` made)
from pangu_model.host_adam import SLICE_ELEMENTS, SlicedCPUAdam  # noqa: E402


def measure(optimizer: Any, repeats: int) -> dict[str, float]:
    gaps, work, rates = [], [], []
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
            now = time.perf_counter()
            gap, last, iterations = max(gap, now - last), now, iterations + 1
        worker.join()
        gaps.append(gap)
        work.append(took[0])
        rates.append(iterations / (time.perf_counter() - start))
    return {"longest_wait_ms": round(1e3 * min(gaps), 1), "update_s": round(min(work), 3),
            "standin_iterations_per_s": round(max(rates))}


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
    results: dict[str, Any] = {"rows": args.rows, "values_per_row": n, "threads": args.threads,
                               "slice_elements": SLICE_ELEMENTS}
    for name, kind in (("DeepSpeedCPUAdam", DeepSpeedCPUAdam), ("SlicedCPUAdam", SlicedCPUAdam)):
        params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(args.rows)]
        for p in params:
            p.grad = torch.full((n,), 1e-3)
        optimizer = kind(params, lr=1e-4, adamw_mode=True)
        optimizer.step()  # states made, kernel warm
        results[name] = measure(optimizer, args.repeats)
        print(f"{name:17s} longest wait of the training thread {results[name]['longest_wait_ms']:8.1f} ms   "
              f"update {results[name]['update_s']:.3f} s   stand-in {results[name]['standin_iterations_per_s']:,} it/s",
              flush=True)
        del optimizer, params
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
