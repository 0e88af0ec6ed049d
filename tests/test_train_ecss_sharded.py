"""ECSS host state sharded like ZeRO (issue #12 §1, `ecss_shard_states`): 4 gloo ranks, ep 2 × dp 2.

Each expert's fp32 master and Adam states live on one owner among the replicas of its expert shard:
a rank's host expert bytes are ¼ of the total; the losses, a stop-and-resume and the export equal
unsharded ECSS. The module is also the torchrun entry point of these runs
(`python -m tests.test_train_ecss_sharded --config C`): it trains and exports with the compute device
`cpu:0` under the collective guard (every collective on the compute device, as NCCL needs) and writes
each rank's `ExpertOffload.host_bytes()` to `host_bytes_rank<r>.json` in the run dir.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train_common import run_torchrun, torchrun

RANKS = 4
STEPS = 4


def _torchrun(config: Path, expect_ok: bool = True, ranks: int = RANKS) -> subprocess.CompletedProcess:
    done = run_torchrun(config, module="tests.test_train_ecss_sharded", ranks=ranks)
    if expect_ok:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _kill_9_after_the_step_2_checkpoint(config: Path) -> None:
    """Start the 4-rank run and SIGKILL every process of it once step 3 is logged (after the step-2
    checkpoint, before the end): what a preempted node does."""
    from pangu_model.metrics import read_metrics
    from tests.test_train_common import logged_rows, torchrun_killed_when

    run = config.parent
    step_3_logged = lambda: len(logged_rows(run)) >= 3 and (run / "checkpoints" / "latest").is_file()  # noqa: E731
    torchrun_killed_when(config, step_3_logged, module="tests.test_train_ecss_sharded", ranks=RANKS)
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert 3 <= len(read_metrics(run)) < STEPS  # killed mid-run


def _host_bytes(run: Path, ranks: int = RANKS) -> list[dict[str, int]]:
    return [json.loads((run / f"host_bytes_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_sharded_host_state_matches_unsharded_ecss_resumes_and_exports_the_same() -> None:
    from pangu_model import load_checkpoint
    from pangu_model.metrics import read_metrics
    from tests.test_train_common import run_config

    # domain_affine on: each expert-parallel group draws its own domain in a step, so the two groups
    # route to different experts and the replicas of a shard ask different experts of their owners. The
    # host update runs one step behind (the preset's ecss_delayed_update) in both runs.
    optimizer = {"lr": 3e-3, "warmup_steps": 1, "decay_steps": STEPS, "grad_clip": 0.5}
    fields = dict(ecss=True, expert_parallel=2, topology=None, domain_affine=True, optimizer=optimizer,
                  micro_batch_size=2, ecss_delayed_update=True, train_steps=STEPS)
    whole = run_config("ecss-unsharded-4", "sigma-tiny", checkpoint_every=0, ecss_shard_states=False, **fields)
    owned = run_config("ecss-sharded-4", "sigma-tiny", checkpoint_every=2, ecss_shard_states=True,
                       throttle_s=0.5, **fields)
    reference = torchrun(whole, module="tests.test_train_ecss_sharded", ranks=RANKS)  # beside the throttled run
    _kill_9_after_the_step_2_checkpoint(owned)
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, (out + err)[-4000:]
    _torchrun(owned)  # resumes from step 2, each owner from its own file, an update in flight included

    a, b = read_metrics(whole.parent), read_metrics(owned.parent)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)) == [r["step"] for r in a]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x["loss"], y["loss"])

    _check_rank_local_fetch(owned.parent)

    # Host memory: an unsharded rank holds its ep shard (½ of all expert state), a sharded one ¼. Adam
    # moments exist for the experts ever stepped (lazy Adam): the same experts in both runs, so the
    # sharded ranks together hold what one replica of each shard holds unsharded, and each at most its
    # block's masters, their shadows (copies even under fp32: the update is delayed) and two moments.
    unsharded, sharded = _host_bytes(whole.parent), _host_bytes(owned.parent)
    total = sum(r["host_bytes"] for r in unsharded) // 2  # the 2 replicas of each shard hold copies
    assert unsharded[0]["host_bytes"] == unsharded[2]["host_bytes"] or unsharded[0]["host_bytes"] == \
        unsharded[1]["host_bytes"]  # replicas of a shard: identical copies
    assert sum(r["host_bytes"] for r in sharded) == total
    masters = unsharded[0]["master_bytes"] * 2  # all experts of all layers
    assert all(r["master_bytes"] * 4 == masters for r in sharded)
    assert all(2 * r["master_bytes"] <= r["host_bytes"] <= 4 * r["master_bytes"] for r in sharded), sharded

    # Each owner's block once in the checkpoint: 2 of the 8 experts per file; the blocks of a shard
    # together are the unsharded shard file (masters, Adam moments, per-expert step counts).
    files = sorted((owned.parent / "checkpoints" / f"step{STEPS:08d}").glob("ecss_experts_ep*.pt"))
    assert [p.name for p in files] == [f"ecss_experts_ep{e:03d}_owner{o:03d}.pt" for e in range(2) for o in range(2)]
    states = [torch.load(path, weights_only=True) for path in files]
    for i, state in enumerate(states):
        assert state["shard"].tolist() == [i // 2, 2] and state["owner"].tolist() == [i % 2, 2]
        # blocks rotate with the shard: a node's ranks own consecutive blocks (owned_block)
        assert int(state["block"]) == (i % 2 + i // 2) % 2
        assert all(v["master"].shape[0] == 2 for k, v in state.items() if k not in ("shard", "owner", "block"))
    for ep_rank in range(2):
        unsharded = whole.parent / "checkpoints" / f"step{STEPS:08d}" / f"ecss_experts_ep{ep_rank:03d}.pt"
        reference = torch.load(unsharded, weights_only=True)
        blocks = sorted(states[2 * ep_rank: 2 * ep_rank + 2], key=lambda state: int(state["block"]))
        for key, ref in reference.items():
            if key == "shard":
                continue
            assert torch.equal(torch.cat([b[key]["step"] for b in blocks]), ref["step"]), key
            assert int(ref["step"].sum()) > 0
            for part in ("master", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(torch.cat([b[key][part] for b in blocks]), ref[part],
                                           rtol=1e-5, atol=1e-7, msg=f"{key}.{part}")

    # The export, written by every owner for its block, equals the unsharded one.
    x, y = (load_checkpoint(p.parent / "export").state_dict() for p in (whole, owned))
    assert set(x) == set(y)
    for name, tensor in x.items():
        torch.testing.assert_close(y[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # A checkpoint of the other layout is refused, by name.
    data = yaml.safe_load(whole.read_text())
    whole.write_text(yaml.safe_dump({**data, "train_steps": STEPS + 1, "ecss_shard_states": True}))
    refused = _torchrun(whole, expect_ok=False)
    assert refused.returncode != 0
    assert "resume with the same ecss_shard_states" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_uneven_owner_blocks_when_replicas_do_not_divide_the_shard() -> None:
    """3 replicas (ep 1 × dp 3) of 8 experts per layer own blocks of 2, 3 and 3 (sigma-1t: 80 experts over
    64 nodes): the losses and the export equal unsharded ECSS, each rank holds its block's masters. Both
    runs update the host one step behind (ecss_delayed_update), on every rank."""
    from pangu_model import load_checkpoint
    from pangu_model.metrics import read_metrics
    from tests.test_train_common import run_config

    optimizer = {"lr": 3e-3, "warmup_steps": 1, "decay_steps": 2, "grad_clip": 0.5}
    fields = dict(ecss=True, expert_parallel=1, topology=None, optimizer=optimizer, micro_batch_size=2,
                  train_steps=3, checkpoint_every=0, ecss_delayed_update=True)
    whole = run_config("ecss-unsharded-3", "sigma-tiny", ecss_shard_states=False, **fields)
    owned = run_config("ecss-sharded-3", "sigma-tiny", ecss_shard_states=True, **fields)
    first = torchrun(whole, module="tests.test_train_ecss_sharded", ranks=3)  # both at once: start-ups overlap
    _torchrun(owned, ranks=3)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, (out + err)[-4000:]
    a, b = read_metrics(whole.parent), read_metrics(owned.parent)
    assert [r["step"] for r in b] == [1, 2, 3] == [r["step"] for r in a]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x["step"], x["loss"], y["loss"])
    full = _host_bytes(whole.parent, 3)[0]["master_bytes"]
    assert [r["master_bytes"] * 8 for r in _host_bytes(owned.parent, 3)] == [2 * full, 3 * full, 3 * full]
    x, y = (load_checkpoint(p.parent / "export").state_dict() for p in (whole, owned))
    assert set(x) == set(y)
    for name, tensor in x.items():
        torch.testing.assert_close(y[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    _check_rank_local_fetch(owned.parent, ranks=3)


def _check_rank_local_fetch(run: Path, ranks: int = RANKS) -> None:
    """Every fetch of every rank (the completed launches' steps, and validation) holds exactly the experts its
    expert-parallel group's rows route to in its shard, not the world's union; the bytes it moved are
    those experts' (received) and, as an owner, what any replica asked of its block (host→device)."""
    logs = {r: [json.loads(line) for line in (run / f"ecss_steps_rank{r}.jsonl").read_text().splitlines()]
            for r in range(ranks)}
    runs = {r: [e for e in logs[r] if "run" in e] for r in range(ranks)}
    steps = {r: [e for e in logs[r] if "run" not in e] for r in range(ranks)}
    assert len({len(v) for v in steps.values()}) == 1 and len(steps[0]) >= 2
    info = runs[0][0]
    layers = list(steps[0][0]["fetched"])
    narrower = 0
    previous = {r: {"host_to_device": 0, "device_received": 0} for r in range(ranks)}
    for i in range(len(steps[0])):
        if any(steps[r][i].get("first_of_run") for r in range(ranks)):
            previous = {r: {"host_to_device": 0, "device_received": 0} for r in range(ranks)}
        world = {layer: set().union(*(steps[r][i]["routed_here"][layer] for r in range(ranks))) for layer in layers}
        for r in range(ranks):
            me = runs[r][0]
            first, size = me["shard_first"], me["shard_size"]
            group = me["ep_ranks"]
            received = 0
            for layer in layers:
                asked = set().union(*(steps[p][i]["routed_here"][layer] for p in group))
                want = sorted(e for e in asked if first <= e < first + size)
                assert steps[r][i]["fetched"][layer] == want, (i, r, layer)
                narrower += len(want) < len([e for e in world[layer] if first <= e < first + size])
                received += len(want)
            traffic = steps[r][i]["traffic"]
            assert traffic["device_received"] - previous[r]["device_received"] == received * info["row_bytes"]
            owned = range(me["owned_first"], me["owned_first"] + me["owned_size"])
            uploaded = sum(len({e for p in me["replica_ranks"] for e in steps[p][i]["fetched"][layer]} & set(owned))
                           for layer in layers)
            assert traffic["host_to_device"] - previous[r]["host_to_device"] == uploaded * info["row_bytes"]
            previous[r] = traffic
    assert narrower > 0  # some rank fetched less than the world's union: the fetch is rank-local
    # Gradients back: every training step's returns went out before step(), from the last backward's hooks
    # (or at once where a rank held no rows of a layer), in the same order on every rank.
    trained = [e for r in range(ranks) for e in steps[r] if "returned_before_step" in e]
    assert trained and all(e["returned_before_step"] == list(reversed(layers)) for e in trained)


def _write_host_bytes(trainer) -> None:
    import torch.distributed as dist

    ecss = trainer.ecss
    masters = sum(t.numel() * t.element_size() for b in ecss.banks.values() for t in b.host.values())
    Path(trainer.config.output, f"host_bytes_rank{trainer.rank}.json").write_text(
        json.dumps({"host_bytes": ecss.host_bytes(), "master_bytes": masters, "sharded": ecss.sharded}))
    bank = next(iter(ecss.banks.values()))
    ranks = (lambda g: dist.get_process_group_ranks(g) if g is not None else [trainer.rank])
    run = {"run": True, "shard_first": bank.first, "shard_size": bank.shard_size, "owned_first": bank.owned_first,
           "owned_size": bank.owned_size, "ep_ranks": ranks(ecss.ep_group), "replica_ranks": ranks(ecss.replica_group),
           "row_bytes": ecss._row_bytes(bank, ecss.dtype)}
    lines = [run] + [{**entry, "first_of_run": i == 0} for i, entry in enumerate(ecss.steps_log)]
    with open(Path(trainer.config.output, f"ecss_steps_rank{trainer.rank}.jsonl"), "a") as fh:
        fh.write("".join(json.dumps(line) + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    """Torchrun entry point: `tests.collective_guard`'s guarded run, then each rank's ECSS host bytes
    and (ECSS steps recorded) what each fetch held and moved."""
    from pangu_model import ecss
    from tests import collective_guard

    ecss.RECORD_STEPS = True
    return collective_guard.main(argv, report=_write_host_bytes)


if __name__ == "__main__":
    sys.exit(main())
