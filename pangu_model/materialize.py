"""Build a model on its device one module at a time, with the weights of the eager construction.

`PanguModel(config)` under `torch.manual_seed(seed)` materialises every weight in fp32 in host memory
(828 GB at 200B, on every rank) before DeepSpeed moves it to the GPU. `build_model_on` gives the same
weights, bit for bit, without ever holding more than one module's tensors on the host:

1. The model is built with its parameters on the meta device (buffers, such as the RRE routing tables,
   are small and built for real): nothing is allocated and the global random stream is not touched.
2. The random stream is replayed: eager construction draws once for every `nn.Linear` / `nn.Embedding`
   (their own `reset_parameters`) before `PanguModel.reset_parameters` draws again. Each of those modules
   is made on the host and initialised, and the result dropped, one at a time, so the stream reaches the
   state the eager path leaves it in.
3. `PanguModel.reset_module` initialises each module's own tensors on the host in `named_modules()`
   order, exactly as `reset_parameters` does, and they move to their device at once: the compute device,
   or the host for modules that live there (ECSS keeps the experts in host memory).

The draws stay on the CPU generator whatever the device, so a GPU run starts from the weights a CPU run
does.

With tensor parallelism (`tp`), the same pass runs over the dense model's module tree (on the meta device)
and each module of the tensor-parallel model keeps its rank's slice of the dense module's weights: every
tensor size starts from the weights of the dense model, one dense module on the host at a time.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import PanguConfig
from .model import PanguModel

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallel


class _NoDrawsOnMeta(TorchFunctionMode):
    """Drawing random values into a meta tensor does nothing. Without this, every model built on the meta
    device runs torch's Python decomposition of `normal_` (there is no meta kernel for it, and
    `nn.Embedding` draws when it is made), which imports Dynamo: 2-4 s of start-up in each process that
    plans a run or builds a model, every training rank included. A meta draw takes nothing from the random
    stream, so skipping it changes no weights."""

    _DRAWS = (torch.Tensor.normal_, torch.nn.init.normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self._DRAWS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """`torch.device("meta")` for building a model's module tree without storage (and without Dynamo)."""
    with torch.device("meta"), _NoDrawsOnMeta():
        yield


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay where they are made."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with _NoDrawsOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _replay_construction_draws(model: nn.Module) -> None:
    """Advance the global stream as building `model` eagerly would: torch's own modules initialise
    themselves when they are made (PanGu's modules leave that to `PanguModel.reset_parameters`)."""
    for module in model.modules():
        if module is model or not hasattr(module, "reset_parameters"):
            continue
        scratch = copy.deepcopy(module)
        scratch.to_empty(device="cpu", recurse=False)
        scratch.reset_parameters()
        del scratch


def _parameter(data: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """A parameter holding `data` with `like`'s requires_grad and attributes (tensor-parallel marks)."""
    param = nn.Parameter(data, requires_grad=like.requires_grad)
    param.__dict__.update(like.__dict__)
    return param


def _materialize_own(module: nn.Module) -> None:
    """Give `module`'s own parameters host storage (to be initialised), keeping requires_grad."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, _parameter(torch.empty_like(param, device="cpu"), param))


def _move_own(module: nn.Module, device: torch.device) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        if param.device != device:
            module.register_parameter(name, _parameter(param.detach().to(device), param))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.device != device:
            module._buffers[name] = buffer.to(device)


def _take_slices(dense: nn.Module, target: nn.Module) -> None:
    """Give `target` (the tensor-parallel twin of `dense`) its rank's part of `dense`'s own parameters, on
    the host, and return `dense`'s to the meta device (one dense module is held at a time)."""
    from .tensor_parallel import split_dim

    for name, param in list(target.named_parameters(recurse=False)):
        full = getattr(dense, name)
        dim = split_dim(param)
        part = full.detach() if dim is None else full.detach().narrow(
            dim, param.shape[dim] * target.tp.rank, param.shape[dim]).clone()
        target.register_parameter(name, _parameter(part, param))
        dense.register_parameter(name, nn.Parameter(torch.empty_like(full, device="meta")))


def build_model_on(
    config: PanguConfig,
    device: torch.device | str,
    seed: int,
    expert_shard: tuple[int, int] | None = None,
    host_modules: tuple[type[nn.Module], ...] = (),
    on_host_module: Callable[[nn.Module], None] | None = None,
    tp: "TensorParallel | None" = None,
    keep_modules: Callable[[str], bool] | None = None,
) -> PanguModel:
    """`torch.manual_seed(seed); PanguModel(config, expert_shard)`, with each module's weights made on the
    host, initialised and moved to `device` one module at a time; modules of `host_modules` types stay on
    the host, and `on_host_module` (if given) is called on each as soon as it is made (ECSS cuts a layer's
    shard to the rank's owned block there, before the next layer is made). `device="meta"` builds only
    the host-resident modules (to inspect what a rank keeps). With `tp` (a tensor group of more than one
    rank) the model is `PanguModel(config, expert_shard, tp)` holding this rank's slices of those weights.
    With `keep_modules`, modules whose qualified name it rejects go back to the meta device once their draws
    are made (a pipeline stage keeps only its own layers)."""
    from .tensor_parallel import as_tensor_parallel

    device = torch.device(device)
    tp = as_tensor_parallel(tp)
    with parameters_on_meta():
        model = PanguModel(config, expert_shard, tp=tp)
        dense = model if tp is None else PanguModel(config, expert_shard)
    torch.manual_seed(seed)
    _replay_construction_draws(dense)
    targets = dict(model.named_modules())
    for name, module in dense.named_modules():
        _materialize_own(module)
        dense.reset_module(name, module)
        target = targets[name]
        if target is not module:
            _take_slices(module, target)
        on_host = isinstance(target, host_modules)
        if keep_modules is not None and not keep_modules(name):
            _move_own(target, torch.device("meta"))
            continue
        _move_own(target, torch.device("cpu") if on_host else device)
        if on_host and on_host_module is not None:
            on_host_module(target)
    return model


__all__ = ["build_model_on", "on_meta", "parameters_on_meta"]
