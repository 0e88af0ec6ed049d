"""ECSS: host-resident experts, only routed experts fetched and updated, same losses as without ECSS."""
from __future__ import annotations

import pytest
import torch

from pangu_model.ecss import HostExpertBank
from pangu_model.train import Trainer, load_train_config
from tests.test_train_common import packed_tokens, run_config


def _trainer(name: str, **fields) -> Trainer:
    return Trainer(load_train_config(run_config(name, "sigma-tiny", export=False, checkpoint_every=0, **fields)))


def test_only_routed_experts_are_fetched_and_updated() -> None:
    # validation off: its forward fetches the held-out rows' experts too (read only)
    trainer = _trainer("ecss-routed", ecss=True, train_steps=2, optimizer={"lr": 1e-2, "warmup_steps": 0},
                       validation_every=0)
    try:
        ecss = trainer.ecss
        assert ecss is not None and len(ecss.banks) == 2
        assert all(isinstance(layer.experts, HostExpertBank) for layer in ecss.layers.values())
        # Experts are no parameters of the engine's model: DeepSpeed never sees them.
        assert not any(".experts." in n for n, _ in trainer.engine.module.named_parameters())
        batch = trainer._micro_batch()
        domain = int(batch["domain_ids"][0, 0])
        batch["domain_ids"].fill_(domain)  # one domain: only its 2 of the 8 experts are routed
        trainer._micro_batch = lambda: batch
        before = {name: {k: t.clone() for k, t in bank.host.items()} for name, bank in ecss.banks.items()}
        trainer.run()
        for name, bank in ecss.banks.items():
            routed = ecss.last_fetched[name]
            assert routed and set(routed) <= {2 * domain, 2 * domain + 1}, routed
            for key, tensor in bank.host.items():
                for expert in range(bank.num_experts):
                    same = torch.equal(tensor[expert], before[name][key][expert])
                    if expert in routed:
                        assert key.startswith("b_") or not same, (name, key, expert)
                    else:
                        assert same, (name, key, expert)  # bit-identical: never fetched, never stepped
            # Adam states exist only for the routed experts, with their own step counts.
            state = ecss.state_dict()[f"{name}.w_in"]
            assert [int(s) for s in state["step"]] == [2 if e in routed else 0 for e in range(bank.num_experts)]
        assert bank.device_weights == {}  # released after the host update
    finally:
        trainer.close()


