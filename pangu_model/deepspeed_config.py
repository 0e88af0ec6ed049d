"""A training preset (`TrainConfig`) → the DeepSpeed JSON config that `deepspeed.initialize` receives.

What lives here and what does not:

* precision (bf16 / fp16 with dynamic loss scaling / fp32), ZeRO stage, engine-wide ZeRO-Offload of the
  optimizer, gradient clipping, batch sizes, and the optimizer (AdamW; DeepSpeed builds it from this
  section, with our parameter groups, each carrying its own eps and weight_decay);
* not the learning-rate schedule: the training program hands DeepSpeed our warmup + cosine scheduler
  (pangu_model/optim.py), whose first step is not lr 0 as with DeepSpeed's WarmupCosineLR;
* not ECSS: DeepSpeed has no expert-only offload switch (SPEC §5.2), so host placement of experts is
  done by pangu_model/ecss.py, outside this config, while ZeRO handles the dense part.

`python -m pangu_model.deepspeed_config --config deploy/presets/pretrain/sigma-tiny.yaml --world-size 2`
prints the JSON.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the training config imports this module; avoid the cycle at run time
    from pangu_model.train import TrainConfig


def deepspeed_config(config: "TrainConfig", world_size: int = 1, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `config` on `world_size` ranks.

    `cuda` (default: whether torch sees CUDA) picks the Adam implementation DeepSpeed builds: torch's
    AdamW, `fused=True` on CUDA (one kernel, and no op to JIT-compile: DeepSpeed's own FusedAdam would
    need `nvcc` and a matching CUDA toolkit on every node), `foreach` elsewhere; DeepSpeedCPUAdam with
    ZeRO-Offload (built with the host's C++ compiler).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    optim = config.optimizer
    # Expert parallelism is carved out of data parallelism, so every rank outside tensor groups and pipelines
    # is a data-parallel rank as far as the batch size goes; the ranks of a tensor group and the stages of a
    # pipeline share their rows.
    data_parallel = world_size // (config.tensor_parallel * config.pipeline_parallel)
    adam_params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not config.offload_optimizer:
        adam_params["torch_adam"] = True
        if cuda:
            adam_params["fused"] = True

    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=bool(cuda),  # a side stream; pointless (and unsupported) on the CPU accelerator
            reduce_scatter=True,
            reduce_bucket_size=int(config.reduce_bucket_size),
            allgather_bucket_size=int(config.reduce_bucket_size),
        )
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cuda)}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * data_parallel,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam_params},
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {
            "enabled": config.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # Our trainer logs every step itself (metrics.py); DeepSpeed's own prints would duplicate it.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
    }
    if config.precision == "bf16" and config.zero_stage > 0:
        # Micro-batch gradients summed in fp32, as Megatron does: DeepSpeed's default sums them in the model's
        # dtype, and bf16's 8-bit mantissa drops most of a micro-batch's contribution once the sum is 2^8 times
        # larger. (ZeRO-1 then runs DeepSpeed's BF16_Optimizer; without ZeRO DeepSpeed has no such mode.)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def main(argv: list[str] | None = None) -> None:
    from pangu_model.train import load_train_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="pretrain preset name or YAML path")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(deepspeed_config(load_train_config(args.config), args.world_size, args.cuda), indent=2))


if __name__ == "__main__":
    main()
