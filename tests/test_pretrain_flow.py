"""The `pretrain` flow on a real Prefect API: tiny presets end to end, artifacts, resume, failures,
the packed-data version it picks, and the launch commands for one process, local ranks and nodes."""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from flows.pretrain import (Launch, ProgressLine, build_launch, last_metrics_row, parse_result, read_metrics_csv,
                            resolve_data, run_training, sample_rows)
from tests.test_train_common import VOCAB, packed_tokens, training_processes

# The tiny presets on the session's tiny tokenizer: short rows, a small vocabulary.
TINY = {"seq_len": 64, "model_overrides": {"vocab_size": VOCAB, "max_seq_len": 64}, "progress_bar": False}


@pytest.fixture(scope="module")
def tokens() -> Path:
    return packed_tokens()


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@pytest.mark.parametrize("preset", ["alpha-tiny", "sigma-tiny"])
def test_flow_trains_exports_and_publishes(prefect_api, tokens, tmp_path, preset):
    from pangu_model import load_checkpoint

    from flows.pretrain import pretrain

    out = tmp_path / preset
    state = pretrain(preset=preset, data=str(tokens), output=str(out), steps=3, overrides=TINY, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed" and result["step"] == 3 and result["launcher"] == "python"
    model = out / "export" / "model.safetensors"
    assert model.is_file() and result["model"] == str(model)
    assert result["asset"] == model.resolve().as_uri()
    assert load_checkpoint(out / "export").config.vocab_size == VOCAB
    assert result["final_loss"] == pytest.approx(read_metrics_csv(out)[-1]["loss"])

    found = _artifacts(state.state_details.flow_run_id)
    assert {"pretrain-summary", "pretrain-loss", "pretrain-model", "pretrain-loss-plot"} <= set(found)
    plots = found["pretrain-loss-plot"].data  # pictures inside the UI, not links to local files
    assert plots.count("](data:image/png;base64,") == 2  # loss + lr, validation loss per domain
    summary = found["pretrain-summary"].data
    for text in (preset, "final loss", "tokens/s", str(out / "checkpoints"), str(out / "export"),
                 "validation loss / perplexity", "## Validation (held-out documents)", "## Samples", "床前明月光"):
        assert text in summary, text
    table = _table(found["pretrain-loss"])
    assert [row["step"] for row in table] == [1, 2, 3] and all(row["loss"] > 0 for row in table)
    assert str(model) in found["pretrain-model"].data


def test_rerun_with_the_same_output_resumes(prefect_api, tokens, tmp_path):
    from flows.pretrain import pretrain

    out = tmp_path / "resume"
    first = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=2, overrides=TINY)
    assert first["resumed_from"] is None
    again = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=4, overrides=TINY)
    assert again["resumed_from"] == "step00000002" and again["step"] == 4
    assert [int(r["step"]) for r in read_metrics_csv(out)] == [1, 2, 3, 4]
    assert first["launched"] and again["launched"]

    # The same request again: the run is finished and exported, so the job is not launched (it loaded the
    # last checkpoint, a model's worth of reads on the cluster, to find no step left).
    files = sorted(p for p in out.rglob("*") if p.is_file())
    marks = {p: p.stat().st_mtime_ns for p in files}
    done = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=4, overrides=TINY)
    assert done["launched"] is False and done["status"] == "completed" and done["step"] == 4
    assert done["final_loss"] == again["final_loss"] and done["model"] == again["model"]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert [str(p) for p in files if p.stat().st_mtime_ns != marks[p]] == []
    # Another request (a field changed) launches the trainer, which keeps the export and records that this
    # config made it: that request again is not launched either.
    quieter = {**TINY, "log_every": 2}
    changed = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=4, overrides=quieter)
    assert changed["launched"] and changed["step"] == 4
    assert (out / "export" / "model.safetensors").stat().st_mtime_ns == marks[out / "export" / "model.safetensors"]
    assert pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=4, overrides=quieter)["launched"] is False

    # Another batch or model into the same output: refused before anything launches, naming what differs (each
    # rank refused it after launching, with a traceback and no word of what differed)
    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=6,
                     overrides={**TINY, "micro_batch_size": 2}, return_state=True)
    assert state.is_failed() and "micro_batch_size 4 → 2" in state.message, state.message
    assert "another model/data/batch config" in state.message and "Last lines" not in state.message
    assert [int(r["step"]) for r in read_metrics_csv(out)] == [1, 2, 3, 4]


