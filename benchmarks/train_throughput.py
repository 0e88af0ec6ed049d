"""Training throughput: tokens/s (and MFU on GPU) of the real training program, per configuration.

    python benchmarks/train_throughput.py                    # CPU: tiny dense vs sigma-tiny, ECSS off / on
    python benchmarks/train_throughput.py --device cuda      # 350m dense; 350m-shaped RRE at growing expert
                                                             # counts, ECSS vs all experts on the device
    python benchmarks/train_throughput.py --ranks 2          # CPU, 2 gloo ranks under torchrun: experts
                                                             # replicated, DeepSpeed MoE ep 2, ECSS ep 1 / 2

Each configuration runs `pangu_model.train.Trainer` in this process (world size 1; with `--ranks N`, the
training program under torchrun) for `--steps` optimizer steps on a packed token directory (`--data`, or a
synthetic one of random valid ids made here) and reports the median tokens/s of the steps after
`--warmup`, and with `--ranks` the host bytes of one ECSS expert shard file (masters + Adam states).
Prints a markdown table; `--json FILE` saves the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pangu_model.train import Trainer, TrainConfig  # noqa: E402
from tokenizer.indexed import IndexedWriter  # noqa: E402


def synthetic_tokens(directory: Path, vocab: int, domains: int, documents: int = 400, seed: int = 0) -> Path:
    """A packed token dir in tokenizer/pack.py's layout, with random ids (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(50, 2000, size=documents)
    doc_domains = (np.arange(documents) % domains).astype(np.uint16)
    ids = rng.integers(10, vocab, size=int(lengths.sum())).astype(np.uint16)
    ends = np.cumsum(lengths)
    ids[ends - 1] = 9  # every document ends in <eot>
    with IndexedWriter(directory / "part-00000", np.uint16) as writer:
        writer.add_documents(ids, lengths)
    np.save(directory / "part-00000.domains.npy", doc_domains)
    names = {str(i): f"domain{i}" for i in range(domains)}
    (directory / "domains.json").write_text(json.dumps({
        "id_to_name": names, "shards": ["part-00000"],
        # random ids, no tokenizer file: the piece count is what the model's vocabulary follows
        "tokenizer": {"path": None, "sha256": None, "pieces": vocab},
        "domains": {f"domain{i}": {"id": i, "tokens": int(lengths[doc_domains == i].sum())} for i in range(domains)},
    }))
    return directory


def measure(name: str, fields: dict[str, Any], steps: int, warmup: int, workdir: Path) -> dict[str, Any]:
    config = TrainConfig.model_validate({
        "output": str(workdir / name), "train_steps": steps, "checkpoint_every": 0, "export": False,
        "resume": False, "progress_bar": False, **fields,
    })
    trainer = Trainer(config)
    try:
        start = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - start
        history = trainer_history(config)
    finally:
        trainer.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    timed = history[warmup:] or history
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = statistics.median(r["mfu"] for r in timed)
    row = {"config": name, "tokens_per_s": round(tps, 1), "mfu": None if np.isnan(mfu) else round(mfu, 4),
           "steps": steps, "wall_s": round(wall, 2)}
    if torch.cuda.is_available():
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)
    return row


def measure_torchrun(name: str, fields: dict[str, Any], steps: int, warmup: int, workdir: Path,
                     ranks: int) -> dict[str, Any]:
    """The training program under torchrun with `ranks` CPU processes; figures from its metrics CSV."""
    import yaml

    output = workdir / name
    config = TrainConfig.model_validate({
        "output": str(output), "train_steps": steps, "checkpoint_every": 0, "export": False,
        "resume": False, "progress_bar": False, **fields,
    })
    output.mkdir(parents=True)
    path = output / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
         "-m", "pangu_model.train", "--config", str(path)],
        cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    timed = trainer_history(config)[warmup:]
    shards = sorted((output / "checkpoints").glob("step*/ecss_experts_ep*.pt"))
    row = {"config": name, "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
           "mfu": None, "steps": steps, "wall_s": round(wall, 2),
           "ecss_shard_mib": round(shards[0].stat().st_size / 2**20, 2) if shards else None}
    print(json.dumps(row), flush=True)
    return row


