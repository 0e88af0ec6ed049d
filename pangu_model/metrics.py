"""Training metrics: per-step CSV, loss per domain, expert-load histograms, MFU, a progress bar.

Files (rank 0 writes, under the run's output directory):

    metrics.csv       step, loss, lm_loss, aux_loss, lr, grad_norm, tokens, tokens_per_s, mfu, seconds
    validation.csv    step, domain_id, domain, tokens, loss, ppl     (held-out rows; domain_id -1: all domains)
    domain_loss.csv   step, domain_id, domain, tokens, loss          (mean lm loss of that domain's tokens)
    expert_load.csv   step, layer, expert, tokens                   (summed since the previous log row)
    tensorboard/      the same scalars when TensorBoard is asked for and installed

On resume the CSVs are cut back to the resumed step, so a killed-and-resumed run leaves the same rows as
an uninterrupted one. Losses per domain and expert loads are summed over all data-parallel ranks.

Every collective here runs on the trainer's compute device: NCCL groups accept CUDA tensors only, so a
host tensor in an all-reduce fails the first step of any multi-GPU run. Values come back to the host
once per logged step, after the reduction.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from cleaning.writers import write_bytes_atomic

VALIDATION_FILE = "validation.csv"
VALIDATION_FIELDS = ["step", "domain_id", "domain", "tokens", "loss", "ppl"]
OVERALL_DOMAIN_ID, OVERALL_DOMAIN = -1, "all"
STEP_FIELDS = ["step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "seconds"]
IGNORE_INDEX = -100

# Dense peak throughput per device in FLOP/s for MFU, by compute dtype (vendor datasheets, no sparsity).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12},  # fp32 matmuls run as TF32
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


def peak_flops(precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of this process's CUDA device, or None (CPU, unknown GPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(precision, table["bf16"])
    return None


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B style: 6·N_active + 12·L·d·T (attention scores).

    N_active counts the weights a token runs through: attention and FFN/one routed expert per layer
    (RRE and top-1 routers), the tied output head (a d×V matmul); embedding lookups are free.
    """
    d, layers = config.d_model, config.num_layers
    attention = 4 * d * d
    dense_ffn = 2 * d * config.d_ff
    expert_ffn = 2 * d * config.expert_width * max(1, config.experts_active_per_token)
    sparse = config.moe_layers if config.router != "dense" else 0
    active = layers * attention + (layers - sparse) * dense_ffn + sparse * expert_ffn + d * config.vocab_size
    return 6.0 * active + 12.0 * layers * d * seq_len


@torch.no_grad()
def domain_loss_sums(token_loss: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int,
                     pad_id: int) -> torch.Tensor:
    """[num_domains, 2]: summed token loss and token count per domain (pad and -100 excluded), from the
    model's loss of each label (`ModelOutput.token_loss`, `model.label_losses`): no second pass over the
    logits, and no device→host sync (every label is added, one that does not count with count 0)."""
    counted = (labels != pad_id) & (labels != IGNORE_INDEX)
    out = torch.zeros(num_domains, 2, dtype=torch.float64, device=labels.device)
    domains = domain_ids.reshape(-1)
    out[:, 0].index_add_(0, domains, token_loss.reshape(-1).double() * counted.reshape(-1))
    out[:, 1].index_add_(0, domains, counted.reshape(-1).double())
    return out