def test_a_finished_run_is_the_one_its_export_record_names(tmp_path):
    """What lets the flow leave a run unlaunched: the last checkpoint's export record names this step count and
    this very config, and the export still holds its files; a config that asks for a new run never matches."""
    from pangu_model.train import finished_run, load_train_config

    config = load_train_config("alpha-tiny", {"output": str(tmp_path), "train_steps": 4})
    (tmp_path / "checkpoints" / "step00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"weights")

    def record(config) -> None:
        (tmp_path / "checkpoints" / "step00000004" / "exported.json").write_text(json.dumps(
            {"step": 4, "files": ["model.safetensors"], "config": config.digest()}))

    record(config)
    assert finished_run(tmp_path, config) == 4
    assert finished_run(tmp_path, config.model_copy(update={"train_steps": 5})) is None
    assert finished_run(tmp_path, config.model_copy(update={"micro_batch_size": 2})) is None
    fresh = config.model_copy(update={"resume": False})  # asks to train again from step 0, every time
    record(fresh)
    assert finished_run(tmp_path, fresh) is None
    record(config)
    (tmp_path / "export" / "model.safetensors").unlink()  # an export that lost its weights is written again
    assert finished_run(tmp_path, config) is None


def test_data_of_another_tokenizer_cannot_resume_a_run_or_start_from_an_export(tokens, tmp_path):
    """A tokenizer of the same size packs other ids: a resume (or --export-only) on such data trained on, and an
    init_from export of it was accepted, and their exports bundled a tokenizer the weights never knew."""
    import torch

    from pangu_model.checkpoint import save_checkpoint
    from pangu_model.model import PanguModel
    from pangu_model.train import DataMismatch, ResumeMismatch, check_resumable, fit_to_data, load_train_config
    from tokenizer.pack import packed_with

    packed = packed_with(json.loads((tokens / "domains.json").read_text()))
    config = fit_to_data(load_train_config("alpha-tiny", {"data": str(tokens), "output": str(tmp_path / "run"), **TINY}))
    checkpoint = tmp_path / "run" / "checkpoints"
    (checkpoint / "step00000002").mkdir(parents=True)
    (checkpoint / "latest").write_text("step00000002")
    for recorded, refused in ((packed, False), (None, False), ("0" * 64, True)):  # none: an older checkpoint
        torch.save({"fingerprint": config.fingerprint(), "tokenizer_sha256": recorded},
                   checkpoint / "step00000002" / "trainer_rank00000.pt")
        if refused:
            with pytest.raises(ResumeMismatch, match=f"trained on ids of tokenizer sha256 000000000000…, this run's "
                                                     f"data .* is packed with {packed[:12]}…"):
                check_resumable(tmp_path / "run", config)
        else:
            check_resumable(tmp_path / "run", config)

    export = save_checkpoint(PanguModel(config.pangu_config()), tmp_path / "export")
    for recorded, refused in ((packed, False), ("0" * 64, True)):
        (export / "domains.json").write_text(json.dumps({"tokenizer_sha256": recorded}))
        fields = {"data": str(tokens), "init_from": str(export), **TINY}
        if refused:
            with pytest.raises(DataMismatch, match="init_from .* was trained on ids of tokenizer sha256 000000000000…"):
                fit_to_data(load_train_config("alpha-tiny", fields))
        else:
            fit_to_data(load_train_config("alpha-tiny", fields))


def _weights_missing(directory: Path, preset: str) -> str:
    """A checkpoint dir with a config.json but no weights: it passes the flow's checks, and the training
    process fails when it loads it."""
    from pangu_model.checkpoint import write_config
    from pangu_model.config import get_config

    directory.mkdir(parents=True)
    write_config(get_config(preset, vocab_size=VOCAB, max_seq_len=64), directory)
    return str(directory)


def test_a_failing_rank_fails_the_flow_with_the_exit_code(prefect_api, tokens, tmp_path):
    from flows.pretrain import pretrain

    broken = _weights_missing(tmp_path / "no-such-checkpoint", "sigma-tiny")
    state = pretrain(preset="sigma-tiny", data=str(tokens), output=str(tmp_path / "bad"), steps=2,
                     overrides={**TINY, "init_from": broken}, return_state=True)
    assert state.is_failed()
    assert "training failed: the training process exited with code 1" in state.message
    assert "FileNotFoundError" in state.message and "no-such-checkpoint" in state.message
    assert not (tmp_path / "bad").exists()  # a fresh run that failed at start used to leave an empty output


def test_two_local_ranks_run_under_torchrun_and_a_failed_rank_fails_the_flow(prefect_api, tokens, tmp_path,
                                                                           monkeypatch):
    """Two CPU ranks (gloo) stand in for two GPUs: torchrun launches them; a rank's error fails the flow."""
    import flows.pretrain
    from flows.pretrain import pretrain

    monkeypatch.setattr(flows.pretrain, "local_devices", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    ok = pretrain(preset="alpha-tiny", data=str(tokens), output=str(tmp_path / "ddp"), steps=2, gpus_per_node=2,
                  overrides=TINY)
    assert ok["launcher"] == "torchrun" and ok["world_size"] == 2 and ok["step"] == 2
    assert Path(ok["model"]).is_file()

    (tmp_path / "ddp-bad").mkdir()  # the user's own directory: a failed run keeps it
    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(tmp_path / "ddp-bad"), steps=2,
                     gpus_per_node=2, overrides={**TINY, "init_from": _weights_missing(tmp_path / "missing", "tiny")},
                     return_state=True)
    assert state.is_failed()
    assert "torchrun (a rank failed) exited with code 1" in state.message, state.message
    assert (tmp_path / "ddp-bad").is_dir()
    # torchrun's log tree per launch (/tmp/torchelastic_*), left behind by every run before --log-dir was given
    assert not list(scratch.glob("torchelastic_*")), sorted(p.name for p in scratch.iterdir())


def test_an_invalid_override_fails_before_launching(prefect_api, tokens, tmp_path):
    from flows.pretrain import pretrain

    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(tmp_path / "invalid"),
                     overrides={"zero_stage": 7}, return_state=True)
    assert state.is_failed() and "invalid TrainConfig: zero_stage: Input should be less than or equal to 3 (got 7)" \
        in state.message, state.message
    assert not (tmp_path / "invalid").exists()


