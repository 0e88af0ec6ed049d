"""DeepSpeed's JIT-built ops, built ahead of the first training run: `python -m pangu_model.ops`
(`make ops`, which `make run` and `make test` run first).

DeepSpeed compiles its host ops with the host's C++ compiler on first use: `cpu_adam` (ECSS's expert
states, ZeRO-Offload) and the shared-memory collectives of CPU runs. Built here, once per environment,
into `TORCH_EXTENSIONS_DIR` (pangu_model/__init__.py pins it and the ninja that builds), a training run
starts without a few minutes of compiling on a 2-core machine; afterwards this takes seconds.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pangu_model  # noqa: F401 - the build directory and ninja every process of this environment uses
from cleaning.writers import write_json_atomic

# The op builders the training program loads, by DeepSpeed's names (the accelerator picks each one's class).
OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def _cpu_key() -> str | None:
    """The host CPU's identity: /proc/cpuinfo without its clock readings, hashed (None off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    stable = "\n".join(line for line in text.splitlines() if not line.startswith("cpu MHz"))
    return hashlib.sha256(stable.encode()).hexdigest()[:16]


def remember_cpu_info() -> None:
    """DeepSpeed asks py-cpuinfo about the host CPU each time it loads an op (the architecture and SIMD flags
    make the op's compiler flags, part of its build hash) and CPU Adam asks for the vendor. py-cpuinfo probes
    in a new Python process each time, about 1.2 s: 2 probes in every CPU rank (the shared-memory collectives)
    and 3 in an ECSS rank, 2.3-3.5 s of each rank's start-up. After this the first answer is kept, in the
    process and in TORCH_EXTENSIONS_DIR beside the ops built with it (one file per CPU: `_cpu_key`)."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed falls back to lscpu
        return
    probe: Callable[[], dict[str, Any]] = cpuinfo.get_cpu_info
    if getattr(probe, "remembered", False):
        return

    @functools.cache
    def answer() -> dict[str, Any]:  # read or probed when DeepSpeed first asks, not at import
        key = _cpu_key()
        kept = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / f"cpuinfo-{key}.json" if key else None
        if kept is not None:
            try:
                return json.loads(kept.read_text())
            except (OSError, ValueError):
                pass
        info = probe()
        if kept is not None:
            try:
                write_json_atomic(kept, info)
            except OSError:  # a read-only environment probes again next time
                pass
        return info

    def get_cpu_info() -> dict[str, Any]:
        return copy.deepcopy(answer())  # callers may change their copy

    get_cpu_info.remembered = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


def compile_muon_on_first_use() -> None:
    """DeepSpeed imports its Muon optimizer in every ZeRO and bf16 run, whatever the optimizer, and Muon wraps
    its update functions in `torch.compile` when it is imported, which imports Dynamo and Inductor: 2-4 s of
    each rank's start-up, for functions a PanGu run never calls. After this DeepSpeed's compile decorator
    compiles a function when it is first called (a run that does use Muon compiles then, as before)."""
    from deepspeed.runtime import compiler

    if getattr(compiler.compile, "on_first_use", False):
        return

    def compile_on_first_use(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                import torch

                compiled.append(torch.compile(fn))
            return compiled[0](*args, **kwargs)

        return call

    def compile() -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # DeepSpeed's `compiler.compile()`
        return compile_on_first_use

    compile.on_first_use = True  # type: ignore[attr-defined]
    compiler.compile = compile


def build_ops(names: Sequence[str] = OPS, required: bool = False) -> dict[str, float]:
    """Build (or load, when built already) every op of `names` this machine's accelerator has; op name →
    seconds taken. `required`: one the accelerator lacks is an error rather than passed over."""
    from deepspeed.accelerator import get_accelerator

    taken = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            if required:
                raise RuntimeError(f"{name}: this machine's DeepSpeed accelerator cannot build it")
            continue  # e.g. the shared-memory collectives on a GPU node: NCCL carries them there
        started = time.perf_counter()
        builder.load()
        taken[builder.NAME] = time.perf_counter() - started
    return taken


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pangu_model.ops [BUILDER ...]`: the builders named (DeepSpeed's class names), else `OPS`."""
    named = list(sys.argv[1:] if argv is None else argv)
    try:
        taken = build_ops(named or OPS, required=bool(named))
    except (RuntimeError, ValueError) as err:  # ValueError: a builder name DeepSpeed does not know
        sys.exit(f"pangu_model.ops: {err}")
    for name, seconds in taken.items():
        print(f"pangu_model.ops: {name} ready ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
