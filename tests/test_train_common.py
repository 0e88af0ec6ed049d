"""Shared material of the training tests: a packed token directory made from real Chinese text.

FewCLUE lines (read from ../shared/data/clue, never copied) of four tasks become four domains, a small
BPE tokenizer is trained on them with tokenizer/train.py and the corpus is packed with tokenizer/pack.py,
once per test session. Runs go through the real CLI (`python -m pangu_model.train`) in subprocesses
where a test needs to kill or signal them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tests import scratch
from tests.realtext import CLUE

ROOT = Path(__file__).resolve().parents[1]
# FewCLUE task → (text field, domain). Domain ids are assigned in name order by the packer:
# ebooks 0, news 1, public_datasets 2, web 3 — the four domains of the sigma-tiny preset.
TASKS = {"chid": ("content", "ebooks"), "tnews": ("sentence", "news"),
         "csl": ("abst", "public_datasets"), "iflytek": ("sentence", "web")}
VOCAB = 2000
def session_dir() -> Path:
    return scratch.session_dir("train")


def _documents(per_task: int) -> list[tuple[str, str]]:
    docs = []
    for task, (field, domain) in TASKS.items():
        with open(CLUE / "fewclue" / task / "test_public.json", encoding="utf-8") as fh:
            lines = [json.loads(raw)[field] for raw in fh if raw.strip()]
        lines = list(dict.fromkeys(t for t in lines if t.strip()))[: per_task * 3]
        docs += [(domain, "\n".join(lines[i:i + 3])) for i in range(0, len(lines), 3)]
    return docs


@lru_cache(maxsize=None)
def packed_tokens(domains: tuple[str, ...] | None = None, spread_over: int | None = None) -> Path:
    """Packed token dir of real text; `domains` keeps only those (their ids then start at 0);
    `spread_over` N deals the documents round-robin into N domains `area0`… instead (a corpus with
    another number of domains than any preset)."""
    from tokenizer.config import PackConfig, TokenizerTrainConfig
    from tokenizer.pack import pack_corpus
    from tokenizer.train import train_tokenizer

    key = ("all" if domains is None else "-".join(domains)) + (f"-over{spread_over}" if spread_over else "")
    docs = [(d, t) for d, t in _documents(per_task=60) if domains is None or d in domains]
    if spread_over:
        docs = [(f"area{i % spread_over}", t) for i, (_, t) in enumerate(docs)]
    corpus = session_dir() / f"corpus-{key}" / "data"
    corpus.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"doc-{i}" for i in range(len(docs))],
        "text": [t for _, t in docs],
        "domain": [d for d, _ in docs],
        "source": ["fewclue"] * len(docs),
        "quality": [1.0] * len(docs),
        "meta": ["{}"] * len(docs),
    }), corpus / "part-00000.parquet")
    tokenizer_dir = session_dir() / "tokenizer"
    if not tokenizer_dir.exists():
        train_tokenizer(
            TokenizerTrainConfig(output=str(tokenizer_dir), model_type="bpe", vocab_size=VOCAB,
                                 input_sentence_size=5000, character_coverage=0.98, seed=3),
            texts=[t for _, t in _documents(per_task=60)],
        )
    out = session_dir() / f"tokens-{key}"
    pack_corpus(PackConfig(input=str(corpus.parent), output=str(out), tokenizer=str(tokenizer_dir)))
    return out


def run_config(name: str, preset: str = "alpha-tiny", **fields: Any) -> Path:
    """Write a run's YAML (preset + test fields) into a fresh run dir; return the YAML path."""
    data = yaml.safe_load((ROOT / "deploy" / "presets" / "pretrain" / f"{preset}.yaml").read_text())
    run = session_dir() / "runs" / name
    run.mkdir(parents=True, exist_ok=False)
    defaults = {"data": str(packed_tokens()), "output": str(run), "progress_bar": False,
                "model_overrides": {"vocab_size": VOCAB, "max_seq_len": 64}, "seq_len": 64}
    for key, value in {**defaults, **fields}.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = run / "train.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set by an in-process Trainer on a CPU machine: a process a test starts chooses DeepSpeed's accelerator itself.
ACCELERATOR_VARIABLES = ("DS_ACCELERATOR",)


def rank_env() -> dict[str, str]:
    """The environment of a training process a test starts: this one's, without the launcher variables an
    in-process Trainer leaves in it (its port may still be bound) or its choice of DeepSpeed accelerator, one
    OpenMP thread, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES + ACCELERATOR_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(config: Path, *args: str, **popen: Any) -> subprocess.Popen:
    """`python -m pangu_model.train --config CONFIG` in its own process group."""
    env = rank_env()
    return subprocess.Popen(
        [sys.executable, "-m", "pangu_model.train", "--config", str(config), *args],
        cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def run_cli(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = cli(config, *args)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def torchrun(config: Path, module: str = "pangu_model.train", ranks: int = 2, **popen: Any) -> subprocess.Popen:
    """`torchrun --nproc_per_node RANKS -m MODULE --config CONFIG` on this machine (gloo, a free port),
    in its own process group, with the launcher variables of the calling process removed."""
    from pangu_model.train import _free_port

    env = rank_env()
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
         str(_free_port()), "-m", module, "--config", str(config)],
        cwd=ROOT, env=env, text=True, start_new_session=True, **popen)


def run_torchrun(config: Path, module: str = "pangu_model.train", ranks: int = 2,
                 timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun` to the end: its exit code and output."""
    proc = torchrun(config, module, ranks)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def logged_rows(run: Path) -> list[dict[str, float]]:
    """The run's metrics.csv rows so far (none before the file exists or while its header is written)."""
    from pangu_model.metrics import read_metrics

    try:
        return read_metrics(run)
    except (FileNotFoundError, ValueError):
        return []


