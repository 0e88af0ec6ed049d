"""RRE routing on real text: expert load of the random vs the balanced token table, and the experts a
training step touches with independent vs domain-affine sampling (issue #12 §2).

    python benchmarks/routing_balance.py                         # builds its corpus in /tmp/routing-balance
    python benchmarks/routing_balance.py --workdir DIR --steps 8 --json out.json

Corpus: FewCLUE (../shared/data/clue, read, never copied into the project): each of its 9 tasks plus C3's
dialogues is one domain (10 real domains); a BPE tokenizer (`--vocab`) is trained on the text with
tokenizer/train.py and the corpus is packed with tokenizer/pack.py, as tests/test_train_common.py does.
The corpus has 10 domains, not PanGu-Σ's 40: for the sigma-1t layout (40 domains × 16 experts) every
real domain's documents are dealt round-robin into 4 sub-domains (`task/0` … `task/3`), 40 domains in
all, each with its task's token statistics.

1. Table balance. For each domain, the tokens it sends to each of its 16 experts, as max/mean over the
   16 (1.00 = even), under `random_routing_table` (seeded permutation dealt round-robin) and
   `balanced_routing_table` (greedy by descending count from the corpus's token counts). "held-out"
   fits the balanced table on the even documents and measures it on the odd ones.
2. Experts touched per step, sigma-1t-like: world 512, ep 8 (a node; 64 expert-parallel groups),
   micro-batch 1 × 1024 tokens, natural mixture. Independent: every row draws its domain (the default
   sampler; rank r holds row r of the step). Domain-affine: `PackedRowDataset`'s schedule, one domain per
   group and step. Reported per RRE layer: distinct experts a group's 8 rows route to (what ECSS must
   fetch for that group) and world-wide (of 640), and the load of the busiest ep rank over the mean
   (tokens per ep rank inside a group after the all-to-all) with today's contiguous expert placement
   (ep rank r holds experts [80r, 80r + 80): 5 whole domains) and with the proposed interleaved one
   (expert slot k of every domain on ep rank k mod 8).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pangu_model.moe import balanced_routing_table, random_routing_table  # noqa: E402
from tokenizer.dataset import PackedRowDataset, TokenShards, token_counts  # noqa: E402

CLUE = ROOT.parent / "shared" / "data" / "clue"
# FewCLUE task → the fields whose text makes a document.
FIELDS = {"bustm": ("sentence1", "sentence2"), "chid": ("content",), "cluewsc": ("text",), "csl": ("abst",),
          "csldcp": ("content",), "eprstmt": ("sentence",), "iflytek": ("sentence",),
          "ocnli": ("sentence1", "sentence2"), "tnews": ("sentence",)}
SPLIT = 4  # sub-domains per real domain: 10 × 4 = 40 domains, as PanGu-Σ
EXPERTS_PER_DOMAIN, WORLD, EP, SEQ = 16, 512, 8, 1024


def clue_documents(lines_per_doc: int = 4) -> list[tuple[str, str]]:
    """(domain, text) of every FewCLUE task file (deduplicated lines, a few per document) and C3."""
    docs: list[tuple[str, str]] = []
    for task, fields in FIELDS.items():
        lines: list[str] = []
        for path in sorted((CLUE / "fewclue" / task).glob("*.json")):
            with open(path, encoding="utf-8") as fh:
                for raw in fh:
                    if raw.strip():
                        record = json.loads(raw)
                        lines.append(" ".join(str(record[f]) for f in fields if record.get(f)))
        lines = list(dict.fromkeys(t.replace("#idiom#", "") for t in lines if t.strip()))
        docs += [(task, "\n".join(lines[i:i + lines_per_doc])) for i in range(0, len(lines), lines_per_doc)]
    for name in ("c3-d-train.json", "c3-m-train.json"):
        path = CLUE / "c3" / name
        if path.is_file():
            for item in json.loads(path.read_text(encoding="utf-8")):
                docs.append(("c3", "\n".join(item[0])))
    return docs


def build_corpus(workdir: Path, vocab: int) -> Path:
    """Packed tokens of the 40 sub-domains (reused when already there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenizer.config import PackConfig, TokenizerTrainConfig
    from tokenizer.pack import pack_corpus
    from tokenizer.train import train_tokenizer

    tokens = workdir / f"tokens-v{vocab}"
    if (tokens / "domains.json").is_file():
        return tokens
    docs = clue_documents()
    counter: dict[str, int] = {}
    rows = []
    for domain, text in docs:
        k = counter.get(domain, 0)
        counter[domain] = k + 1
        rows.append((f"{domain}/{k % SPLIT}", text))
    corpus = workdir / "corpus" / "data"
    corpus.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "id": [f"doc-{i}" for i in range(len(rows))], "text": [t for _, t in rows],
        "domain": [d for d, _ in rows], "source": ["clue"] * len(rows), "quality": [1.0] * len(rows),
        "meta": ["{}"] * len(rows),
    }), corpus / "part-00000.parquet")
    tokenizer = workdir / f"tokenizer-v{vocab}"  # train_tokenizer reuses a finished one with this config
    train_tokenizer(TokenizerTrainConfig(output=str(tokenizer), model_type="bpe", vocab_size=vocab,
                                         input_sentence_size=200_000, character_coverage=0.9995, seed=3),
                    texts=[t for _, t in docs])
    pack_corpus(PackConfig(input=str(corpus.parent), output=str(tokens), tokenizer=str(tokenizer)))
    return tokens


