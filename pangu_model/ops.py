"""DeepSpeed's JIT-built ops, built ahead of the first training run: `python -m pangu_model.ops`
(`make ops`, which `make run` and `make test` run first).

DeepSpeed compiles its host ops with the host's C++ compiler on first use: `cpu_adam` (ECSS's expert
states, ZeRO-Offload) and the shared-memory collectives of CPU runs. Built here, once per environment,
into `TORCH_EXTENSIONS_DIR` (pangu_model/__init__.py pins it and the ninja that builds), a training run
starts without a few minutes of compiling on a 2-core machine; afterwards this takes seconds.
"""
from __future__ import annotations

import time

import pangu_model  # noqa: F401 - the build directory and ninja every process of this environment uses

# The op builders the training program loads, by DeepSpeed's names (the accelerator picks each one's class).
OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def build_ops() -> dict[str, float]:
    """Build (or load, when built already) every op of `OPS` this machine's accelerator has; op name →
    seconds taken."""
    from deepspeed.accelerator import get_accelerator

    taken = {}
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            continue  # e.g. the shared-memory collectives on a GPU node: NCCL carries them there
        started = time.perf_counter()
        builder.load()
        taken[builder.NAME] = time.perf_counter() - started
    return taken


def main() -> None:
    for name, seconds in build_ops().items():
        print(f"pangu_model.ops: {name} ready ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
