"""Shared material of the evaluation tests: a tiny tokenizer trained once per session on CLUE text, and a
randomly initialised `tiny` model saved and loaded through pangu_model.checkpoint (no tests here).

Data is read from ../shared/data/clue (tests/realtext.CLUE), never copied into the project.
"""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest

from tests import scratch
from tests.realtext import CLUE

VOCAB = 2000


def require_clue() -> Path:
    if not (CLUE / "fewclue" / "tnews").is_dir():
        pytest.skip("CLUE data not available")
    return CLUE


def session_dir() -> Path:
    return scratch.session_dir("eval")


def clue_texts() -> list[str]:
    """Real text of the FewCLUE test files and the CMRC 2018 trial contexts."""
    fields = ("sentence", "sentence1", "sentence2", "abst", "content", "text")
    texts: list[str] = []
    for path in sorted((CLUE / "fewclue").glob("*/test_public.json")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                record = json.loads(line)
                texts += [record[f] for f in fields if isinstance(record.get(f), str)]
    squad = json.loads((CLUE / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))
    texts += [p["context"] for a in squad["data"] for p in a["paragraphs"]]
    return texts


@lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    """A unigram tokenizer of 2,000 pieces (a few seconds to train)."""
    from tokenizer.train import TokenizerTrainConfig, train_tokenizer

    require_clue()
    config = TokenizerTrainConfig(output=str(session_dir() / "tokenizer"), vocab_size=VOCAB, character_coverage=0.98,
                                  input_sentence_size=3000, seed=1)
    train_tokenizer(config, iter(clue_texts()))
    return Path(config.output)


@lru_cache(maxsize=None)
def checkpoint_dir() -> Path:
    """`tiny` preset, random init (seed 0), dropout off, saved with its tokenizer in `tokenizer/` beside the weights."""
    import torch

    from pangu_model import PanguModel, get_config, save_checkpoint

    torch.manual_seed(0)
    model = PanguModel(get_config("tiny", vocab_size=VOCAB, dropout=0.0))
    out = session_dir() / "checkpoint"
    save_checkpoint(model, out)
    shutil.copytree(tokenizer_dir(), out / "tokenizer")
    return out


@lru_cache(maxsize=None)
def loaded():
    """(model, tokenizer) loaded back from the checkpoint directory."""
    from evaluation.model_io import load_for_eval

    return load_for_eval(checkpoint_dir())
