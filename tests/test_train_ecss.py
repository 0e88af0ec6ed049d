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
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun starts a rank
    try:
        ecss = ExpertOffload(model, OptimConfig(lr=1e-2, warmup_steps=0), "cpu", torch.bfloat16, host_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_delayed_update_scales_its_own_landed_gradients_on_the_worker(monkeypatch, precision) -> None:
    """With ecss_delayed_update the training thread makes no pass over the landed gradients: the worker
    multiplies them (fp32 sums in place; bf16 gradients widened into fp32) while the next step lands its own
    in the other landing buffer. A worker held back well past the next step's backward therefore updates
    exactly as a prompt one: the same losses."""
    import threading
    import time

    from pangu_model.ecss import ExpertOffload

    threads: list[str] = []
    original = ExpertOffload._gradient_pairs
    hold = {"seconds": 0.0}

    def held_back(self, landed):
        threads.append(threading.current_thread().name)
        time.sleep(hold["seconds"])
        return original(self, landed)

    monkeypatch.setattr(ExpertOffload, "_gradient_pairs", held_back)
    steps = 5
    fields = dict(ecss=True, ecss_delayed_update=True, ecss_delayed_update_after=1, validation_every=0,
                  precision=precision, train_steps=steps, optimizer={"lr": 1e-2, "warmup_steps": 0})
    losses = []
    for seconds in (0.0, 0.4):
        hold["seconds"] = seconds
        threads.clear()
        trainer = _trainer(f"ecss-delayed-held-{precision}-{seconds}", **fields)
        try:
            assert trainer.ecss._return_dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
            losses.append(trainer.run()["losses"])
        finally:
            trainer.close()
        # the warm-up step's update in line, then every update on the worker
        assert threads == ["MainThread"] + ["ecss-host-adam"] * (steps - 1), threads
    assert len(losses[0]) == steps and losses[1] == pytest.approx(losses[0], rel=1e-6, abs=0), losses


def test_expert_gradients_start_back_from_hooks_in_the_last_backward(monkeypatch) -> None:
    """Gradients back (ecss.py): with 2 micro-batches a step, each expert layer's return starts from its
    gradient hooks in the second backward, the top layer first, before that backward reaches the first
    dense block (a hook on its parameter marks it), and has landed in the host buffer before step() is
    called; the first backward sends nothing. The losses equal those of the same run with every return
    sent from step() (the flow before the hooks): what returns holds both micro-batches' gradients."""
    from pangu_model.ecss import ExpertOffload

    events: list[tuple] = []
    send, step = ExpertOffload._send, ExpertOffload.step

    def logged_send(self, layer, before_step):
        events.append(("expert", layer, before_step))
        send(self, layer, before_step)

    def checked_step(self, *args, **kwargs):
        for layer, bank in self.banks.items():  # what went from the hooks is on the host already
            ret = self._returns[layer] if self._returns is not None else None
            if ret is not None and ret.before_step:
                grads = torch.cat([g.reshape(-1) for g in bank.gradients().values()])
                assert torch.equal(self._landing[ret.offset: ret.offset + ret.size], grads), layer
        events.append(("step",))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(ExpertOffload, "_send", logged_send)
    monkeypatch.setattr(ExpertOffload, "step", checked_step)
    losses, logs = {}, {}
    for hooks in (True, False):
        if not hooks:  # nothing announces the last backward: step() sends every layer after it
            monkeypatch.setattr(ExpertOffload, "last_micro_batch", lambda self: None)
        trainer = _trainer(f"ecss-hooks-{hooks}", ecss=True, train_steps=3, gradient_accumulation_steps=2,
                           validation_every=0, optimizer={"lr": 1e-2, "warmup_steps": 0, "grad_clip": 0.5})
        try:
            dense = dict(trainer.engine.module.named_parameters())["blocks.0.attention.q_proj.weight"]
            dense.register_post_accumulate_grad_hook(lambda _: events.append(("dense",)))
            events.clear()
            losses[hooks] = trainer.run()["losses"]
            logs[hooks] = list(events)
            top_first = list(reversed(trainer.ecss.banks))
        finally:
            trainer.close()
    expected = [("dense",), *(("expert", layer, True) for layer in top_first), ("dense",), ("step",)]
    assert logs[True] == expected * 3, logs[True]
    assert logs[False] == [("dense",), ("dense",), ("step",), *(("expert", layer, False) for layer in top_first)] * 3
    assert losses[True] == losses[False], losses


def _two_replicas(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks holding the same experts (no expert parallelism, unsharded). Rank r gives
    every weight of layer l (0 bottom) the gradient (r + 1)·(l + 1), except that rank 1's last backward
    goes through the bottom layer only. Each used layer computes rows, so its input hook tells when the
    backward has left it; those rows add exactly zero to the gradients."""
    import os

    import torch.distributed as dist

    from pangu_model import PanguModel
    from pangu_model.config import PRESETS
    from pangu_model.ecss import ExpertOffload
    from pangu_model.optim import OptimConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = PanguModel(PRESETS["sigma-tiny"].replace(vocab_size=512, max_seq_len=32))
        ecss = ExpertOffload(model, OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0), "cpu",
                             group=dist.group.WORLD, host_threads=1)
        batch = {"input_ids": torch.arange(10, 42).view(1, 32), "domain_ids": torch.ones(1, 32, dtype=torch.long)}
        ecss.fetch(ecss.plan([batch]))
        layers = list(ecss.banks)  # bottom first
        ecss.last_micro_batch()
        used = layers if rank == 0 else layers[:1]
        loss = sum((w * (rank + 1) * (layers.index(layer) + 1)).sum()
                   for layer in used for w in ecss.banks[layer].device_weights.values())
        for layer in used:
            bank = ecss.banks[layer]
            x = torch.randn(4, model.config.d_model, requires_grad=True)
            loss = loss + 0 * bank(x, bank.active[torch.arange(4) % len(bank.active)], torch.arange(4)).sum()
        loss.backward()
        sent = [layer for layer in ecss._order if ecss._returns[layer].before_step]
        returned = {}
        apply = ecss._apply

        def recorded(lr, pairs):  # the host gradients, layer by layer (bottom first)
            returned["grads"] = torch.cat([grad.reshape(-1) for _, grad in pairs])
            apply(lr, pairs)

        ecss._apply = recorded
        norm = ecss.step(lr=1e-2)["expert_grad_norm"]
        sizes = [sum(t[0].numel() for t in ecss.banks[layer].host.values()) * len(ecss.last_fetched[layer])
                 for layer in layers]
        torch.save({"sent": sent, "norm": norm, "sizes": sizes, "layers": layers, "grads": returned["grads"],
                    "masters": {n: b.host["w_in"].clone() for n, b in ecss.banks.items()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_without_a_layers_gradient_sends_it_and_the_later_layers_at_step(tmp_path) -> None:
    """2 replicas: rank 0 sends both layers' all-reduces from its hooks; rank 1's backward does not go
    through the top layer, which holds it and the layer below back until step(). The collectives still pair up (the
    same fixed order on both ranks, on ECSS's twin of the world group): no deadlock, and both replicas
    step with the mean gradients, (1·1 + 2·1)/2 in the bottom layer and (1·2 + 0)/2 in the top one."""
    import math

    import torch.multiprocessing as mp

    from pangu_model.train import _free_port

    mp.spawn(_two_replicas, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    bottom, top = ranks[0]["layers"]
    assert ranks[0]["sent"] == [top, bottom] and ranks[1]["sent"] == []
    low, high = ranks[0]["sizes"]
    expected = torch.cat([torch.full((low,), 1.5), torch.full((high,), 1.0)])
    for state in ranks:
        assert torch.equal(state["grads"], expected)
        assert state["norm"] == pytest.approx(math.sqrt(1.5 ** 2 * low + high), rel=1e-6)
    for layer in (bottom, top):
        assert torch.equal(ranks[0]["masters"][layer], ranks[1]["masters"][layer]), layer