def trainer_history(config: TrainConfig) -> list[dict[str, float]]:
    from pangu_model.metrics import read_metrics

    return read_metrics(config.output)


def cpu_suite(data: Path, steps: int) -> list[tuple[str, dict[str, Any]]]:
    common = {"data": str(data), "micro_batch_size": 4, "seq_len": 128,
              "optimizer": {"lr": 1e-3, "warmup_steps": 2}, "zero_stage": 1}
    small = {"vocab_size": 8000}
    return [
        ("tiny dense", {**common, "model": "tiny", "model_overrides": small}),
        ("sigma-tiny, experts on device", {**common, "model": "sigma-tiny", "model_overrides": small}),
        ("sigma-tiny, ECSS", {**common, "model": "sigma-tiny", "model_overrides": small, "ecss": True}),
    ]


def multi_rank_suite(data: Path, ranks: int) -> list[tuple[str, dict[str, Any]]]:
    common = {"data": str(data), "micro_batch_size": 4, "seq_len": 128, "model": "sigma-tiny",
              "model_overrides": {"vocab_size": 8000, "experts_per_domain": 8},  # 4 domains × 8 = 32 experts
              "optimizer": {"lr": 1e-3, "warmup_steps": 2}, "zero_stage": 1}
    return [
        (f"sigma-tiny × 32 experts, {ranks} ranks, experts replicated", {**common}),
        (f"sigma-tiny × 32 experts, {ranks} ranks, DeepSpeed MoE ep {ranks}", {**common, "expert_parallel": ranks}),
        (f"sigma-tiny × 32 experts, {ranks} ranks, ECSS ep 1", {**common, "ecss": True}),
        (f"sigma-tiny × 32 experts, {ranks} ranks, ECSS ep {ranks}", {**common, "ecss": True, "expert_parallel": ranks}),
    ]


def cuda_suite(data: Path, steps: int, expert_counts: list[int]) -> list[tuple[str, dict[str, Any]]]:
    common = {"data": str(data), "micro_batch_size": 8, "seq_len": 1024, "precision": "bf16", "zero_stage": 1,
              "optimizer": {"lr": 2e-4, "warmup_steps": 2}}
    out = [("350m dense", {**common, "model": "350m"})]
    for experts in expert_counts:
        shape = {"router": "rre", "moe_layers": 4, "num_domains": 4, "experts_per_domain": experts // 4}
        for ecss in (False, True):
            label = f"350m + RRE top 4 layers × {experts} experts, {'ECSS' if ecss else 'on device'}"
            out.append((label, {**common, "model": "350m", "model_overrides": shape, "ecss": ecss}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", type=Path, help="packed token dir; default: synthetic random ids")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, nargs="*", default=[16, 64, 256], help="experts per layer (cuda)")
    parser.add_argument("--ranks", type=int, default=1, help="CPU processes under torchrun (multi-rank suite)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("CUDA is visible: the CPU suite needs CUDA_VISIBLE_DEVICES= (the trainer uses CUDA when present)")
    workdir = Path(tempfile.mkdtemp(prefix="pangu-train-bench-"))
    vocab = 8000 if args.device == "cpu" else 40000
    data = args.data or synthetic_tokens(workdir / "tokens", vocab=vocab, domains=4)
    if args.ranks > 1:
        if args.device != "cpu":
            parser.error("--ranks is the CPU multi-process suite")
        rows = [measure_torchrun(f"run{i}", fields, args.steps, args.warmup, workdir, args.ranks) | {"config": label}
                for i, (label, fields) in enumerate(multi_rank_suite(data, args.ranks))]
    else:
        suite = cpu_suite(data, args.steps) if args.device == "cpu" else cuda_suite(data, args.steps, args.experts)
        rows = [measure(f"run{i}", fields, args.steps, args.warmup, workdir) | {"config": label}
                for i, (label, fields) in enumerate(suite)]
    print(f"\n{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps (median after {args.warmup})\n")
    print("| configuration | tokens/s | MFU | ECSS shard file |")
    print("|---|---:|---:|---:|")
    for row in rows:
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f} %"
        shard = "-" if row.get("ecss_shard_mib") is None else f"{row['ecss_shard_mib']:.1f} MiB"
        print(f"| {row['config']} | {row['tokens_per_s']:,.0f} | {mfu} | {shard} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
