"""Scoring: shared-prefix batching gives the numbers of plain full rows; generation follows
pangu_model.generate; checkpoints load with their tokenizer."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from evaluation.harness import ModelScorer
from evaluation.model_io import CheckpointError, find_tokenizer, load_for_eval
from evaluation.scoring import EOT_ID, CandidateScore, generate_ids, rank, score_candidates
from evaluation.tasks import TASKS
from pangu_model import generate
from tests.test_eval_common import checkpoint_dir, loaded, require_clue


@torch.no_grad()
def _reference(model, context: list[int], text: list[int]) -> tuple[float, int]:
    """Summed NLL of `text` after `context`, one full row, no cache (short inputs only)."""
    row = torch.tensor([context + text])
    logprobs = F.log_softmax(model(row).logits[0].float(), dim=-1)
    targets = row[0, len(context):]
    return float(-logprobs[len(context) - 1:-1].gather(-1, targets[:, None]).sum()), len(text)


def test_shared_prefix_equals_full_rows_and_reference() -> None:
    model, tok = loaded()
    context = [EOT_ID, *tok.encode("这是一个例子：")]
    texts = [tok.encode(t) for t in ("这是关于体育的文章：比赛很精彩", "这是关于财经的文章：比赛很精彩", "这是关于国际新闻的文章：比赛")]
    shared = score_candidates(model, context, texts, share_prefix=True)
    full = score_candidates(model, context, texts, share_prefix=False)
    for s, f, text in zip(shared, full, texts):
        loss, n = _reference(model, context, text)
        assert s.tokens == f.tokens == n
        assert s.loss == pytest.approx(loss, rel=1e-5) and f.loss == pytest.approx(loss, rel=1e-5)
    # identical candidates, and one candidate a prefix of another
    same = score_candidates(model, context, [texts[0], texts[0][:3]], share_prefix=True)
    assert same[1].loss == pytest.approx(_reference(model, context, texts[0][:3])[0], rel=1e-5)
    assert same[0].loss == pytest.approx(shared[0].loss, rel=1e-5)


def test_shared_prefix_on_real_few_shot_items_with_truncation() -> None:
    """2-shot CHID and C3 prompts exceed the tiny model's 128 positions: both paths cut alike."""
    clue = str(require_clue())
    model, tok = loaded()
    on, off = ModelScorer(model, tok, share_prefix=True), ModelScorer(model, tok, share_prefix=False)
    for name in ("chid", "c3", "tnews"):
        items = TASKS[name].load(clue, "eval", 0).items[:6]
        demos = TASKS[name].load(clue, "train", 0).items[:2]
        context = "\n".join(d.demo for d in demos) + "\n"
        for item in items:
            a, b = on.score(context, item), off.score(context, item)
            assert [x.tokens for x in a] == [y.tokens for y in b]
            assert max(x.tokens for x in a) <= model.config.max_seq_len
            assert [x.loss for x in a] == pytest.approx([y.loss for y in b], rel=1e-4)
            assert rank(a) == rank(b)


def test_long_single_candidate_is_cut_to_the_window() -> None:
    model, tok = loaded()
    text = list(range(10, 10 + 300))
    (s,) = score_candidates(model, [EOT_ID, 11, 12], [text], share_prefix=True)
    (f,) = score_candidates(model, [EOT_ID, 11, 12], [text], share_prefix=False)
    assert s.tokens == f.tokens == model.config.max_seq_len  # the model reads 128 tokens, predicts 128
    assert s.loss == pytest.approx(f.loss, rel=1e-5)


def test_variants() -> None:
    scores = [CandidateScore(loss=10.0, tokens=2, chars=10, greedy=False),
              CandidateScore(loss=12.0, tokens=4, chars=4, greedy=False)]
    assert rank(scores) == {"mean_token": 1, "char_norm": 0, "sum": 0}


@pytest.mark.parametrize("settings", [
    {"do_sample": False},
    {"do_sample": True, "top_p": 0.8, "temperature": 0.8, "seed": 3},
    {"do_sample": True, "top_k": 5, "seed": 4},
])
def test_generate_ids_follows_pangu_generate(settings) -> None:
    model, tok = loaded()
    prompt = [EOT_ID, *tok.encode("阅读文章：北京是中国的首都。\n问：中国的首都是哪里？\n答：")]
    ours = generate_ids(model, prompt, 20, stop_ids=(EOT_ID,), **settings)
    theirs = generate(model, torch.tensor([prompt]), 20, **settings)[0, len(prompt):].tolist()
    if EOT_ID in theirs:
        theirs = theirs[:theirs.index(EOT_ID)]
    assert ours == theirs and len(ours) > 0


def test_checkpoint_and_tokenizer_lookup(tmp_path) -> None:
    ckpt = checkpoint_dir()
    assert find_tokenizer(ckpt) == ckpt / "tokenizer"
    bare = tmp_path / "run" / "model"
    bare.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(ckpt / name, bare / name)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        load_for_eval(bare)
    shutil.copytree(ckpt / "tokenizer", tmp_path / "run" / "tokenizer")  # a sibling `tokenizer/` is found
    model, tok = load_for_eval(bare)
    assert tok.vocab_size == model.config.vocab_size == 2000 and not model.training
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_for_eval(tmp_path)