def test_data_without_domains_json_fails_the_flow(prefect_api, tmp_path):
    from flows.pretrain import pretrain

    (tmp_path / "raw" / "v1").mkdir(parents=True)
    (tmp_path / "raw" / "v1" / "part-00000.bin").write_bytes(b"")
    state = pretrain(preset="alpha-tiny", data=str(tmp_path / "raw"), output=str(tmp_path / "out"),
                     return_state=True)
    assert state.is_failed() and "domains.json" in state.message and "not a packed token dir" in state.message


@pytest.mark.parametrize("script, expected", [
    # exit 143 (the trainer after SIGTERM): a failed run whose message tells how to resume
    ("import sys; print('saving checkpoint'); sys.exit(143)",
     ("preempted", "exit code 143", "step00000007", "rerun with the same output")),
    # the kernel's out-of-memory killer prints nothing in the job's output: the run said only "exited with code
    # -9" (alpha-350m on a 24 GB CPU machine, killed 60 s in)
    ("import os, signal; print('step 1'); os.kill(os.getpid(), signal.SIGKILL)",
     ("exited with code -9", "killed by SIGKILL", "out-of-memory killer", "micro_batch_size")),
], ids=["preempted", "sigkill"])
def test_the_failed_run_says_what_the_jobs_exit_means(prefect_api, tmp_path, script, expected):
    from prefect import flow

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000007")
    launch = Launch([sys.executable, "-c", script], "python", 1, 1)

    @flow
    def job():
        return run_training(launch, str(tmp_path), 10)

    state = job(return_state=True)
    assert state.is_failed()
    for text in expected:
        assert text in state.message, text