def load_ratio(table: np.ndarray, ids: np.ndarray, slots: int) -> float:
    load = np.bincount(table[ids], minlength=slots)
    return float(load.max() / load.mean())


def table_balance(tokens: Path, seed: int) -> dict[str, Any]:
    shards = TokenShards(tokens)
    names = shards.domain_names
    per_domain = token_counts(tokens, per_domain=True)
    vocab = per_domain.shape[1]
    random = random_routing_table(vocab, EXPERTS_PER_DOMAIN, seed).numpy()
    balanced = balanced_routing_table(per_domain.sum(axis=0), EXPERTS_PER_DOMAIN, seed).numpy()
    # Held-out: counts of the even documents, load measured on the odd ones.
    even = np.zeros(vocab, dtype=np.int64)
    odd_ids: dict[str, list[np.ndarray]] = {}
    for i in range(len(shards)):
        doc = shards.document(i).astype(np.int64)
        real = names[int(shards.doc_domains[i])].split("/")[0]
        if i % 2 == 0:
            even += np.bincount(doc, minlength=vocab)
        else:
            odd_ids.setdefault(real, []).append(doc)
    fitted_on_half = balanced_routing_table(even, EXPERTS_PER_DOMAIN, seed).numpy()

    # Per real domain (the 4 sub-domains together: same token statistics, 4× the tokens).
    real_counts: dict[str, np.ndarray] = {}
    for d, name in names.items():
        real = name.split("/")[0]
        real_counts[real] = real_counts.get(real, 0) + per_domain[d]
    rows = []
    for real, counts in sorted(real_counts.items()):
        weighted = lambda table: np.bincount(table, weights=counts, minlength=EXPERTS_PER_DOMAIN)
        r, b = weighted(random), weighted(balanced)
        held = np.concatenate(odd_ids.get(real, [np.zeros(0, np.int64)]))
        rows.append({"domain": real, "tokens": int(counts.sum()), "random": float(r.max() / r.mean()),
                     "balanced": float(b.max() / b.mean()),
                     "balanced_held_out": load_ratio(fitted_on_half, held, EXPERTS_PER_DOMAIN) if held.size else None})
    total = per_domain.sum(axis=0)
    pooled = {name: float(w.max() / w.mean()) for name, w in (
        ("random", np.bincount(random, weights=total, minlength=EXPERTS_PER_DOMAIN)),
        ("balanced", np.bincount(balanced, weights=total, minlength=EXPERTS_PER_DOMAIN)))}
    return {"vocab": vocab, "tokens": int(total.sum()), "seen_ids": int((total > 0).sum()), "per_domain": rows,
            "pooled": pooled}


def placement(layout: str, num_domains: int) -> np.ndarray:
    """[domains × 16] (domain-major expert id d·16 + k) → the ep rank that holds that expert."""
    d, k = np.divmod(np.arange(num_domains * EXPERTS_PER_DOMAIN), EXPERTS_PER_DOMAIN)
    if layout == "contiguous":  # today: ep rank r holds experts [r·E/ep, (r+1)·E/ep)
        return np.arange(num_domains * EXPERTS_PER_DOMAIN) // (num_domains * EXPERTS_PER_DOMAIN // EP)
    # proposed: global id k·D + d, so a shard of E/ep consecutive ids holds slots [2r, 2r+2) of every domain
    return (k * num_domains + d) // (num_domains * EXPERTS_PER_DOMAIN // EP)