def torchrun_killed_when(config: Path, ready: Any, module: str = "pangu_model.train", ranks: int = 2,
                         timeout: float = 240) -> None:
    """Start `torchrun` of the run and SIGKILL its whole process group once `ready()` holds (what a
    preempted node does); fails when the run ends first or `timeout` passes."""
    import signal
    import time

    proc = torchrun(config, module, ranks, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended early ({proc.returncode})"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        # torchrun starts each rank in a session of its own: killing the launcher's group leaves the ranks
        # training (and checkpointing) on. Kill the ranks' groups with it, as a lost node loses them all.
        groups = [proc.pid, *_descendants(proc.pid)]
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # not a group leader, or gone already (its group went with another)
        proc.wait()
        assert not _live([pid for pid in groups if pid != proc.pid]), "a rank survived the kill"


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc/PID/stat; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    """Pids of the processes below `pid` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(entry.name)) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _live(pids: list[int], wait_s: float = 5.0) -> list[int]:
    """The pids among `pids` still running (not zombies) after up to `wait_s` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid in pids if (stat := _proc_stat(pid)) is not None and stat[0] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_9_after_a_checkpoint(config: Path, ranks: int = 2, timeout: float = 120) -> tuple[str, list[dict[str, float]]]:
    """Run the ranks and SIGKILL all of them once a checkpoint exists and a later step is logged; return the
    checkpoint tag and the rows logged before the kill."""
    run = config.parent
    checkpointed_and_on = lambda: (run / "checkpoints" / "latest").is_file() and len(logged_rows(run)) >= 3  # noqa: E731
    torchrun_killed_when(config, checkpointed_and_on, ranks=ranks, timeout=timeout)
    return (run / "checkpoints" / "latest").read_text(), logged_rows(run)


def training_processes(marker: str) -> list[int]:
    """Pids of the live (not zombie) training processes whose command line holds `marker` (a run's
    output directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        stat = _proc_stat(proc.name)
        if marker in cmdline and "pangu_model.train" in cmdline and stat is not None and stat[0] != "Z":
            found.append(int(proc.name))
    return found



def assert_close_but_for_noise_steps(got: dict[str, Any], expected: dict[str, Any], steps: int, lr: float) -> None:
    """`got` holds `expected`'s weights to fp32 noise: sums in another order (a tensor-parallel or pipelined run
    against one rank), which Adam's normalisation lifts to ~1e-5 where gradients are small (6 steps at lr 3e-3
    move weights of scale 0.1 by up to 1e-5). But for a few elements whose gradient is about Adam's ε or below,
    or whose gradient changed sign from step to step (Adam's first moment near zero): their step, of up to lr
    whatever the gradient's size, follows that noise, so they may differ by up to lr a step. At most one element
    of a tensor, or 1 in 10,000 of a larger one, may be such: a wrong slice or a missed reduction moves far more.
    Measured: sigma-tiny after 4 steps at lr 3e-3, 1 of 131,072 expert weights off by 9.2e-4 (expert ε 1e-20);
    on one machine's CPU (not on another: other kernels, other rounding) alpha-tiny with tensor_parallel 2 after
    6 steps, 1 of 16,384 weights of a block's fc_out off by 4.2e-5, and sigma-tiny 1 of 8,192 position
    embeddings off by 4.8e-5."""
    import torch

    assert set(got) == set(expected)
    for name, tensor in expected.items():
        off = ~torch.isclose(got[name], tensor, rtol=1e-5, atol=3e-5)
        assert int(off.sum()) <= max(1, tensor.numel() // 10_000), \
            (name, int(off.sum()), float((got[name] - tensor).abs().max()))
        assert float((got[name] - tensor).abs().max()) <= steps * lr, name


def assert_export_joins_the_slices(export: Any, parts: list[dict[str, Any]], dims: dict[str, int],
                                   expected: Any, steps: int = 6, lr: float = 3e-3) -> None:
    """A tensor-parallel run's export (a state dict) is exactly its ranks' checkpointed `parts` joined along
    each split tensor's dimension (`dims`), the replicated tensors equal on every rank; and it holds the
    `expected` weights of the one-rank run, trained `steps` steps at `lr`, to fp32 noise
    (`assert_close_but_for_noise_steps`)."""
    import torch

    assert all(set(part) == set(export) for part in parts), [sorted(set(p) ^ set(export))[:4] for p in parts]
    for name, tensor in export.items():
        if name in dims:
            assert torch.equal(torch.cat([p[name] for p in parts], dims[name]), tensor), name
        else:
            assert all(torch.equal(p[name], tensor) for p in parts), name
    assert_close_but_for_noise_steps(export, expected, steps, lr)
