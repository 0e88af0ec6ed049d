"""The training program end to end on CPU: learning, exact resume after kill -9, SIGTERM, export."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pangu_model import load_checkpoint
from pangu_model.metrics import read_metrics
from pangu_model.train import Trainer, load_train_config
from tests.test_train_common import cli, rank_env, run_cli, run_config, session_dir, torchrun


def _wait_for(predicate, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _rows(run: Path) -> int:
    try:
        return len(read_metrics(run))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("preset", ["alpha-tiny", "sigma-tiny"])
def test_a_few_steps_reduce_the_loss_on_a_repeated_batch(preset: str) -> None:
    config = load_train_config(run_config(f"repeat-{preset}", preset, ecss=False, train_steps=12, export=False,
                                          checkpoint_every=0, optimizer={"lr": 3e-3, "warmup_steps": 0}))
    trainer = Trainer(config)
    try:
        batch = trainer._micro_batch()
        trainer._micro_batch = lambda: batch  # the same rows every step
        result = trainer.run()
    finally:
        trainer.close()
    losses = result["losses"]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_losses() -> None:
    """sigma-tiny with ECSS: DeepSpeed state, host expert states and the data position all resume."""
    fields = dict(train_steps=10, checkpoint_every=4, ecss=True, throttle_s=0.3, export=False)
    reference = run_config("kill-reference", "sigma-tiny", **fields)
    first = cli(reference)  # beside the killed run: both mostly wait (start-up, throttle)

    killed = run_config("kill-victim", "sigma-tiny", **fields)
    run = killed.parent
    proc = cli(killed)
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file() and _rows(run) >= 6, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    assert 6 <= _rows(run) < 10  # killed mid-run, after the step-4 checkpoint
    resumed = run_cli(killed)
    assert resumed.returncode == 0, resumed.stdout[-3000:]

    expected = read_metrics(reference.parent)
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits() -> None:
    config = run_config("sigterm", "alpha-tiny", train_steps=200, checkpoint_every=0, throttle_s=0.2)
    run = config.parent
    proc = cli(config)
    _wait_for(lambda: _rows(run) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    # On a CPU machine DeepSpeed's accelerator is the CPU by the trainer's choice, not by a failed probe that
    # warned "If you have GPU or other accelerator, we were unable to detect it" in every run's log.
    assert "unable to detect it" not in out and "Setting accelerator to CPU" not in out, out[:3000]
    steps = _rows(run)
    assert 3 <= steps < 200
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag == f"step{steps:08d}"
    files = {p.name for p in (run / "checkpoints" / tag).iterdir()}
    assert {"mp_rank_00_model_states.pt", "trainer_rank00000.pt"} <= files
    state = torch.load(run / "checkpoints" / tag / "trainer_rank00000.pt", weights_only=True)
    assert state["step"] == steps and state["dataset"]["step"] == steps * 4
    assert not (run / "export").exists()  # preempted runs do not export


def test_the_stop_file_stops_every_rank_without_a_signal() -> None:
    """The deepspeed launcher carries no signal to ranks on other nodes; `<output>/STOP` on the shared
    filesystem reaches them: 2 ranks under torchrun, no signal sent, both checkpoint at the same step."""
    config = run_config("stop-file", "alpha-tiny", train_steps=200, checkpoint_every=0, throttle_s=0.2)
    run = config.parent
    proc = torchrun(config, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _rows(run) >= 3, proc)
        (run / "STOP").touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert '"status": "preempted"' in out, out[-3000:]
    steps = _rows(run)
    assert 3 <= steps < 200
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag == f"step{steps:08d}"
    assert {f"trainer_rank{r:05d}.pt" for r in (0, 1)} <= {p.name for p in (run / "checkpoints" / tag).iterdir()}
    assert not (run / "STOP").exists()  # consumed: a rerun resumes instead of stopping at once


@pytest.mark.parametrize("ecss", [False, True])
def test_export_round_trip(ecss: bool) -> None:
    config = load_train_config(run_config(f"export-{ecss}", "sigma-tiny", ecss=ecss, train_steps=3,
                                          checkpoint_every=0, optimizer={"lr": 1e-2, "warmup_steps": 0}))
    trainer = Trainer(config)
    try:
        trainer.run()
        state = trainer.full_state_dict()
        batch = trainer._micro_batch()
        loaded = load_checkpoint(Path(config.output) / "export")
        assert set(loaded.state_dict()) == set(state)
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, state[name]), name
        # The experts moved away from their shared init: the export really holds trained experts.
        experts = state["query_layer.ffn.experts.w_in"]
        assert not torch.equal(experts[0], experts[-1])
        if not ecss:  # the live module computes the same logits as the reloaded file
            trainer.engine.eval()
            with torch.no_grad():
                live = trainer.engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      domain_ids=batch["domain_ids"]).logits
                again = loaded(batch["input_ids"], batch["position_ids"], batch["domain_ids"]).logits
            torch.testing.assert_close(again, live, rtol=0, atol=0)
    finally:
        trainer.close()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_export_holds_the_fp32_masters(zero_stage: int) -> None:
    """bf16 training keeps bf16 weights in the module and fp32 masters in the optimizer: the export
    must be the masters (the module's copies are those masters rounded to bf16)."""
    config = load_train_config(run_config(f"export-bf16-z{zero_stage}", "alpha-tiny", precision="bf16",
                                          zero_stage=zero_stage, train_steps=3, checkpoint_every=0,
                                          optimizer={"lr": 1e-3, "warmup_steps": 0}))
    trainer = Trainer(config)
    try:
        trainer.run()
        state = trainer.full_state_dict()
        exported = load_checkpoint(Path(config.output) / "export").state_dict()
        module = dict(trainer.engine.module.named_parameters())
        for weight in ("blocks.0.attention.q_proj.weight", "word_embedding.weight"):
            assert module[weight].dtype == torch.bfloat16
            master = exported[weight]
            assert master.dtype == torch.float32
            assert torch.equal(master, state[weight])
            assert torch.equal(master.to(torch.bfloat16), module[weight].detach().cpu())
            assert not torch.equal(master, master.to(torch.bfloat16).float()), f"{weight}: bf16-rounded"
    finally:
        trainer.close()


def test_a_resume_with_more_steps_gives_dense_and_experts_one_schedule() -> None:
    """Resumed with more steps, the dense parameters used to keep the old schedule (restored from the
    checkpoint) while ECSS's experts followed the new one: dense 2.3e-4 vs experts 7.2e-4 at step 75."""
    from pangu_model.optim import lr_at

    path = run_config("lr-resume", "sigma-tiny", ecss=True, train_steps=4, checkpoint_every=0,
                      optimizer={"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 1})
    first = Trainer(load_train_config(path))
    try:
        first.run()
    finally:
        first.close()
    config = load_train_config(path, {"train_steps": 10})
    trainer = Trainer(config)
    used: dict[str, list[float]] = {"dense": [], "experts": []}
    engine_step, ecss_step = trainer.engine.step, trainer.ecss.step

    def dense_step(*args, **kwargs):
        used["dense"].append(trainer.engine.optimizer.param_groups[0]["lr"])  # the lr this update uses
        return engine_step(*args, **kwargs)

    def expert_step(lr, *args, **kwargs):
        used["experts"].append(lr)
        return ecss_step(lr, *args, **kwargs)

    trainer.engine.step, trainer.ecss.step = dense_step, expert_step
    try:
        assert trainer.step == 4
        trainer.run()
    finally:
        trainer.close()
    expected = [lr_at(step, config.optimizer, 10) for step in range(4, 10)]
    assert used["experts"] == pytest.approx(expected, rel=1e-12)
    assert used["dense"] == pytest.approx(expected, rel=1e-12)


def test_a_run_that_cannot_fit_is_refused_with_the_numbers_before_allocating() -> None:
    """ECSS keeps 12 bytes per expert parameter in host memory: 256 experts of 4096 × 16384 in two layers
    need about 0.8 TB, far beyond this machine. The trainer used to start building the model (and run out
    of memory); the planner now refuses the run first, in one line, with the numbers, and before it makes its
    output directory (a refused run used to leave an empty one behind)."""
    output = session_dir() / "runs" / "too-big" / "output"
    path = run_config("too-big", "sigma-tiny", ecss=True, train_steps=1, output=str(output),
                      model_overrides={"d_model": 4096, "d_ff": 16384, "num_heads": 32, "experts_per_domain": 64})
    done = run_cli(path, timeout=120)
    assert not output.exists()
    assert done.returncode == 2, done.stdout[-3000:]
    message = [line for line in done.stdout.splitlines() if line.startswith("pangu_model.train:")]
    assert len(message) == 1 and "does not fit" in message[0] and "host memory" in message[0], done.stdout[-3000:]
    assert "TiB per node" in message[0] or "GiB per node" in message[0]
    assert "Traceback" not in done.stdout


def test_the_speed_switches_reach_the_model() -> None:
    path = run_config("speed-switches", "alpha-tiny", attention_backend="sdpa", compile=True, train_steps=1)
    trainer = Trainer(load_train_config(path))
    try:
        assert trainer.model.attention_backend == "sdpa"
        assert all(getattr(block, "_compiled_call_impl", None) is not None for block in trainer.model.layers)
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="attention_backend"):
        load_train_config(path, ["attention_backend=flash"])


def test_deepspeed_ops_are_built_by_the_environment_s_own_ninja_whatever_path_holds() -> None:
    """Processes that find different ninjas (the environment's 1.13, a system's 1.11) rebuild each other's
    DeepSpeed ops in the shared build directory every time; importing pangu_model puts the environment's
    own first, so a process started with a PATH of system directories only builds with it too."""
    import shutil
    import sys

    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip("this environment has no ninja of its own")  # nothing to choose between
    found = subprocess.run([sys.executable, "-c", "import pangu_model, shutil; print(shutil.which('ninja'))"],
                           env={**os.environ, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert found == str(own), (found, shutil.which("ninja", path="/usr/bin:/bin"))


_CPU_QUESTIONS = """
import json
import cpuinfo, cpuinfo.cpuinfo as probing
probes = []
real = probing.get_cpu_info_json
probing.get_cpu_info_json = lambda: probes.append(1) or real()  # one call: one probe in a new process
import pangu_model
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("CPUAdamBuilder")
asked = [builder.cpu_arch(), builder.simd_width(), cpuinfo.get_cpu_info()["vendor_id_raw"]]  # CPU Adam's three
print(json.dumps({"probes": len(probes), "answers": asked}))
"""


def test_deepspeed_s_questions_about_the_cpu_are_answered_by_one_probe_per_cpu(tmp_path: Path) -> None:
    """DeepSpeed's op builders and CPU Adam ask py-cpuinfo about the CPU three times a rank, each a probe in a new
    process (about 1.2 s); after `import pangu_model` the first process probes once and later ones not at all,
    with the same answers."""
    import json
    import sys

    def ask() -> dict:
        done = subprocess.run([sys.executable, "-c", _CPU_QUESTIONS], capture_output=True, text=True,
                              env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = ask(), ask()
    assert (first["probes"], second["probes"]) == (1, 0)  # DeepSpeed alone: 3 and 3
    assert first["answers"] == second["answers"]
    assert len(list(tmp_path.glob("cpuinfo-*.json"))) == 1


_MUON_AFTER_A_RUN = """
import json, sys
import torch
import pangu_model.train as train

compiled, real_compile = [], torch.compile
torch.compile = lambda fn, **kw: compiled.append(fn.__name__) or real_compile(fn, **kw)
train.main(["--config", sys.argv[1]])  # one step of a ZeRO run
from deepspeed.runtime.zero.muon import original_muon as muon

during_the_run = list(compiled)
grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
with torch.compiler.set_stance("force_eager"):  # compiled here, then run eagerly: no C++ build in a test
    got = muon.zeropower_via_newtonschulz5(grad, steps=2)
want = muon.zeropower_via_newtonschulz5.__wrapped__(grad, steps=2)
print(json.dumps({"during_the_run": during_the_run, "after_a_call": compiled, "equal": torch.equal(got, want)}))
"""


def test_deepspeed_s_muon_is_compiled_when_first_called_not_when_a_rank_starts() -> None:
    """DeepSpeed imports its Muon optimizer in every ZeRO run, and Muon wraps three functions in torch.compile
    when it is imported (2-4 s of each rank's start-up, Dynamo and Inductor). A PanGu rank trains without
    compiling them; a call compiles that function then, and gives the eager function's result."""
    import json
    import sys

    config = run_config("muon-not-compiled", "alpha-tiny", train_steps=1, checkpoint_every=0)
    done = subprocess.run([sys.executable, "-c", _MUON_AFTER_A_RUN, str(config)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1], env=rank_env())
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"during_the_run": [], "after_a_call": ["zeropower_via_newtonschulz5"], "equal": True}


def test_make_ops_builds_the_ops_a_cpu_training_run_loads() -> None:
    """`python -m pangu_model.ops` (`make ops`, before `make run` and `make test`) builds the host Adam kernel
    (host_adam.py) and DeepSpeed's shared-memory collectives ahead, into the directory the training program
    loads them from."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pangu_model.ops"], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[1], env=rank_env())
    assert done.returncode == 0, done.stderr[-3000:]
    # `import pangu_model` must not import the module `-m` runs (runpy then warns on every `make run`), and
    # the CPU ops are built for the CPU accelerator by choice, not after a probe that warns of a missed GPU.
    assert "RuntimeWarning" not in done.stderr and "unable to detect it" not in done.stdout + done.stderr, \
        done.stdout[-3000:] + done.stderr[-3000:]
    ready = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("pangu_model.ops:")}
    assert ready == {"pangu_host_adam", "deepspeed_shm_comm"}, done.stdout
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert all((built / name / f"{name}.so").is_file() for name in ready), sorted(p.name for p in built.iterdir())


def test_a_rerun_of_a_finished_run_keeps_its_export_and_more_steps_export_again() -> None:
    """Rerunning a finished run (the pipeline does on every rerun) wrote the whole export again: a model's
    worth of writes, and a new modification time on the weights, by which the evaluation remembers their
    content hash (so it hashed them again)."""
    path = run_config("export-kept", "sigma-tiny", ecss=True, train_steps=2, checkpoint_every=0)

    def run(**fields) -> dict:
        trainer = Trainer(load_train_config(path, fields or None))
        try:
            return trainer.run()
        finally:
            trainer.close()

    weights = Path(load_train_config(path).output) / "export" / "model.safetensors"
    run()
    made = weights.stat()
    assert run()["export"] == str(weights.parent)
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    shutil.rmtree(weights.parent / "tokenizer")  # an export that lost a part of it is written again
    run()
    assert (weights.parent / "tokenizer" / "spm.model").is_file() and weights.stat().st_ino != made.st_ino
    kept = weights.stat()
    run(train_steps=3)  # more steps: the new checkpoint's weights
    assert weights.stat().st_ino != kept.st_ino
    assert load_checkpoint(weights.parent).config.num_layers > 0


def test_two_ranks_agree_to_keep_the_export_of_a_finished_run() -> None:
    """Export is collective: rank 0 decides whether the export is current and every rank follows."""
    from tests.test_train_common import run_torchrun

    path = run_config("export-kept-2", "sigma-tiny", ecss=True, train_steps=2, checkpoint_every=0,
                      expert_parallel=2)
    weights = Path(load_train_config(path).output) / "export" / "model.safetensors"
    first = run_torchrun(path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    made = weights.stat()
    again = run_torchrun(path, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)


def test_a_domain_too_small_to_hold_documents_out_is_named_once(capsys) -> None:
    """A domain of one document has no validation loss (tokenizer.dataset.held_out): every report lacked it
    without a word."""
    from types import SimpleNamespace

    import numpy as np

    from tokenizer.dataset import make_example

    trainer = SimpleNamespace(
        validation=[make_example(np.arange(9), 0), make_example(np.arange(9), 2)],
        dataset=SimpleNamespace(shards=SimpleNamespace(doc_domains=np.array([0, 0, 1, 2, 2, 3]))),
        domain_names={0: "news", 1: "manual", 2: "web", 3: "poetry"})
    Trainer._say_unvalidated_domains(trainer)
    assert capsys.readouterr().out == ("pangu_model.train: no validation loss for 2 domain(s), manual, poetry: too few "
                                       "documents (or tokens) to hold any out\n")