# ---- no Prefect run needed ------------------------------------------------------------------------
def test_resolve_data_picks_the_newest_version(tmp_path, tokens):
    assert resolve_data(tokens)[0] == tokens.resolve()
    root = tmp_path / "tokens"
    for age, name in ((300, "b-old"), (100, "a-new"), (200, "c-mid")):
        (root / name).mkdir(parents=True)
        (root / name / "domains.json").write_text("{}")
        os.utime(root / name / "domains.json", (time.time() - age, time.time() - age))
    (root / "z-incomplete").mkdir()  # packing in progress: no domains.json yet
    path, note = resolve_data(str(root))
    assert path == (root / "a-new").resolve()
    assert "a-new" in note and "newest of 3 versions" in note
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_data(tmp_path / "missing")


def test_launch_commands(tmp_path, monkeypatch):
    import flows.pretrain

    monkeypatch.setattr(flows.pretrain, "torchrun_takes_shutdown_timeout", lambda: True)  # torch 2.13's torchrun
    common = dict(preset="sigma-tiny", data="/d", output=tmp_path, steps=5, overrides={"optimizer.lr": 3e-4})
    one = build_launch(**common, devices=0)
    assert one.launcher == "python" and one.world_size == 1
    assert one.argv[:3] == [sys.executable, "-m", "pangu_model.train"]
    assert one.argv[3:] == ["--config", "sigma-tiny", "--set", 'data="/d"', "--set", f'output="{tmp_path}"',
                            "--set", "train_steps=5", "--set", "optimizer.lr=0.0003"]

    local = build_launch(**common, gpus_per_node=2, devices=8, grace_s=900.5)
    assert local.launcher == "torchrun" and local.world_size == 2
    # torchrun SIGKILLs its ranks 30 s after passing on a SIGTERM unless told the grace period.
    assert local.argv[1:11] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "--log-dir", os.devnull, "--shutdown-timeout", "901", "-m"]
    assert local.grace_s == 900.5 and local.signal_stop

    # Several nodes need their real host names: invented ones (node-000, …) cannot be reached.
    with pytest.raises(ValueError, match="--nodes 2 needs the hosts.*--hostfile"):
        build_launch(**common, nodes=2, gpus_per_node=8, devices=0)
    assert not (tmp_path / "hostfile").exists()

    given = tmp_path / "given"
    given.write_text("gpu-a slots=4\ngpu-b slots=4\ngpu-c slots=4\n")
    from_file = build_launch(**common, hostfile=str(given), expert_parallel=4, devices=0)
    assert from_file.launcher == "deepspeed" and from_file.world_size == 12 and from_file.nodes == 3
    args = from_file.argv
    assert args[args.index("--hostfile") + 1] == str(tmp_path / "hostfile")
    assert not (tmp_path / "hostfile").exists()  # written when the job starts, after the checks
    from_file.write_files()
    assert (tmp_path / "hostfile").read_text() == given.read_text()
    assert args[args.index("--num_nodes") + 1] == "3" and args[args.index("--master_addr") + 1] == "gpu-a"
    assert args[args.index("--module") + 1] == "pangu_model.train"
    with pytest.raises(ValueError, match="lists 3 hosts"):
        build_launch(**common, nodes=2, hostfile=str(given), devices=0)

    # Without GPUs a layout that needs several ranks (tensor 2 × pipeline 2) gets that many CPU ranks (gloo)
    cpu = build_launch(**common, devices=0, fewest_ranks=4)
    assert cpu.launcher == "torchrun" and cpu.world_size == 4 and cpu.argv[4:6] == ["--nproc_per_node", "4"]
    assert "4 CPU ranks (gloo), the fewest the parallel layout needs" in cpu.note
    assert build_launch(**common, devices=2, fewest_ranks=4).world_size == 2  # GPUs: the ranks they give


def test_a_layout_the_launch_cannot_run_is_refused_before_anything_starts(prefect_api, tokens, tmp_path,
                                                                           monkeypatch):
    """One GPU visible and tensor_parallel 2: the flow says so in one line before launching (the trainer would
    refuse it only once started), and leaves no output directory."""
    import flows.pretrain
    from flows.pretrain import pretrain

    monkeypatch.setattr(flows.pretrain, "local_devices", lambda: 1)
    out = tmp_path / "tp2-on-one-gpu"
    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=2,
                     overrides={**TINY, "tensor_parallel": 2}, return_state=True)
    assert state.is_failed()
    assert "pretrain alpha-tiny: tensor_parallel 2 does not divide the world size 1; this launch: gpus_per_node 8 " \
           "but 1 GPU(s) visible: 1 local rank(s)" in state.message, state.message
    assert not out.exists()


