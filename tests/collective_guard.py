"""Catch collectives on host tensors on a machine without a GPU.

NCCL, the backend of every multi-GPU run, accepts CUDA tensors only: an all-reduce of a tensor made on the
host fails there, while gloo on a CPU test machine takes it without a word. This guard brings the NCCL rule
to CPU runs. The trainer is given the compute device `cpu:0` (it stands for `cuda:0`); the guard follows
which tensors the project's code puts on the host and which on the compute device, and a
`torch.distributed` collective on a host tensor raises.

A tensor is on the host when project code (pangu_model/, deploy/, tokenizer/) creates it without a device
or with the device "cpu", or calls `.cpu()` / `.to("cpu")`. `.to(compute)` brings it back; any other op's
result is on the host when one of its tensor inputs is. Tensors made before the guard starts (the model's
weights) and by other libraries (DeepSpeed's buffers, which follow its accelerator) count as on the
device. A factory given `device=some_tensor.device` counts as on the device too: on a GPU that device is
CUDA.

The guard also records the order of every rank's collectives (`calls`: the op and its group's ranks).
NCCL runs a collective as a kernel that waits on the GPU for its peers, so two ranks that issue the
collectives of two groups they share in different orders can block each other for good, where gloo
finishes both. `order_conflicts` finds such pairs of ranks in the records.

`python -m tests.collective_guard --config C` (under torchrun) trains and exports a run under the guard; it
fails, naming the first place where two ranks part, when their collectives came in different orders.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = torch.device("cpu", 0)
PROJECT_DIRS = tuple(str(ROOT / name) + "/" for name in ("pangu_model", "deploy", "tokenizer"))
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor", "gather", "scatter",
               "broadcast", "reduce", "reduce_scatter_tensor", "all_to_all")
_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor,
              torch.rand, torch.randn, torch.randint, torch.linspace}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like}
_NEW = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
        torch.Tensor.new_tensor}


class HostTensorError(RuntimeError):
    pass


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _names_host(device: Any) -> bool:
    """Only the string "cpu" certainly means the host: a torch.device object may be `tensor.device`, which
    follows the compute device on a GPU."""
    return isinstance(device, str) and torch.device(device) == torch.device("cpu")


class _TensorSet:
    """Tensors by identity (a WeakSet compares tensors with `==`, elementwise), without keeping them alive."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._refs[key] = weakref.ref(tensor, lambda _, key=key: self._refs.pop(key, None))

    def discard(self, tensor: torch.Tensor) -> None:
        self._refs.pop(id(tensor), None)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


class HostTensorGuard(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.host = _TensorSet()
        self.rejected: list[str] = []
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # (op, its group's global ranks), in issue order

    # ---- following tensors ----------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in _tensors(out)]
        if not outputs:
            return out
        on_host = self._on_host(func, args, kwargs)
        for tensor in outputs:
            if on_host:
                self.host.add(tensor)
            else:
                self.host.discard(tensor)
        return out

    def _on_host(self, func: Any, args: tuple, kwargs: dict) -> bool:
        project = _called_from_project()
        inputs_on_host = any(t in self.host for t in _tensors((args, kwargs)))
        device = kwargs.get("device")
        if func in _FACTORIES:
            if not project:
                return False
            return device is None or _names_host(device)
        if func in _LIKE or func in _NEW:
            if device is None:
                return inputs_on_host
            return project and _names_host(device)
        if func is torch.Tensor.cpu:
            return project or inputs_on_host
        if func is torch.Tensor.to:
            target = device if device is not None else next(
                (a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if target is None:
                return args[0] in self.host  # a dtype change keeps the placement
            if target == COMPUTE or (isinstance(target, torch.device) and target.index is not None):
                return False
            if _names_host(target):
                return project or args[0] in self.host
            return args[0] in self.host
        return inputs_on_host

    # ---- checking collectives -------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator["HostTensorGuard"]:
        originals = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, original in originals.items():
            setattr(dist, name, self._checked(name, original))
        try:
            with self:
                yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)

    def _checked(self, name: str, original: Any) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def collective(*args: Any, **kwargs: Any) -> Any:
            for tensor in _tensors((args, kwargs)):
                if tensor in self.host:
                    where = _project_caller()
                    message = (f"torch.distributed.{name} on a host tensor {tuple(tensor.shape)} {tensor.dtype} "
                               f"from {where}: NCCL accepts CUDA tensors only")
                    self.rejected.append(message)
                    raise HostTensorError(message)
            group = signature.bind(*args, **kwargs).arguments.get("group")
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            self.calls.append((name, tuple(ranks)))
            return original(*args, **kwargs)

        return collective


def order_conflicts(calls: dict[int, list[tuple[str, tuple[int, ...]]]]) -> list[str]:
    """Pairs of ranks whose collectives on groups holding both come in different orders: on NCCL, each
    rank's first collective of the pair can wait for a peer stuck in the other's. `calls`: rank → its
    record. The order within one group is not checked here: a mismatch there fails on gloo too."""
    conflicts = []
    for a, b in itertools.combinations(sorted(calls), 2):
        seen_by = {r: [c for c in calls[r] if a in c[1] and b in c[1]] for r in (a, b)}
        if seen_by[a] != seen_by[b]:
            at = next((i for i, (x, y) in enumerate(zip(seen_by[a], seen_by[b])) if x != y),
                      min(len(seen_by[a]), len(seen_by[b])))
            show = lambda r: seen_by[r][at] if at < len(seen_by[r]) else "nothing more"  # noqa: E731
            conflicts.append(f"ranks {a} and {b} part at their shared collective {at}: "
                             f"rank {a} issues {show(a)}, rank {b} issues {show(b)}")
    return conflicts


def _called_from_project() -> bool:
    frame = sys._getframe(3)  # _on_host ← __torch_function__ ← the op's caller
    return frame.f_code.co_filename.startswith(PROJECT_DIRS)


def _project_caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PROJECT_DIRS):
            return f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside the project"


def main(argv: list[str] | None = None, report: Callable[[Any], None] | None = None) -> int:
    """`python -m torch.distributed.run ... -m tests.collective_guard --config C`: train (and export) with the
    compute device `cpu:0` under the guard; print the result line as `pangu_model.train` does. `report`
    gets the trainer after its run (a test module's own entry point may write what it measured)."""
    import argparse

    from pangu_model.train import EXPORT_DIR, Trainer, load_train_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    config = load_train_config(args.config, [])
    trainer = Trainer(config, device=COMPUTE)
    guard = HostTensorGuard()
    try:
        with guard.active():
            result = trainer.run()
            if result["status"] == "completed":
                trainer.export(Path(config.output) / EXPORT_DIR)  # the export's collectives, guarded again
        if report is not None:
            report(trainer)
    finally:
        trainer.close()
    calls: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(calls, guard.calls)  # unguarded: not part of the record
    conflicts = order_conflicts(dict(enumerate(calls)))
    if dist.get_rank() == 0:
        for conflict in conflicts:
            print(f"collective order: {conflict}", file=sys.stderr, flush=True)
        print(json.dumps({"status": result["status"], "step": result["step"]}), flush=True)
    dist.barrier()  # no rank tears its group down while another still uses it
    dist.destroy_process_group()
    return 1 if conflicts else 0


if __name__ == "__main__":
    # The work is done and flushed: skip interpreter teardown, where a communication thread destroyed
    # while joinable has aborted a finished rank (SIGABRT, "terminate called without an active
    # exception") in CI runs.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
