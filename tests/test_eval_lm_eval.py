"""The lm-evaluation-harness adapter, offline, on local task YAMLs written by the test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from evaluation.scoring import EOT_ID, generate_ids  # noqa: E402
from tests.test_eval_common import checkpoint_dir, loaded  # noqa: E402

DOCS = [
    {"text": "他今天去了北京。", "choices": ["对", "或许", "错"], "label": 0, "q": "中国的首都是哪里？", "a": "北京"},
    {"text": "比赛非常精彩。", "choices": ["对", "或许", "错"], "label": 2, "q": "一年有几个月？", "a": "十二个月"},
    {"text": "这款手机电池很耐用。", "choices": ["对", "或许", "错"], "label": 1, "q": "天空是什么颜色？", "a": "蓝色"},
    {"text": "我们明天一起去公园散步吧，天气预报说明天是晴天，" * 12, "choices": ["好", "不好"], "label": 0,
     "q": "水的化学式是什么？", "a": "H2O"},
]


def _write_tasks(root: Path) -> Path:
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: pangu_local_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    (root / "rolling.yaml").write_text(
        "task: pangu_local_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n', encoding="utf-8")
    (root / "gen.yaml").write_text(
        "task: pangu_local_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "问：{{q}}\\n答："\ndoc_to_target: "{{a}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return root


@torch.no_grad()
def _reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = [EOT_ID, *tok.encode(context)]
    cont = tok.encode(continuation)
    row = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(row).logits[0].float(), dim=-1)
    return float(logprobs[len(ctx) - 1:-1].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_lm_eval_runs_local_yaml_tasks_on_our_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_adapter import PanguLM

    model, tok = loaded()
    lm = PanguLM(checkpoint=str(checkpoint_dir()))
    manager = TaskManager(include_path=str(_write_tasks(tmp_path)), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["pangu_local_mc", "pangu_local_rolling", "pangu_local_gen"],
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    results, samples = out["results"], out["samples"]

    # multiple choice: lm-eval's acc is the argmax of our log-likelihoods, which match a plain full row
    # (for the documents that fit the 128 positions; the long one is cut on the left)
    expected = []
    for doc, sample in zip(DOCS, sorted(samples["pangu_local_mc"], key=lambda s: s["doc_id"])):
        lls = [r[0] for r in sample["filtered_resps"]]
        if len(tok.encode(doc["text"])) < model.config.max_seq_len - 4:
            ref = [_reference_loglikelihood(model, tok, doc["text"], c) for c in doc["choices"]]
            assert lls == pytest.approx(ref, rel=1e-4, abs=1e-4)
        expected.append(int(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
    assert results["pangu_local_mc"]["acc,none"] == pytest.approx(sum(expected) / len(DOCS))

    # rolling: documents within one window equal the full-row log-likelihood after <eot>; the long one
    # (more than 128 tokens) is scored in windows
    rolling = sorted(samples["pangu_local_rolling"], key=lambda s: s["doc_id"])
    for doc, sample in zip(DOCS[:3], rolling[:3]):
        assert sample["filtered_resps"][0] == pytest.approx(_reference_loglikelihood(model, tok, "", doc["text"]), rel=1e-4)
    assert len(tok.encode(DOCS[3]["text"])) > model.config.max_seq_len
    assert math.isfinite(rolling[3]["filtered_resps"][0]) and rolling[3]["filtered_resps"][0] < 0
    assert math.isfinite(results["pangu_local_rolling"]["bits_per_byte,none"])

    # generation: greedy, cut at "\n", the same text as our own decoding loop
    for doc, sample in zip(DOCS, sorted(samples["pangu_local_gen"], key=lambda s: s["doc_id"])):
        prompt = [EOT_ID, *tok.encode(f"问：{doc['q']}\n答：")]
        ours = tok.decode(generate_ids(model, prompt, 8), skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == ours
    assert results["pangu_local_gen"]["exact_match,none"] == 0.0  # a random model


def test_registered_name_and_model_object() -> None:
    from lm_eval.api.registry import get_model

    from evaluation.lm_eval_adapter import PanguLM

    assert get_model("pangu") is PanguLM
    model, tok = loaded()
    lm = PanguLM.create_from_arg_obj({"model": model, "tokenizer": tok}, {"batch_size": 4, "device": "cpu"})
    assert lm.max_length == model.config.max_seq_len
    with pytest.raises(ValueError, match="checkpoint"):
        PanguLM()


def test_registering_pangu_keeps_lm_evals_own_models():
    """lm-eval loads its own models only while its registry is empty: registering "pangu" first used to
    make `--model hf` unknown in the same process."""
    import evaluation.lm_eval_adapter  # noqa: F401 - registers "pangu"
    from lm_eval.api.registry import get_model

    assert get_model("pangu").__name__ == "PanguLM"
    assert get_model("hf").__name__ == "HFLM"