def test_a_multi_node_layout_the_trainer_cannot_run_is_refused_and_leaves_no_hostfile(prefect_api, tokens, tmp_path):
    """2 nodes of 2 ranks (a hostfile) and tensor_parallel 4: a tensor group stays inside a node, so the flow refuses
    it in one line before launching (it was the topology's error over two lines), with no output directory (the
    hostfile was written there before)."""
    from flows.pretrain import pretrain

    given = tmp_path / "hosts"
    given.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    out = tmp_path / "tp4-on-nodes-of-2"
    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=2, hostfile=str(given),
                     overrides={**TINY, "tensor_parallel": 4}, return_state=True)
    assert state.is_failed()
    assert "pretrain alpha-tiny: parallel plan tp=4 pp=1 ep=1 dp=auto does not fit 2 nodes × 2: tensor parallel 4 " \
           "must divide the 2 accelerators of a node" in state.message and "\n" not in state.message, state.message
    assert not out.exists()


def test_result_line_and_loss_sampling(tmp_path):
    lines = ["[INFO] starting", '{"status": "completed", "step": 3, "export": "/x"}', "bye", "{not json}"]
    assert parse_result(lines) == {"status": "completed", "step": 3, "export": "/x"}
    assert parse_result(["no result"]) is None
    rows = [{"step": float(i)} for i in range(1, 1001)]
    sample = sample_rows(rows)
    assert len(sample) == 100 and sample[0]["step"] == 1 and sample[-1]["step"] == 1000
    assert sample_rows(rows[:7]) == rows[:7]

    rows_text = "".join(f"{i},{10 - i / 1000:.4f},300\n" for i in range(1, 2001))
    (tmp_path / "metrics.csv").write_text("step,loss,tokens_per_s\n" + rows_text + "2001,9.")  # row being written
    assert last_metrics_row(tmp_path) == {"step": 2000, "loss": 8.0, "tokens_per_s": 300}
    assert len(read_metrics_csv(tmp_path)) == 2000 and last_metrics_row(tmp_path / "none") is None


def test_the_progress_line_says_how_long_the_run_has_left():
    """A run of days logged its step every 30 s and never how long it had left."""
    progress = ProgressLine(total_steps=10_000)
    row = {"step": 100, "loss": 7.25, "tokens_per_s": 5000.0, "seconds": 0.5}
    # the first line: the last step's own time (9,900 steps × 0.5 s)
    assert progress.line(row, now=1000.0) == "progress: step 100/10000, loss 7.2500, 5000 tokens/s, about 1 h 22 min left"
    # later lines: the pace between lines (400 steps in 100 s: 0.25 s a step, 9,500 left)
    assert progress.line({**row, "step": 500}, now=1100.0).endswith(", about 39 min 35 s left")
    # no step since: the pace of the lines that moved on stays
    assert progress.line({**row, "step": 500, "seconds": 0.4}, now=1130.0).endswith(", about 39 min 35 s left")
    # a slow stretch (a shared machine) moves the estimate by its share of the window, not all the way: 500
    # steps in 160 s over the window, where the last 100 steps alone took 60 s (0.6 s a step)
    assert progress.line({**row, "step": 600}, now=1160.0).endswith(", about 50 min 08 s left")
    assert progress.line({**row, "step": 9_990}, now=1200.0).endswith(", about 0 s left")
    done = progress.line({**row, "step": 10_000}, now=1201.0)
    assert done == "progress: step 10000/10000, loss 7.2500, 5000 tokens/s"
    assert "left" not in ProgressLine(5).line({"step": 1, "loss": 9.0, "tokens_per_s": 1.0, "seconds": math.nan}, 0.0)


