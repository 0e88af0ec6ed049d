"""Memory of `pangu model import` against the size of the model it converts.

    .venv/bin/python benchmarks/import_memory.py --presets 350m,2.6b --partitions 2 --workdir /tmp/imp

For each preset a checkpoint in the release's PyTorch layout (Megatron 1.1, fp16, `--partitions`
model-parallel ranks, random weights) and a MindSpore `.npy` directory of the same weights are written,
then imported to an fp32 export in a fresh process while the parent samples the child's anonymous
resident memory (`RssAnon`, every 20 ms). File-backed pages of the memory-mapped sources are not counted:
the kernel drops them under pressure, they are the page cache, not the import's memory. The figure to
read: peak anonymous memory against the model's fp16 and fp32 sizes. An import that held the model would
peak at about fp16 + fp32 (the old path); one that streams holds about its largest tensor.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_model.config import PRESETS  # noqa: E402
from pangu_model.released import _EMBEDDINGS, _LAYER, _MS_EMBEDDINGS, _MS_LAYER, split_dim  # noqa: E402

CHILD = """
import json, sys, time
from pangu_model.released import import_released
start = time.perf_counter()
summary = import_released(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "parameters": summary.parameters}))
"""


def megatron_names(preset: str) -> dict[str, tuple[int, ...]]:
    """Megatron names (inside language_model) → shape, word table padded as Megatron pads it."""
    c = PRESETS[preset]
    shapes = {"embedding.word_embeddings.weight": (40064, c.d_model),
              "embedding.position_embeddings.weight": (c.max_seq_len, c.d_model),
              "topQueryEmbedding.top_query_embeddings.weight": (c.max_seq_len, c.d_model),
              "transformer.final_layernorm.weight": (c.d_model,), "transformer.final_layernorm.bias": (c.d_model,)}
    layer = {"input_layernorm": (c.d_model,), "attention.query": (c.d_model, c.d_model),
             "attention.key": (c.d_model, c.d_model), "attention.value": (c.d_model, c.d_model),
             "attention.dense": (c.d_model, c.d_model), "post_attention_layernorm": (c.d_model,),
             "mlp.dense_h_to_4h": (c.d_ff, c.d_model), "mlp.dense_4h_to_h": (c.d_model, c.d_ff)}
    for block in [f"layers.{i}" for i in range(c.num_layers - 1)] + ["topQueryLayer"]:
        for sub, shape in layer.items():
            shapes[f"transformer.{block}.{sub}.weight"] = shape
            shapes[f"transformer.{block}.{sub}.bias"] = (shape[0],)
    assert set(_LAYER) == set(layer) and set(_EMBEDDINGS) <= set(shapes)
    return shapes


def nest(flat: dict[str, torch.Tensor]) -> dict:
    """language_model's nesting as Megatron saves it: embedding/topQueryEmbedding nested, transformer flat."""
    out: dict = {}
    for name, tensor in flat.items():
        head, rest = name.split(".", 1)
        if head == "transformer":
            out.setdefault("transformer", {})[rest] = tensor
        else:
            module, _, param = rest.rpartition(".")
            out.setdefault(head, {}).setdefault(module, {})[param] = tensor
    return out


def write_sources(preset: str, partitions: int, root: Path) -> tuple[Path, Path, int]:
    shapes = megatron_names(preset)
    generator = torch.Generator().manual_seed(0)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(partitions)]
    npy = root / "npy"
    npy.mkdir(parents=True)
    ms_names = {v: k for k, v in _MS_EMBEDDINGS.items()}
    ms_layer = {v: (k, t) for k, (v, t) in _MS_LAYER.items()}
    nbytes = 0
    for name, shape in shapes.items():
        tensor = (0.02 * torch.randn(shape, generator=generator)).half()
        nbytes += tensor.numel() * 2
        dim = split_dim(name)
        for rank in range(partitions):
            parts[rank][name] = tensor.chunk(partitions, dim=dim)[rank].clone() if dim is not None else tensor
        if name in ms_names:  # the MindSpore .npy directory of the same weights
            ms_name, transpose, out = ms_names[name], False, tensor
            if name == "embedding.word_embeddings.weight":
                out = tensor[:40000]
        else:
            block = name.split(".")[1:3] if name.startswith("transformer.layers.") else ["topQueryLayer"]
            sub = name[len("transformer." + ".".join(block)) + 1:]
            ms_sub, transpose = ms_layer[sub]
            ms_block = "top_query_layer" if block == ["topQueryLayer"] else f"blocks.{block[1]}"
            ms_name, out = f"{ms_block}.{ms_sub}", tensor
        np.save(npy / f"backbone.{ms_name}.npy", (out.t() if transpose else out).contiguous().numpy())
    megatron = root / "megatron"
    for rank, part in enumerate(parts):
        path = megatron / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": {"language_model": nest(part)}, "iteration": 0}, path)
    (megatron / "latest_checkpointed_iteration.txt").write_text("release")
    return megatron, npy, nbytes


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def import_peak(source: Path, output: Path, tokenizer: Path) -> dict:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(output), str(tokenizer)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    peak = 0
    while child.poll() is None:
        peak = max(peak, rss_anon_kb(child.pid))
        time.sleep(0.02)
    out, _ = child.communicate()
    if child.returncode:
        raise SystemExit(f"import of {source} failed (exit {child.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_anon_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="350m")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/import-memory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir bundled in the exports (default: the released one, written once)")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer is None:
        from tokenizer.released import write_released_tokenizer
        tokenizer = write_released_tokenizer(work / "tokenizer")
    print(f"{'preset':>6} {'source':>22} {'fp16 GB':>8} {'fp32 GB':>8} {'largest MB':>10} {'seconds':>8} "
          f"{'peak anon MB':>12}")
    for preset in args.presets.split(","):
        root = work / preset
        megatron, npy, nbytes = write_sources(preset, args.partitions, root)
        largest = max(np.prod(s) for s in megatron_names(preset).values()) * 4 / 2**20
        for label, source in ((f"megatron mp {args.partitions}", megatron), ("mindspore .npy", npy)):
            result = import_peak(source, root / f"export-{label.split()[0]}", tokenizer)
            print(f"{preset:>6} {label:>22} {nbytes / 1e9:>8.2f} {2 * nbytes / 1e9:>8.2f} {largest:>10.0f} "
                  f"{result['seconds']:>8.1f} {result['peak_anon_mb']:>12.0f}", flush=True)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