class _Progress:
    """tqdm on a terminal, nothing otherwise (logs and CI output stay clean)."""

    def __init__(self, total: int, initial: int, enabled: bool | None) -> None:
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, postfix: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop rows after `last_step` (left by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    text = io.StringIO(newline="")
    csv.writer(text).writerows(kept)
    write_bytes_atomic(path, text.getvalue().encode("utf-8"))


class MetricsLogger:
    """Collects per-step values on every rank; reduces and writes them on rank 0."""

    def __init__(
        self,
        output: str | os.PathLike[str],
        total_steps: int,
        start_step: int,
        domain_names: Mapping[int, str],
        num_domains: int,
        sparse_layers: list[str],
        num_experts: int,
        rank: int = 0,
        log_every: int = 1,
        progress: bool | None = None,
        tensorboard: bool = False,
        flops_per_token: float = 0.0,
        peak_flops: float | None = None,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.output = Path(output)
        self.device = torch.device(device)
        self.rank = rank
        self.log_every = max(1, log_every)
        self.domain_names = dict(domain_names)
        self.num_domains = num_domains
        self.sparse_layers = sparse_layers
        self.num_experts = num_experts
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.domain_sums: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []
        self.writer = None
        self.progress = _Progress(total_steps, start_step, progress if rank == 0 else False)
        if rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            self.files = {
                "metrics": (self.output / "metrics.csv", STEP_FIELDS),
                "domain": (self.output / "domain_loss.csv", ["step", "domain_id", "domain", "tokens", "loss"]),
                "experts": (self.output / "expert_load.csv", ["step", "layer", "expert", "tokens"]),
                "validation": (self.output / VALIDATION_FILE, VALIDATION_FIELDS),
            }
            for path, header in self.files.values():
                _truncate_csv(path, start_step)
                if not path.exists():
                    with open(path, "w", newline="", encoding="utf-8") as fh:
                        csv.writer(fh).writerow(header)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=start_step + 1)
                except ImportError:
                    print("tensorboard is not installed: CSV logs only", file=sys.stderr)

    # ---- accumulation (every rank, every micro-batch) -------------------------------------------
    def add_domain_losses(self, sums: torch.Tensor) -> None:
        sums = sums.to(self.device)
        self.domain_sums = sums if self.domain_sums is None else self.domain_sums + sums

    def add_expert_load(self, load: torch.Tensor) -> None:
        """[sparse layers, experts] token counts of one micro-batch (left on its device: no sync)."""
        load = load.to(self.device, torch.float64)
        self.expert_load = load if self.expert_load is None else self.expert_load + load

    # ---- one optimizer step ---------------------------------------------------------------------
    def step(self, step: int, values: dict[str, float], tokens: int, seconds: float) -> dict[str, float]:
        """Record step `step` (1-based, after its update). Collective: every rank must call it."""
        reduced = self._reduce(values, tokens)
        tokens_all = reduced.pop("_tokens")
        row = {
            "step": step,
            **reduced,
            "tokens": tokens_all,
            "tokens_per_s": tokens_all / seconds if seconds > 0 else float("nan"),
            "seconds": seconds,
        }
        achieved = row["tokens_per_s"] * self.flops_per_token
        row["mfu"] = achieved / (self.peak_flops * self.world_size) if self.peak_flops else float("nan")
        self.history.append(row)
        should_log = step % self.log_every == 0
        domain_rows, expert_rows = (self._drain() if should_log else ([], []))
        if self.rank == 0:
            self._write("metrics", [[row[k] for k in STEP_FIELDS]])
            if should_log:
                self._write("domain", [[step, *r] for r in domain_rows])
                self._write("experts", [[step, *r] for r in expert_rows])
            if self.writer is not None:
                for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    if not math.isnan(row[key]):
                        self.writer.add_scalar(f"train/{key}", row[key], step)
                for domain_id, name, _, loss in domain_rows:
                    self.writer.add_scalar(f"domain_loss/{name}", loss, step)
            postfix = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if not math.isnan(row["mfu"]):
                postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
            self.progress.update(postfix)
        return row

    def validation(self, step: int, sums: torch.Tensor) -> dict[str, float]:
        """Record the validation loss of step `step` from [domains, 2] sums (already reduced over ranks):
        one row per domain and one for all domains; returns {domain: loss}."""
        rows = [[d, self.domain_names.get(d, str(d)), sums[d, 0].item(), sums[d, 1].item()]
                for d in range(sums.shape[0]) if sums[d, 1] > 0]
        rows.append([OVERALL_DOMAIN_ID, OVERALL_DOMAIN, sums[:, 0].sum().item(), sums[:, 1].sum().item()])
        table = [[step, d, name, int(count), total / count, math.exp(min(total / count, 50.0))]
                 for d, name, total, count in rows if count > 0]
        if self.rank == 0:
            self._write("validation", table)
            if self.writer is not None:
                for _, _, name, _, loss, _ in table:
                    self.writer.add_scalar(f"validation_loss/{name}", loss, step)
        return {name: loss for _, _, name, _, loss, _ in table}

    def _reduce(self, values: dict[str, float], tokens: int) -> dict[str, float]:
        keys = sorted(values)
        vector = torch.tensor([values[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vector)
            vector[:-1] /= dist.get_world_size()  # mean of the scalars, sum of the tokens
        vector = vector.cpu()
        out = dict(zip(keys, vector[:-1].tolist()))
        out["_tokens"] = int(vector[-1])
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm"):
            out.setdefault(key, float("nan"))
        return out

    def _drain(self) -> tuple[list[list[Any]], list[list[Any]]]:
        domain_rows: list[list[Any]] = []
        expert_rows: list[list[Any]] = []
        sums, load = self.domain_sums, self.expert_load
        self.domain_sums = self.expert_load = None
        if sums is None:
            sums = torch.zeros(self.num_domains, 2, dtype=torch.float64, device=self.device)
        if load is None and self.sparse_layers:
            load = torch.zeros(len(self.sparse_layers), self.num_experts, dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            if load is not None:
                dist.all_reduce(load)
        sums = sums.cpu()
        for d in range(sums.shape[0]):
            if sums[d, 1] > 0:
                name = self.domain_names.get(d, str(d))
                domain_rows.append([d, name, int(sums[d, 1]), float(sums[d, 0] / sums[d, 1])])
        if load is not None:
            load = load.cpu()
            for layer_index, layer in enumerate(self.sparse_layers):
                for expert in range(load.shape[1]):
                    expert_rows.append([layer, expert, int(load[layer_index, expert])])
        return domain_rows, expert_rows

    def _write(self, key: str, rows: list[list[Any]]) -> None:
        if not rows:
            return
        path, _ = self.files[key]
        with open(path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(output: str | os.PathLike[str]) -> list[dict[str, float]]:
    """metrics.csv back as dicts of floats (tests, benchmarks, the pretrain flow's artifacts)."""
    with open(Path(output) / "metrics.csv", newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_validation(output: str | os.PathLike[str]) -> dict[str, list[tuple[int, float, float]]]:
    """validation.csv as domain → [(step, loss, perplexity)] (OVERALL_DOMAIN for all domains together);
    empty when the run has none yet. A row being written is skipped."""
    path = Path(output) / VALIDATION_FILE
    curves: dict[str, list[tuple[int, float, float]]] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                try:
                    curves.setdefault(row["domain"], []).append((int(row["step"]), float(row["loss"]),
                                                                 float(row["ppl"])))
                except (TypeError, ValueError):
                    continue
    return curves


__all__ = ["MetricsLogger", "domain_loss_sums", "flops_per_token", "peak_flops", "read_metrics",
           "read_validation"]