def steps_touch(tokens: Path, steps: int, seed: int, table: np.ndarray) -> dict[str, Any]:
    """Mean over `steps` optimizer steps of the sigma-1t-like layout (see the module docstring)."""
    groups = WORLD // EP
    independent = PackedRowDataset(tokens, seq_len=SEQ, weights="natural", seed=seed)
    affine = PackedRowDataset(tokens, seq_len=SEQ, weights="natural", seed=seed,
                              domain_groups=[list(range(g * EP, (g + 1) * EP)) for g in range(groups)],
                              world_size=WORLD, rank=0, rows_per_step=1)
    num_domains = max(independent.shards.domain_names) + 1
    owner = {layout: placement(layout, num_domains) for layout in ("contiguous", "interleaved")}
    taken = {d: 0 for d in affine.domains}
    rows_iter = iter(independent)
    out: dict[str, dict[str, list[float]]] = {}
    for step in range(steps):
        for mode in ("independent", "domain-affine"):
            if mode == "independent":
                rows = [next(rows_iter) for _ in range(WORLD)]  # rank r: row r of the step
                batch = [(int(r["domain_ids"][0]), r["input_ids"].numpy()) for r in rows]
            else:  # the dataset's schedule: one domain per group; rows in stream order
                batch = []
                for g in range(groups):
                    d = affine.affine_domain(step, g)
                    for _ in range(EP):
                        batch.append((d, affine.streams[d].row(taken[d])[:-1]))
                        taken[d] += 1
            experts = [d * EXPERTS_PER_DOMAIN + table[ids] for d, ids in batch]
            stats = out.setdefault(mode, {"group_experts": [], "group_domains": [], "world_experts": [],
                                          "contiguous": [], "interleaved": []})
            for g in range(groups):
                chunk = np.concatenate(experts[g * EP:(g + 1) * EP])
                stats["group_experts"].append(len(np.unique(chunk)))
                stats["group_domains"].append(len({d for d, _ in batch[g * EP:(g + 1) * EP]}))
                for layout in ("contiguous", "interleaved"):
                    per_rank = np.bincount(owner[layout][chunk], minlength=EP)
                    stats[layout].append(float(per_rank.max() / per_rank.mean()))
            stats["world_experts"].append(len(np.unique(np.concatenate(experts))))
    return {mode: {k: float(np.mean(v)) for k, v in stats.items()} for mode, stats in out.items()} | {
        "num_domains": num_domains, "total_experts": num_domains * EXPERTS_PER_DOMAIN}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/routing-balance"))
    parser.add_argument("--vocab", type=int, default=8000, help="BPE tokenizer trained on the corpus")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps simulated")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (CLUE / "fewclue").is_dir():
        sys.exit(f"{CLUE} is missing: this benchmark reads FewCLUE from ../shared/data/clue")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokens = build_corpus(args.workdir, args.vocab)

    balance = table_balance(tokens, args.seed)
    print(f"corpus: {balance['tokens']:,} tokens, 10 real domains (FewCLUE 9 tasks + C3) dealt into 40; "
          f"vocabulary {balance['vocab']} ({balance['seen_ids']} ids seen)")
    print("\n## Expert load inside a domain's group: max/mean over its 16 experts (1.00 = even)\n")
    print("| domain | tokens | random table | balanced table | balanced, held-out half |")
    print("|---|---:|---:|---:|---:|")
    for row in balance["per_domain"]:
        held = f"{row['balanced_held_out']:.3f}" if row["balanced_held_out"] is not None else "-"
        print(f"| {row['domain']} | {row['tokens']:,} | {row['random']:.3f} | {row['balanced']:.3f} | {held} |")
    print(f"| all (pooled) | {balance['tokens']:,} | {balance['pooled']['random']:.3f} | "
          f"{balance['pooled']['balanced']:.3f} | |")

    vocab = balance["vocab"]
    tables = {"random": random_routing_table(vocab, EXPERTS_PER_DOMAIN, args.seed).numpy(),
              "balanced": balanced_routing_table(token_counts(tokens, vocab_size=vocab), EXPERTS_PER_DOMAIN,
                                                 args.seed).numpy()}
    touch = {name: steps_touch(tokens, args.steps, args.seed, table) for name, table in tables.items()}
    first = touch["random"]
    print(f"\n## Experts touched per step: world {WORLD}, ep {EP} ({WORLD // EP} groups), micro-batch 1 × {SEQ}, "
          f"{first['num_domains']} domains × {EXPERTS_PER_DOMAIN} = {first['total_experts']} experts per layer, "
          f"natural mixture, mean of {args.steps} steps\n")
    print("| sampling | table | domains per group | experts per group (ECSS fetch) | experts world-wide | "
          "busiest ep rank / mean, contiguous | same, interleaved |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in ("independent", "domain-affine"):
        for name in tables:
            s = touch[name][mode]
            print(f"| {mode} | {name} | {s['group_domains']:.2f} | {s['group_experts']:.1f} | "
                  f"{s['world_experts']:.1f} | {s['contiguous']:.2f} | {s['interleaved']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"balance": balance, "touch": touch}, indent=2))


if __name__ == "__main__":
    main()