def test_ecss_gives_the_same_losses_as_experts_on_the_device() -> None:
    """One domain, so every step routes to every expert and the dense Adam and the lazy host Adam do
    the same maths; clipping off because ECSS clips experts by their own norm (ecss.py docstring)."""
    data = str(packed_tokens(("web",)))
    losses = {}
    for ecss in (False, True):
        trainer = _trainer(f"ecss-equal-{ecss}", ecss=ecss, train_steps=6, data=data,
                           model_overrides={"num_domains": 1, "experts_per_domain": 2},
                           optimizer={"lr": 3e-3, "warmup_steps": 2, "grad_clip": 0.0})
        try:
            losses[ecss] = trainer.run()["losses"]
            if ecss:
                assert all(len(v) == 2 for v in trainer.ecss.last_fetched.values())
        finally:
            trainer.close()
    assert losses[True][0] == losses[False][0]  # same init, same first forward
    assert losses[True] == pytest.approx(losses[False], rel=1e-5), losses
    assert losses[True][-1] < losses[True][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_host_buffers_are_pinned_on_cuda() -> None:
    trainer = _trainer("ecss-pinned", ecss=True, train_steps=1)
    try:
        for bank in trainer.ecss.banks.values():
            assert all(t.is_pinned() for t in bank.host.values())
        trainer.run()
    finally:
        trainer.close()


def test_copy_rows_copies_runs_of_rows() -> None:
    from pangu_model.ecss import copy_rows

    source = torch.arange(40.0).view(10, 4)
    rows = [0, 1, 2, 5, 7, 8]
    target = torch.empty(len(rows), 4)
    copy_rows(source, rows, target)
    assert torch.equal(target, source[rows])


def test_fetches_come_from_compute_dtype_shadows_refreshed_after_each_host_step() -> None:
    """bf16 compute: the host keeps bf16 shadows of the fp32 masters; a fetch copies them (2 bytes per
    parameter) into the device pool, and after the host step the stepped experts' shadows follow their
    masters while the others stay bit-identical. The host optimizer gets its own threads."""
    from pangu_model import PanguModel
    from pangu_model.config import PRESETS
    from pangu_model.ecss import ExpertOffload
    from pangu_model.optim import OptimConfig

    torch.manual_seed(0)
    model = PanguModel(PRESETS["sigma-tiny"].replace(vocab_size=512, max_seq_len=32))
    torch.set_num_threads(1)  # as torchrun starts a rank
    try:
        ecss = ExpertOffload(model, OptimConfig(lr=1e-2, warmup_steps=0), "cpu", torch.bfloat16, host_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    bank = next(iter(ecss.banks.values()))
    assert all(bank.shadow[n].dtype == torch.bfloat16 and torch.equal(bank.shadow[n], bank.host[n].bfloat16())
               for n in bank.host)
    batch = {"input_ids": torch.randint(10, 512, (1, 32)), "domain_ids": torch.full((1, 32), 1)}
    plan = ecss.plan([batch])
    ecss.fetch(plan)
    active = bank.active.tolist()
    assert 0 < len(active) < bank.num_experts
    row = sum(t[0].numel() for t in bank.host.values())
    assert ecss.traffic["host_to_device"] == sum(len(plan[n]) for n in ecss.banks) * row * 2
    for name, weight in bank.device_weights.items():
        assert weight.dtype == torch.bfloat16 and weight.is_leaf and weight.requires_grad
        assert torch.equal(weight.detach(), bank.host[name][active].bfloat16())
    before = {n: t.clone() for n, t in bank.shadow.items()}
    for b in ecss.banks.values():
        for weight in b.device_weights.values():
            weight.grad = torch.ones_like(weight)
    ecss.step(lr=1e-2)
    for name, shadow in bank.shadow.items():
        assert torch.equal(shadow, bank.host[name].bfloat16()), name  # every row follows its master
        others = [e for e in range(bank.num_experts) if e not in active]
        assert torch.equal(shadow[others], before[name][others])
        if name.startswith("w_"):
            assert not torch.equal(shadow[active], before[name][active])
    assert ecss.host_bytes() > sum(t.numel() * 4 for t in bank.host.values())  # masters + shadows + moments


@pytest.mark.parametrize("warmup", [0, 2])
def test_delayed_host_update_fetches_the_masters_of_two_steps_back_and_resumes_exactly(monkeypatch, warmup) -> None:
    """ecss_delayed_update: the host Adam of step s runs beside step s + 1, which still fetches the
    weights before update s: step t computes with the masters after update t − 2. With a warm-up of W
    steps (ecss_delayed_update_after) the updates of steps 1..W run in line: steps up to W + 1 compute
    with every update before them. A checkpoint with an update in flight (warm-up 0) or inside the
    warm-up (warm-up 2) resumes to the same losses as a run that never stopped."""
    from pangu_model.ecss import ExpertOffload

    fetched: list[dict[str, tuple[list[int], torch.Tensor]]] = []
    after_update: list[dict[str, torch.Tensor]] = []
    original_fetch, original_apply = ExpertOffload.fetch, ExpertOffload._apply

    def fetch(self, plan):
        original_fetch(self, plan)
        fetched.append({n: (b.active.tolist(), b.device_weights["w_in"].detach().clone()) for n, b in self.banks.items()})

    def apply(self, lr, pairs):
        original_apply(self, lr, pairs)
        after_update.append({n: b.host["w_in"].clone() for n, b in self.banks.items()})

    monkeypatch.setattr(ExpertOffload, "fetch", fetch)
    monkeypatch.setattr(ExpertOffload, "_apply", apply)
    steps = 4 + warmup
    fields = dict(ecss=True, ecss_delayed_update=True, ecss_delayed_update_after=warmup, validation_every=0,
                  optimizer={"lr": 1e-2, "warmup_steps": 0, "decay_steps": steps})
    trainer = _trainer(f"ecss-delayed-{warmup}", train_steps=steps, **fields)
    try:
        initial = {n: b.host["w_in"].clone() for n, b in trainer.ecss.banks.items()}
        whole = trainer.run()["losses"]
    finally:
        trainer.close()
    assert len(fetched) == steps and len(after_update) == steps
    for t, step in enumerate(fetched, start=1):
        behind = 1 if t <= warmup + 1 else 2  # the last update this step's weights hold is t - behind
        masters = initial if t - behind == 0 else after_update[t - behind - 1]
        for name, (active, weights) in step.items():
            assert torch.equal(weights, masters[name][active]), (t, name)
    assert any(not torch.equal(after_update[0][n], initial[n]) for n in initial)  # the updates do land

    sync = _trainer(f"ecss-delayed-sync-{warmup}", train_steps=steps, **{**fields, "ecss_delayed_update": False})
    try:
        inline = sync.run()["losses"]
    finally:
        sync.close()
    # No step before the first whose weights lack an update differs from the in-line run. (A later step shows
    # the lag only where its rows route to experts that the update before it changed: step 2 does here.)
    assert inline[: warmup + 1] == whole[: warmup + 1]
    if warmup == 0:
        assert inline[1] != whole[1]

    monkeypatch.setattr(ExpertOffload, "fetch", original_fetch)
    monkeypatch.setattr(ExpertOffload, "_apply", original_apply)
    from tests.test_train_common import run_config

    config = run_config(f"ecss-delayed-resume-{warmup}", "sigma-tiny", export=False, train_steps=2,
                        checkpoint_every=2, **fields)
    first = Trainer(load_train_config(config))
    try:
        first.run()
    finally:
        first.close()
    resumed = Trainer(load_train_config(config, {"train_steps": steps}))
    try:
        result = resumed.run()
    finally:
        resumed.close()
    from pangu_model.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(config.parent)]
    assert losses == pytest.approx(whole, rel=1e-6), (losses, whole)
    assert result["losses"]
