"""DeepSpeed's JIT-built ops, built ahead of the first training run: `python -m pangu_model.ops`
(`make ops`, which `make run` and `make test` run first).

DeepSpeed compiles its host ops with the host's C++ compiler on first use: the CPU Adam kernel (ECSS's
expert states, built as `pangu_host_adam` with a binding that releases the GIL: host_adam.py) and the
shared-memory collectives of CPU runs. DeepSpeed's own `cpu_adam` build of the kernel serves only
engine-wide ZeRO-Offload (`offload_optimizer: true`) and is left to its first use. Built here, once per
environment, into `TORCH_EXTENSIONS_DIR` (pangu_model/__init__.py pins it and the ninja that builds), a training run
starts without a few minutes of compiling on a 2-core machine; afterwards this takes seconds.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable, Sequence

import pangu_model  # noqa: F401 - the build directory and ninja every process of this environment uses

# The op builders the training program loads, by DeepSpeed's names (the accelerator picks each one's class),
# and ours.
OPS = ("HostAdamBuilder", "ShareMemCommBuilder")
OUR_BUILDERS = ("HostAdamBuilder",)


def deepspeed_accelerator_follows_torch() -> None:
    """Without CUDA the training program computes on the CPU, and DeepSpeed's accelerator (chosen when
    DeepSpeed is first imported) must agree: its own probe picks whatever else it finds (MPS on a Mac, an NPU
    where torch_npu is installed) or, finding nothing, warns in every run's log "If you have GPU or other
    accelerator, we were unable to detect it". A DS_ACCELERATOR of the user's own wins."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


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
    deepspeed_accelerator_follows_torch()
    from deepspeed.accelerator import get_accelerator

    taken = {}
    for name in names:
        if name in OUR_BUILDERS:
            from pangu_model import host_adam

            builder = getattr(host_adam, name)()
        else:
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
