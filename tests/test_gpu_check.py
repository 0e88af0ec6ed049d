"""benchmarks/gpu_check.py stays runnable: its CPU smoke mode writes a report with every part, the CUDA parts
skipped with a reason, and the CPU-safe parts (environment, alpha-tiny training, sigma-tiny ECSS vs experts on
the device, alpha-tiny at tensor_parallel 2 on 2 gloo ranks against 1) ran with plausible figures. One run of the
real command (five training processes), ~50-80 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["environment", "cuda_tests", "dense_350m", "ecss_vs_device", "h2d_bandwidth", "tensor_parallel_2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.pop("OUT", None)
    done = subprocess.run(
        # ~35 s once DeepSpeed's CPU ops are built; generous limits for a fresh .venv that JIT-builds them here
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--output", str(out / "gpu_check.json"),
         "--budget", "700", "--caps", "dense_350m=300,ecss_vs_device=500", "--cpu-adam-build-s", "400",
         "--dense-run-s", "280", "--ecss-run-s", "240"],
        cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=900,
    )
    path = out / "gpu_check.json"
    assert path.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(path.read_text(encoding="utf-8")), done, out


def test_report_has_every_part_with_status_and_seconds(smoke) -> None:
    report, done, _ = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["mode"] == "cpu-smoke" and report["finished"]
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok" or part["status"].startswith("skipped: "), (name, part["status"])
        assert isinstance(part.get("seconds"), (int, float)), name
    assert set(report["summary"]["statuses"]) == set(PARTS)
    # DeepSpeed's accelerator is chosen as the training program chooses it, not probed with a warning
    assert "unable to detect it" not in done.stdout + done.stderr


def test_cuda_parts_are_skipped_with_a_reason(smoke) -> None:
    parts = smoke[0]["parts"]
    for name in ("cuda_tests", "h2d_bandwidth"):
        assert parts[name]["status"] == "skipped: no CUDA"
    # what would run on a GPU is named: the files that carry the `cuda` marker
    assert "tests/test_model_gpu_paths.py" in parts["cuda_tests"]["files"]
    assert "-m cuda" in parts["cuda_tests"]["command"]


def test_cpu_parts_ran_with_plausible_figures(smoke) -> None:
    parts = smoke[0]["parts"]
    env = parts["environment"]
    assert env["torch"] and env["deepspeed"] and env["cuda_available"] is False and env["cpu_count"] >= 1

    dense = parts["dense_350m"]
    run = dense["runs"]["auto"]
    assert dense["preset"] == "alpha-tiny" and "cpu-smoke" in dense["substitute"]
    assert run["status"] == "ok" and run["steps"] == 2 and run["tokens_per_s"] > 0
    assert run["tokens_per_step"] == 2 * 128  # micro batch 2 × seq 128, no padding in synthetic rows
    assert run["mfu"] is None and dense["meets_target"] is None  # no peak FLOP/s for a CPU
    assert run["planned"]["gpu"] == "h200" and run["planned"]["step_time_s"] is not None
    assert dense["predicted_vs_measured"]["mfu"]["planned"] == run["planned"]["mfu"]
    assert "variants_skipped" in dense

    ecss = parts["ecss_vs_device"]
    assert ecss["cpu_adam_build"]["status"] == "ok"
    (row,) = ecss["rows"]
    assert row["experts_per_domain"] == 2 and row["experts_per_layer"] == 8
    for mode in ("device", "ecss"):
        assert row[mode]["status"] == "ok", row[mode]
        assert row[mode]["tokens_per_s"] > 0
    # ECSS holds its experts' fp32 masters and Adam moments on the host (not pinned without CUDA)
    assert row["ecss"]["host_bytes"] > 0 and row["ecss"]["pinned_host_bytes"] == 0
    assert "host_bytes" not in row["device"]

    # tensor_parallel 2 on 2 ranks (torchrun; on a GPU machine, 2 GPUs under NCCL) against 1: the same losses
    tp = parts["tensor_parallel_2"]
    assert tp["status"] == "ok" and tp["preset"] == "alpha-tiny" and "gloo" in tp["substitute"]
    one, two = tp["runs"]["tp1"], tp["runs"]["tp2"]
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert one["losses"] != [one["losses"][0]] * 3  # training moved the loss
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5)
    assert tp["loss_max_rel_diff"] <= 1e-5
    assert two["ranks"] == [{"rank": 1, "status": "ok", "max_memory_allocated_gib": None,
                             "max_memory_reserved_gib": None, "host_max_rss_gib": two["ranks"][0]["host_max_rss_gib"]}]
    assert one["planned"]["gpu_bytes_per_gpu"] > 0 and two["planned"]["gpu_bytes_per_gpu"] > 0
    assert 0 < tp["speed_tp2_vs_tp1"]


def test_tensor_parallel_2_is_skipped_on_one_gpu_and_reserves_no_time(tmp_path: Path, monkeypatch) -> None:
    """The lent machines have one GPU: the part says why it did not run, and the parts before it keep the time
    it would have reserved."""
    import torch

    from benchmarks.gpu_check import Context, Report, build_parser, tensor_parallel_2

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = build_parser().parse_args([])
    ctx = Context(args, True, tmp_path, tmp_path, Report(tmp_path / "r.json", {}), deadline=1e12)
    assert tensor_parallel_2(ctx) == {"status": "skipped: needs 2 GPUs (1 visible)"}
    assert not ctx.runs("tensor_parallel_2") and ctx.runs("ecss_vs_device")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ctx.runs("tensor_parallel_2")


def test_summary_prints_every_part(smoke) -> None:
    _, done, out = smoke
    text = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--summary", str(out / "gpu_check.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    for name in PARTS:
        assert name in text
    assert "skipped: no CUDA" in text and "tok/s" in text


def test_setup_failure_writes_a_report_without_torch(tmp_path: Path) -> None:
    """The wrapper's failure path runs before the environment is usable: only the standard library."""
    path = tmp_path / "gpu_check.json"
    code = ("import sys; sys.modules['torch'] = None; from benchmarks.gpu_check import main; "
            f"sys.exit(main(['--setup-failed', 'no network', '--output', {str(path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["setup"]["status"] == "failed: no network"
    assert all(p["status"] == "skipped: environment setup failed" for p in report["parts"].values())
