"""The contracts where the stages meet (SPEC §2.1): token shards → pretraining → export → evaluation.

The packed token directory names its tokenizer and domains; the training run takes its vocabulary and
PanGu-Σ's expert groups from them; the export carries the tokenizer and the domain map, so that
`pangu eval --checkpoint EXPORT` needs nothing else, PanGu-Σ exports included.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.model_io import CheckpointError, choose_domain
from pangu_model import PanguModel
from pangu_model.config import get_config
from pangu_model.generate import generate
from pangu_model.train import DataMismatch, Trainer, fit_to_data, load_train_config
from tests.realtext import CLUE
from tests.test_train_common import VOCAB, packed_tokens, run_cli, run_config, session_dir

SEVEN = 7  # more domains than the sigma-tiny preset's 4: the corpus `make run` packs has 7


@pytest.fixture(scope="module")
def seven_domains() -> Path:
    return packed_tokens(spread_over=SEVEN)


def _contract(tokens: Path) -> dict:
    return json.loads((tokens / "domains.json").read_text(encoding="utf-8"))


def test_packed_tokens_name_their_tokenizer(seven_domains):
    from tokenizer.pangu import PanguTokenizer

    tokenizer_dir = session_dir() / "tokenizer"
    record = _contract(seven_domains)["tokenizer"]
    assert record == {"path": str(tokenizer_dir.resolve()), "pieces": VOCAB,
                      "sha256": PanguTokenizer.load(tokenizer_dir).fingerprint}
    assert sorted(_contract(seven_domains)["id_to_name"].values()) == [f"area{i}" for i in range(SEVEN)]


def test_the_model_takes_its_vocabulary_and_expert_groups_from_the_data(seven_domains):
    sigma = fit_to_data(load_train_config("sigma-tiny", {"data": str(seven_domains)})).pangu_config()
    # 2,000 pieces padded to a multiple of 64; the padding is masked (tokenizer_pieces)
    assert (sigma.vocab_size, sigma.tokenizer_pieces) == (2048, VOCAB)
    # one expert group per domain of the data, with the preset's experts per domain
    assert (sigma.num_domains, sigma.experts_per_domain, sigma.total_experts) == (SEVEN, 2, 14)
    alpha = fit_to_data(load_train_config("alpha-tiny", {"data": str(seven_domains)})).pangu_config()
    assert (alpha.router, alpha.vocab_size, alpha.tokenizer_pieces) == ("dense", 2048, VOCAB)
    # a larger vocabulary stays the user's choice
    wide = fit_to_data(load_train_config("alpha-tiny", {"data": str(seven_domains),
                                                        "model_overrides.vocab_size": 4096}))
    assert wide.pangu_config().vocab_size == 4096


def test_overrides_that_cannot_work_are_refused_before_anything_runs(seven_domains):
    with pytest.raises(DataMismatch, match="one expert group per domain.*at least 7"):
        fit_to_data(load_train_config("sigma-tiny", {"data": str(seven_domains), "model_overrides.num_domains": 4}))
    with pytest.raises(DataMismatch, match=f"smaller than the data's tokenizer \\({VOCAB} pieces"):
        fit_to_data(load_train_config("alpha-tiny", {"data": str(seven_domains), "model_overrides.vocab_size": 1000}))


def test_the_training_program_refuses_a_mismatch_with_one_message(seven_domains):
    config = run_config("refuse-domains", "sigma-tiny", data=str(seven_domains), model_overrides={"num_domains": 4})
    done = run_cli(config, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:]
    assert "one expert group per domain" in done.stdout and "Traceback" not in done.stdout


def test_a_moved_tokenizer_is_refused_before_training(tmp_path, seven_domains):
    data = tmp_path / "tokens"
    shutil.copytree(seven_domains, data)
    contract = _contract(data)
    contract["tokenizer"]["path"] = str(tmp_path / "gone")
    (data / "domains.json").write_text(json.dumps(contract))
    with pytest.raises(DataMismatch, match="not readable any more"):
        fit_to_data(load_train_config("alpha-tiny", {"data": str(data)}))


def test_padded_ids_are_never_generated_or_scored():
    torch.manual_seed(0)
    model = PanguModel(get_config("tiny", vocab_size=128, tokenizer_pieces=100, max_seq_len=64)).eval()
    ids = torch.randint(10, 100, (2, 16))
    logits = model(ids).logits
    assert torch.isinf(logits[..., 100:]).all() and torch.isfinite(logits[..., :100]).all()
    assert torch.allclose(logits[..., :100].float().softmax(-1).sum(-1), torch.ones(2, 16), atol=1e-5)
    out = generate(model, ids, 40, do_sample=True, temperature=50.0, seed=1, stop_token_id=-1)
    assert int(out.max()) < 100
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        get_config("tiny", vocab_size=64, tokenizer_pieces=100)


@pytest.fixture(scope="module")
def sigma_export(seven_domains) -> Path:
    config = load_train_config(run_config("contract-sigma", "sigma-tiny", data=str(seven_domains), train_steps=2,
                                          checkpoint_every=0))
    # as a user runs it: no vocabulary given (run_config's default pins the test vocabulary)
    config = config.model_copy(update={"model_overrides": {"max_seq_len": 64}})
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        trainer.close()
    return Path(config.output) / "export"


def test_an_export_carries_its_tokenizer_and_domains(sigma_export, seven_domains):
    contract = _contract(seven_domains)
    bundled = (sigma_export / "tokenizer" / "spm.model").read_bytes()
    assert hashlib.sha256(bundled).hexdigest() == contract["tokenizer"]["sha256"]
    assert _contract(sigma_export)["id_to_name"] == contract["id_to_name"]
    config = json.loads((sigma_export / "config.json").read_text())
    config = config.get("model", config)
    assert (config["vocab_size"], config["tokenizer_pieces"], config["num_domains"]) == (2048, VOCAB, SEVEN)


@pytest.mark.skipif(not (CLUE / "fewclue" / "tnews").is_dir(), reason="CLUE data not available")
def test_pangu_eval_needs_nothing_but_the_export(sigma_export, seven_domains, tmp_path):
    from flows.cli import main

    moved = tmp_path / "elsewhere" / "model"  # nothing of the run beside it
    shutil.copytree(sigma_export, moved)
    contract = _contract(seven_domains)
    largest = max(contract["domains"].values(), key=lambda d: d["tokens"])
    assert main(["eval", "--checkpoint", str(moved), "--tasks", "tnews", "--data-dir", str(CLUE),
                 "--output", str(tmp_path / "default"), "--limit", "6"]) == 0
    results = json.loads((tmp_path / "default" / "results.json").read_text())
    assert results["tasks"]["tnews"]["status"] == "ok"
    name = contract["id_to_name"][str(largest["id"])]
    assert results["meta"]["domain"] == {"id": largest["id"], "name": name, "chosen_by": "most training tokens"}
    assert f"domain {largest['id']} ({name})" in (tmp_path / "default" / "report.md").read_text()

    assert main(["eval", "--checkpoint", str(moved), "--tasks", "tnews", "--data-dir", str(CLUE),
                 "--output", str(tmp_path / "named"), "--limit", "6", "--domain", "area3"]) == 0
    named = json.loads((tmp_path / "named" / "results.json").read_text())["meta"]["domain"]
    assert named == {"id": 3, "name": "area3", "chosen_by": "given"}


@pytest.mark.skipif(not (CLUE / "fewclue" / "tnews").is_dir(), reason="CLUE data not available")
def test_each_data_set_s_evaluation_is_kept_beside_the_export(sigma_export, tmp_path):
    """Without --output, `pangu eval` wrote every data set's evaluation to eval/ beside the export, so scoring
    another set replaced the first one's results and predictions."""
    from flows.cli import main

    moved = tmp_path / "run" / "export"
    shutil.copytree(sigma_export, moved)
    other = tmp_path / "my-set" / "fewclue" / "tnews"
    shutil.copytree(CLUE / "fewclue" / "tnews", other)
    args = ["eval", "--checkpoint", str(moved), "--tasks", "tnews", "--limit", "6"]
    assert main([*args, "--data-dir", str(CLUE)]) == 0
    first = (moved.parent / "eval" / "clue" / "results.json").read_bytes()
    assert main([*args, "--data-dir", str(other.parents[1])]) == 0
    assert (moved.parent / "eval" / "clue" / "results.json").read_bytes() == first
    second = json.loads((moved.parent / "eval" / "my-set" / "results.json").read_text())
    assert second["tasks"]["tnews"]["status"] == "ok"
    assert sorted(p.name for p in (moved.parent / "eval").iterdir()) == ["clue", "my-set"]


