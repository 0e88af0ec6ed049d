"""`pangu model export-hf` → transformers Auto classes, `generate` and lm-eval `--model hf`, offline, tiny models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from pangu_model import PanguModel, generate, get_config, load_checkpoint, save_checkpoint  # noqa: E402
from tests.test_eval_common import checkpoint_dir, tokenizer_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pangu(*args: str) -> subprocess.CompletedProcess:
    from tests.test_train_common import rank_env

    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=rank_env())  # the command chooses DeepSpeed's accelerator itself


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "pangu-tiny-hf"
    done = pangu("model", "export-hf", str(checkpoint_dir()), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _ids(tok, *texts: str) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def test_export_loads_with_auto_classes_and_gives_our_logits(hf_dir) -> None:
    import pangu_model.hf  # noqa: F401 - registers model_type "pangu"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tokenizer.pangu import PanguTokenizer

    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "pangu" and config["architectures"] == ["PanguForCausalLM"]
    assert type(AutoConfig.from_pretrained(hf_dir)).__name__ == "PanguHFConfig"
    # the weights are as readable as the other files (transformers wrote them 0600)
    assert (hf_dir / "model.safetensors").stat().st_mode & 0o777 == (hf_dir / "config.json").stat().st_mode & 0o777

    ours = load_checkpoint(checkpoint_dir())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "PanguForCausalLM" and hf.model.config == ours.config
    hf_names = set(hf.state_dict())
    assert hf_names == {f"model.{name}" for name in ours.state_dict()}

    tok = PanguTokenizer.load(tokenizer_dir())
    auto_tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = ["中国的首都是北京。", "我们明天一起去公园散步吧，天气预报说明天是晴天。", "PanGu-α 2021 年"]
    for text in texts:
        assert auto_tok(text)["input_ids"] == tok.encode(text)
    assert auto_tok.eos_token_id == 9 and auto_tok.pad_token_id == 6

    rows = torch.tensor([[9, *tok.encode(texts[1])][:20], [9, *tok.encode(texts[0]), 9, *tok.encode(texts[2])][:20]])
    with torch.no_grad():
        expected = ours(rows).logits
        got = hf(rows)
    torch.testing.assert_close(got.logits, expected, rtol=0, atol=0)
    assert got.past_key_values is not None  # use_cache defaults on in eval mode

    # labels follow the transformers convention (unshifted): the loss is our shifted cross entropy
    with torch.no_grad():
        loss = hf(rows, labels=rows, use_cache=False).loss
    reference = F.cross_entropy(expected[:, :-1].reshape(-1, expected.shape[-1]), rows[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, reference)


def test_greedy_generate_equals_ours_and_padding_is_masked(hf_dir) -> None:
    import pangu_model.hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_checkpoint(checkpoint_dir())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = ["问：中国的首都是哪里？\n答：", "问：水的化学式是什么？请用中文回答这个问题。\n答："]
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        expected = generate(ours, ids, 10)
        got = hf.generate(ids, max_new_tokens=10, do_sample=False)
        assert got.tolist() == expected.tolist()

    # a left-padded batch (generate's padding): every row as it is alone
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())
    got = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, prompt in zip(got, prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        alone = generate(ours, ids, 6)[0, ids.shape[1]:]
        new = row[batch["input_ids"].shape[1]:]
        assert new[: len(alone)].tolist() == alone.tolist()

    # a right-padded batch (lm-eval's log-likelihoods): real tokens get their unpadded logits, mask or not
    tok.padding_side = "right"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        masked = hf(**batch, use_cache=False).logits
        unmasked = hf(batch["input_ids"], use_cache=False).logits
        for i, prompt in enumerate(prompts):
            n = int(batch["attention_mask"][i].sum())
            alone = ours(torch.tensor([tok(prompt)["input_ids"]])).logits[0]
            torch.testing.assert_close(masked[i, :n], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(unmasked[i, :n], alone, rtol=1e-5, atol=1e-5)


def test_sigma_export_uses_its_default_domain(tmp_path) -> None:
    import pangu_model.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from pangu_model.hf import export_hf

    torch.manual_seed(1)
    sigma = PanguModel(get_config("sigma-tiny", vocab_size=2000, dropout=0.0)).eval()
    save_checkpoint(sigma, tmp_path / "export")
    done = pangu("model", "export-hf", str(tmp_path / "export"), "--output", str(tmp_path / "hf"),
                 "--tokenizer", str(tokenizer_dir()))
    assert done.returncode == 2 and "domain" in done.stderr  # no domains.json: it needs --domain
    done = pangu("model", "export-hf", str(tmp_path / "export"), "--output", str(tmp_path / "hf"),
                 "--tokenizer", str(tokenizer_dir()), "--domain", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    # transformers' save of a PanGu-Σ sub-model imports DeepSpeed, whose accelerator probe warned on a CPU
    assert "unable to detect it" not in done.stdout + done.stderr, done.stdout[-3000:]
    shutil.rmtree(tmp_path / "hf")
    export_hf(tmp_path / "export", tmp_path / "hf", tokenizer=tokenizer_dir(), domain=2)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.default_domain_id == 2
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["num_domains"] == 4 and "num_experts" not in saved  # the flat-pool routers' field, unused here
    assert hf.config.to_pangu_config() == sigma.config
    ids = torch.randint(10, 2000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, sigma(ids, domain_ids=2).logits, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids, domain_ids=1).logits, sigma(ids, domain_ids=1).logits, rtol=0, atol=0)
    assert hf.generate(ids, max_new_tokens=4, do_sample=False).tolist() == generate(sigma, ids, 4, domain_ids=2).tolist()


def test_export_hf_errors_are_one_line(tmp_path) -> None:
    from tests.test_cli_errors import _one_line_error

    _one_line_error(pangu("model", "export-hf", str(tmp_path / "nope"), "--output", str(tmp_path / "hf")),
                    "pangu model export-hf: error:", "nope", "not a checkpoint")
    assert not (tmp_path / "hf").exists()


def test_lm_eval_hf_model_runs_a_local_task(hf_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import pangu_model.hf  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tests.test_eval_lm_eval import DOCS, _write_tasks
    from tokenizer.pangu import PanguTokenizer

    manager = TaskManager(include_path=str(_write_tasks(tmp_path)), include_defaults=False)
    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["pangu_local_mc", "pangu_local_gen"],
                          task_manager=manager, batch_size=2, device="cpu", log_samples=True, bootstrap_iters=0,
                          limit=3)
    assert 0.0 <= out["results"]["pangu_local_mc"]["acc,none"] <= 1.0

    # its log-likelihoods are ours on the same tokens (lm-eval encodes context + continuation jointly)
    ours, tok = load_checkpoint(checkpoint_dir()), PanguTokenizer.load(tokenizer_dir())
    for sample in sorted(out["samples"]["pangu_local_mc"], key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        for choice, (ll, _) in zip(doc["choices"], sample["filtered_resps"]):
            context, whole = tok.encode(doc["text"]), tok.encode(doc["text"] + choice)
            with torch.no_grad():
                logprobs = F.log_softmax(ours(torch.tensor([whole])).logits[0].float(), dim=-1)
            target = torch.tensor(whole[len(context):])
            expected = float(logprobs[len(context) - 1:-1].gather(-1, target[:, None]).sum())
            assert ll == pytest.approx(expected, rel=1e-4, abs=1e-4)

    # generation: left-padded batches through `generate`, cut at "\n": our greedy text
    for sample in sorted(out["samples"]["pangu_local_gen"], key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        prompt = torch.tensor([tok.encode(f"问：{doc['q']}\n答：")])
        new = generate(ours, prompt, 8)[0, prompt.shape[1]:].tolist()
        assert sample["filtered_resps"][0] == tok.decode(new, skip_special_tokens=True).split("\n")[0]
