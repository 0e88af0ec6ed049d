"""Parameter groups, the warmup + cosine schedule, the DeepSpeed config and the presets (no engine)."""
from __future__ import annotations

import math

import pytest
import torch

from pangu_model.deepspeed_config import deepspeed_config
from pangu_model import PanguModel, get_config
from pangu_model.optim import OptimConfig, build_scheduler, group_of, lr_at, parameter_groups
from pangu_model.train import PRESET_DIR, TrainConfig, load_train_config


def test_no_weight_decay_on_layernorm_and_biases_and_hybrid_eps() -> None:
    model = PanguModel(get_config("sigma-tiny", vocab_size=100, max_seq_len=16))
    config = OptimConfig(weight_decay=0.1, eps=1e-8, expert_eps=1e-20)
    groups = parameter_groups(model, config)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"dense_decay", "dense_no_decay", "expert_decay", "expert_no_decay"}
    assert by_name["dense_no_decay"]["weight_decay"] == by_name["expert_no_decay"]["weight_decay"] == 0.0
    assert by_name["dense_decay"]["weight_decay"] == by_name["expert_decay"]["weight_decay"] == 0.1
    assert by_name["dense_decay"]["eps"] == 1e-8 and by_name["expert_decay"]["eps"] == 1e-20
    for name, param in model.named_parameters():
        group = group_of(groups, param)
        if ".norm" in name or "_norm" in name or name.endswith(("bias", ".b_in", ".b_out")):
            assert group.endswith("no_decay"), name
        else:
            assert group.endswith("_decay") and not group.endswith("no_decay"), name
        assert group.startswith("expert") == (".experts." in name), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The groups drive a real optimizer: torch's AdamW reads eps and weight_decay per group.
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert sorted(g["eps"] for g in optimizer.param_groups) == [1e-20, 1e-20, 1e-8, 1e-8]


def test_schedule_values() -> None:
    config = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert lr_at(0, config, 1000) == pytest.approx(1e-4)  # the first update already moves
    assert lr_at(4, config, 1000) == pytest.approx(5e-4)
    assert lr_at(9, config, 1000) == pytest.approx(1e-3)
    assert lr_at(10, config, 1000) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, config, 1000) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way
    assert lr_at(110, config, 1000) == pytest.approx(1e-4)
    assert lr_at(500, config, 1000) == pytest.approx(1e-4)  # flat after decay_steps
    values = [lr_at(s, config, 1000) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # decay_steps None: the cosine ends at the run's last step.
    open_ended = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(50, open_ended, 100) == pytest.approx(0.5) and lr_at(100, open_ended, 100) == pytest.approx(0.0)
    # The torch scheduler DeepSpeed steps gives the same numbers, per group (dense and expert alike).
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "eps": 1e-20}], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, 1000)
    seen = []
    for _ in range(120):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([lr_at(step, config, 1000)] * 2), step
    restored = build_scheduler(optimizer, config, 1000)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def _config(**fields) -> TrainConfig:
    return TrainConfig.model_validate({"model": "tiny", **fields})


def test_deepspeed_config_from_the_preset() -> None:
    config = _config(micro_batch_size=3, gradient_accumulation_steps=5, zero_stage=2, precision="bf16",
                     optimizer={"grad_clip": 0.5, "lr": 2e-4, "betas": [0.8, 0.95]})
    ds = deepspeed_config(config, world_size=4, cuda=True)
    assert ds["train_batch_size"] == 3 * 5 * 4 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.8, 0.95]
    # torch's fused AdamW on CUDA: DeepSpeed's FusedAdam would JIT-compile a CUDA op (nvcc on every node)
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert "scheduler" not in ds  # ours is handed to deepspeed.initialize
    # bf16 micro-batch gradients are summed in fp32 (DeepSpeed's default: in bf16), where DeepSpeed can
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(_config(zero_stage=0, precision="bf16"), cuda=True)  # no such mode
    assert "data_types" not in deepspeed_config(_config(zero_stage=1, precision="fp32"), cuda=True)
    cpu = deepspeed_config(_config(precision="fp16", offload_optimizer=True, zero_stage=1), cuda=False)
    assert cpu["fp16"]["enabled"] and cpu["fp16"]["loss_scale"] == 0
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "torch_adam" not in cpu["optimizer"]["params"]  # DeepSpeedCPUAdam with offload
    assert deepspeed_config(_config(zero_stage=0), cuda=False)["optimizer"]["params"]["torch_adam"] is True


def test_presets_load_and_validate() -> None:
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"alpha-tiny", "sigma-tiny", "alpha-350m", "sigma-1t"} <= set(names)
    for name in names:
        config = load_train_config(name)
        assert config.pangu_config().name in {"tiny", "sigma-tiny", "350m", "sigma-1t"}
    sigma = load_train_config("sigma-1t")
    assert sigma.optimizer.expert_eps == 1e-20 and sigma.optimizer.eps == 1e-8 and sigma.expert_parallel == 8
    overridden = load_train_config("sigma-tiny", ["optimizer.lr=3e-4", "train_steps=7"])
    assert overridden.optimizer.lr == 3e-4 and overridden.train_steps == 7


def test_invalid_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="ZeRO-3"):
        _config(model="sigma-tiny", zero_stage=3)
    with pytest.raises(ValueError, match="ECSS needs RRE"):
        _config(model="tiny", ecss=True)
    with pytest.raises(ValueError, match="seq_len"):
        _config(seq_len=4096)
    assert math.isclose(_config().optimizer.eps, 1e-8)


def test_the_gpu_config_builds_torch_fused_adamw_not_a_compiled_op() -> None:
    """DeepSpeed builds its optimizer from the config made for CUDA: torch.optim.AdamW(fused=True), which
    needs no build (checked here on the CPU, where torch's fused AdamW also runs)."""
    import deepspeed

    from pangu_model.train import init_distributed

    init_distributed()  # a world of one (gloo), as the training program makes it
    config = _config(zero_stage=1)
    ds = deepspeed_config(config, world_size=1, cuda=True)
    ds["zero_optimization"]["overlap_comm"] = False  # a CUDA side stream: not on this CPU
    model = PanguModel(config.pangu_config())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, config.optimizer),
                                                   config=ds)
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True
    assert [g["eps"] for g in inner.param_groups] == [g["eps"] for g in parameter_groups(model, config.optimizer)]