def test_sigma_fits_a_corpus_with_more_domains_than_its_preset(prefect_api, tmp_path):
    """The headline failure: 7 data domains, sigma-tiny's preset 4. The model takes one expert group per
    data domain and the tokenizer's vocabulary; an override that cannot work is refused before launch."""
    from pangu_model.checkpoint import load_config

    from flows.pretrain import pretrain

    data = packed_tokens(spread_over=7)
    done = pretrain(preset="sigma-tiny", data=str(data), output=str(tmp_path / "seven"), steps=2,
                    overrides={"seq_len": 64, "progress_bar": False})
    config = load_config(done["export"])
    assert (config.num_domains, config.experts_per_domain, config.vocab_size, config.tokenizer_pieces) == \
        (7, 2, 2048, VOCAB)
    refused = pretrain(preset="sigma-tiny", data=str(data), output=str(tmp_path / "refused"), steps=2,
                       overrides={"model_overrides": {"num_domains": 4}}, return_state=True)
    assert refused.is_failed() and "one expert group per domain" in refused.message
    assert not (tmp_path / "refused").exists()


def test_the_model_line_counts_a_corpus_of_one_domain_in_the_singular():
    """The flow's first log line about the model, on a corpus of one domain (one input file)."""
    from flows.pretrain import describe_model
    from pangu_model.plan import resolve_train_config

    one = describe_model(resolve_train_config("sigma-tiny", ["model_overrides.num_domains=1",
                                                             "model_overrides.experts_per_domain=1"]))
    assert "1 domain × 1 expert = 1 per RRE layer in the top 2 layers" in one, one
    four = describe_model(resolve_train_config("sigma-tiny"))
    assert "4 domains × 2 experts = 8 per RRE layer in the top 2 layers" in four, four


def test_node_local_ranks_come_from_the_launchers_variables():
    """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE and CROSS_SIZE: 2 nodes × 8 ranks
    must not read as one node of 16 (expert groups would then cross nodes)."""
    from pangu_model.train import local_world_size

    assert local_world_size(16, {"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    assert local_world_size(16, {"LOCAL_SIZE": "8", "CROSS_SIZE": "2"}) == 8  # deepspeed launcher
    assert local_world_size(16, {"CROSS_SIZE": "4"}) == 4
    assert local_world_size(16, {}) == 16  # no launcher said otherwise: one node


def _job_process_group(marker: str) -> int | None:
    """The process group of the running training job whose command line holds `marker`."""
    pids = training_processes(marker)
    try:
        return os.getpgid(pids[0]) if pids else None
    except ProcessLookupError:
        return None


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_is_a_preemption_with_a_checkpoint(prefect_api, tokens, tmp_path, monkeypatch):
    """A scheduler's SIGTERM reaches torchrun and both ranks: the ranks finish their step and checkpoint,
    torchrun exits 1, and the run must still read as preempted (it used to read as failed)."""
    import signal
    import threading

    import flows.pretrain
    from flows.pretrain import TrainingPreempted
    from prefect import flow

    monkeypatch.setattr(flows.pretrain, "local_devices", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "preempt"
    launch = build_launch("alpha-tiny", tokens, out, 200, {**TINY, "throttle_s": 0.2, "checkpoint_every": 0},
                          gpus_per_node=2)
    assert launch.launcher == "torchrun"

    def preempt() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if len(read_metrics_csv(out)) >= 3 and (group := _job_process_group(str(out))):
                os.killpg(group, signal.SIGTERM)
                return
            time.sleep(0.2)

    @flow
    def train_then_preempted():
        return run_training(launch, str(out), 200)

    killer = threading.Thread(target=preempt, daemon=True)
    killer.start()
    state = train_then_preempted(return_state=True)
    killer.join(timeout=10)
    assert state.is_failed()
    with pytest.raises(TrainingPreempted, match="rerun with the same output"):
        state.result()
    steps = len(read_metrics_csv(out))
    assert 3 <= steps < 200
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps:08d}"


@pytest.mark.slow
def test_a_torchrun_without_a_shutdown_timeout_is_launched_without_it_and_stopped_through_the_stop_file(
        tokens, tmp_path, monkeypatch):
    """An older torch's torchrun (2.11's) has no --shutdown-timeout: a job launched with it ended at once with
    a usage error, and a SIGTERM to it gives the ranks 30 s. The flow launches without the option and stops
    the job through the stop file alone: both ranks checkpoint at one step and torchrun is never signalled."""
    import logging
    import threading

    import flows.pretrain
    from flows.pretrain import _stop, start_job

    monkeypatch.setattr(flows.pretrain, "local_devices", lambda: 2)
    monkeypatch.setattr(flows.pretrain, "torchrun_takes_shutdown_timeout", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "older-torchrun"
    launch = build_launch("alpha-tiny", tokens, out, 200, {**TINY, "throttle_s": 0.2, "checkpoint_every": 0},
                          gpus_per_node=2)
    assert launch.launcher == "torchrun" and "--shutdown-timeout" not in launch.argv
    assert not launch.signal_stop and "30 s" in launch.note
    proc = start_job(launch.argv, {**os.environ, **launch.env})
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics_csv(out)) < 3:
            assert proc.poll() is None, "the job ended before its third step"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.2)
        _stop(proc, logging.getLogger(__name__), 120, out, launch.signal_stop)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    output = "".join(printed)
    assert (parse_result(output.splitlines()) or {}).get("status") == "preempted", output[-3000:]
    assert "death signal" not in output  # what torchrun logs when a signal reaches it
    steps = len(read_metrics_csv(out))
    assert 3 <= steps < 200
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps:08d}"


