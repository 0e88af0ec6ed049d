"""Perplexity-ranking throughput with and without shared-prefix batching (evaluation.scoring).

Real FewCLUE / C3 items, zero- and few-shot; a randomly initialised `tiny` model (CPU) whose position
table is widened so that few-shot prompts fit; a 2,000-piece tokenizer trained on the CLUE text (or
`--tokenizer DIR`). Prompts are tokenized before timing: the figures are model time only. Each mode
runs `--repeat` times and the best time counts. Scores of the two modes must agree (asserted).

    python benchmarks/eval_throughput.py                       # tnews, chid, c3; 0 and 3 shots
    python benchmarks/eval_throughput.py --tasks chid --shots 0 --n 100 --max-seq-len 1024
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.scoring import EOT_ID, rank, score_candidates  # noqa: E402
from evaluation.tasks import TASKS  # noqa: E402
from pangu_model import PanguModel, get_config  # noqa: E402
from tokenizer.pangu import PanguTokenizer  # noqa: E402

CLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clue"


def tiny_tokenizer(workdir: Path) -> PanguTokenizer:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_eval_common import clue_texts  # the same text the tests train on
    from tokenizer.train import TokenizerTrainConfig, train_tokenizer

    config = TokenizerTrainConfig(output=str(workdir / "tokenizer"), vocab_size=2000, character_coverage=0.98,
                                  input_sentence_size=3000, seed=1)
    train_tokenizer(config, iter(clue_texts()))
    return PanguTokenizer.load(config.output)


def prepared(task: str, tok: PanguTokenizer, n: int, shots: int, seed: int, data_dir: str):
    items = TASKS[task].load(data_dir, "eval", seed).items
    rng = random.Random(seed)
    items = rng.sample(items, min(n, len(items)))
    train = TASKS[task].load(data_dir, "train", seed).items if shots else []
    out = []
    for item in items:
        demos = [d for d in rng.sample(train, min(shots + 1, len(train))) if d.id != item.id][:shots]
        context = "".join(d.demo + "\n" for d in demos)
        out.append(([EOT_ID, *tok.encode(context)], [tok.encode(c) for c in item.candidates],
                    [len(c) for c in item.candidates]))
    return out


def timed(model, batch, share: bool, repeat: int, min_shared: int = 0):
    best, scores = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        scores = [score_candidates(model, ctx, texts, chars, share_prefix=share, min_shared=min_shared)
                  for ctx, texts, chars in batch]
        best = min(best, time.perf_counter() - start)
    return best, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="tnews,chid,c3")
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--n", type=int, default=60, help="examples per task")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--width", type=int, default=64, help="d_model (4 layers, 4 heads, d_ff 4×)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(CLUE))
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = PanguTokenizer.load(args.tokenizer) if args.tokenizer else tiny_tokenizer(Path(tmp))
    model = PanguModel(get_config("tiny", vocab_size=max(tok.vocab_size, 2000), max_seq_len=args.max_seq_len,
                                  d_model=args.width, d_ff=4 * args.width, num_heads=4, dropout=0.0)).eval()
    print(f"model: tiny (d {args.width}, 4 layers), max_seq_len {args.max_seq_len}, vocab {model.config.vocab_size}; "
          f"torch {torch.__version__}, {args.threads} threads; best of {args.repeat}")
    print("| task | shots | n | cand. | tokens/cand. | shared tokens | full rows ex/s | shared prefix ex/s | speed-up "
          "| default (min_shared 16) ex/s | max |Δloss| | same ranking |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for task in args.tasks.split(","):
        for shots in (int(s) for s in args.shots.split(",")):
            batch = prepared(task, tok, args.n, shots, args.seed, args.data_dir)
            timed(model, batch[:3], True, 1)  # warm-up
            t_full, full = timed(model, batch, False, args.repeat)
            t_shared, shared = timed(model, batch, True, args.repeat)
            t_auto, _ = timed(model, batch, True, args.repeat, min_shared=16)
            diff = max(abs(a.loss - b.loss) for fa, sa in zip(full, shared) for a, b in zip(fa, sa))
            rel = max(abs(a.loss - b.loss) / max(abs(a.loss), 1e-9) for fa, sa in zip(full, shared) for a, b in zip(fa, sa))
            same = all(rank(fa) == rank(sa) for fa, sa in zip(full, shared))
            assert rel < 1e-4 and same, (task, shots, diff, rel)
            assert all(a.tokens == b.tokens for fa, sa in zip(full, shared) for a, b in zip(fa, sa))
            cands = sum(len(t) for _, t, _ in batch) / len(batch)
            toks = sum(len(ctx) + len(x) for ctx, t, _ in batch for x in t) / sum(len(t) for _, t, _ in batch)
            common = []
            for ctx, texts, _ in batch:
                k = 0
                while all(len(x) > k + 1 for x in texts) and len({x[k] for x in texts}) == 1:
                    k += 1
                common.append(len(ctx) + k)
            print(f"| {task} | {shots} | {len(batch)} | {cands:.1f} | {toks:.0f} | {sum(common) / len(common):.0f} | "
                  f"{len(batch) / t_full:.1f} | {len(batch) / t_shared:.1f} | {t_full / t_shared:.2f}× | "
                  f"{len(batch) / t_auto:.1f} | {diff:.1e} | {same} |")


if __name__ == "__main__":
    main()