def test_the_domain_to_evaluate_is_an_id_or_a_name(sigma_export):
    from pangu_model.checkpoint import load_config

    config = load_config(sigma_export)
    assert choose_domain(sigma_export, config, "5") == {"id": 5, "name": "area5", "chosen_by": "given"}
    assert choose_domain(sigma_export, config, 0)["name"] == "area0"
    with pytest.raises(CheckpointError, match="not one of this model's domains.*0 area0"):
        choose_domain(sigma_export, config, "poetry")
    with pytest.raises(CheckpointError, match="outside this model's domains"):
        choose_domain(sigma_export, config, 9)
    assert choose_domain(sigma_export, get_config("tiny"), None) is None  # dense: no domain needed


def test_validation_documents_are_held_out_of_training(seven_domains):
    from tokenizer.dataset import PackedRowDataset, TokenShards, held_out

    shards = TokenShards(seven_domains)
    mask = held_out(shards, 0.05)
    for domain in range(SEVEN):  # every domain has a validation slice, and keeps training documents
        mine = shards.doc_domains == domain
        assert 1 <= int((mask & mine).sum()) < int(mine.sum())
    dataset = PackedRowDataset(seven_domains, seq_len=64, validation_fraction=0.05)
    trained = np.concatenate([stream.documents for stream in dataset.streams.values()])
    assert not mask[trained].any() and len(trained) == int((~mask).sum())
    assert np.array_equal(held_out(TokenShards(seven_domains), 0.05), mask)  # the same slice every time


def test_a_run_logs_validation_loss_per_domain(sigma_export):
    import csv

    with open(sigma_export.parent / "validation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {row["step"] for row in rows} == {"2"}  # the last step (validation_every 100 > 2 steps)
    assert sorted(row["domain"] for row in rows) == sorted([f"area{i}" for i in range(SEVEN)] + ["all"])
    for row in rows:
        assert float(row["ppl"]) == pytest.approx(np.exp(float(row["loss"])), rel=1e-6)
        assert int(row["tokens"]) > 0
    overall = next(row for row in rows if row["domain"] == "all")
    assert int(overall["tokens"]) == sum(int(row["tokens"]) for row in rows if row["domain"] != "all")