def test_a_job_does_not_outlive_a_killed_flow_process(tmp_path):
    """A flow-run process killed outright (UI cancellation, OOM) never runs its `finally`: the training job,
    in a session of its own, used to keep running. Now it gets SIGTERM (and checkpoints) when that dies."""
    import signal
    import subprocess

    done = tmp_path / "job-stopped"
    job = (f"import pathlib, signal, sys, time; "
           f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(done)!r}).write_text('SIGTERM'), sys.exit(143))); "
           f"print('ready', flush=True); time.sleep(120)")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; from flows.pretrain import start_job; "
         f"job = start_job([sys.executable, '-c', {job!r}], dict(os.environ)); "
         "print(job.pid, job.stdout.readline().strip(), flush=True); import time; time.sleep(120)"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        pid, ready = parent.stdout.readline().split()
        assert ready == "ready"
        parent.kill()  # SIGKILL: no handler, no finally
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        # the handler's write_text creates the file, then writes: wait for the words, not for the file
        while not (done.exists() and done.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.read_text() == "SIGTERM"
    finally:
        parent.kill()
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError, ValueError):
            pass


@pytest.mark.slow
def test_a_preempted_pretrain_run_ends_preempted_not_failed(prefect_api, tokens, tmp_path):
    import signal
    import threading

    from flows.pretrain import pretrain

    out = tmp_path / "preempted-flow"

    def preempt() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if len(read_metrics_csv(out)) >= 3 and (group := _job_process_group(str(out))):
                os.killpg(group, signal.SIGTERM)  # as a scheduler preempts the job
                return
            time.sleep(0.2)

    killer = threading.Thread(target=preempt, daemon=True)
    killer.start()
    state = pretrain(preset="alpha-tiny", data=str(tokens), output=str(out), steps=200,
                     overrides={**TINY, "throttle_s": 0.2, "checkpoint_every": 0}, return_state=True)
    killer.join(timeout=10)
    assert state.is_cancelled() and not state.is_failed() and state.name == "Preempted", state
    assert "rerun with the same output" in state.message
    steps = len(read_metrics_csv(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps:08d}"



def test_the_default_stop_grace_covers_a_checkpoint_of_the_preset():
    """torchrun used to SIGKILL ranks 30 s after a SIGTERM, whatever the model; the grace now comes from
    the planner: a tiny preset keeps the floor, sigma-1t on 64 nodes gets twice its step and checkpoint
    time (each of a node's 8 ranks writes its owned block of expert states)."""
    from pangu_model.plan import plan_for
    from flows.pretrain import STOP_GRACE_S, default_stop_grace
    from pangu_model.train import load_train_config

    tiny = load_train_config("alpha-tiny")
    assert default_stop_grace(tiny, 1, 1) == STOP_GRACE_S
    big = load_train_config("sigma-1t")
    plan = plan_for(big, nodes=64, gpus_per_node=8)
    grace = default_stop_grace(big, 64, 8)
    assert grace == pytest.approx(2 * (plan.step_time_s + plan.checkpoint_s))
    assert grace > STOP_GRACE_S and plan.checkpoint_s > 60
    assert plan.checkpoint_bytes_per_node >= 8 * 12 * plan.parameters["experts_on_host_per_gpu"]
