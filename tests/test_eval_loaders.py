"""Loaders: the real FewCLUE / C3 / CMRC 2018 files, and tiny synthetic files in the public formats of
the datasets that are not here (written by the tests), on local paths and on memory://."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from evaluation import loaders
from evaluation.harness import OracleScorer, evaluate
from evaluation.tasks import PAPER_TASKS, TASKS, resolve_tasks
from tests.test_eval_common import require_clue


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")


def _squad(prefix: str, n: int) -> dict:
    return {"version": "v1.0", "data": [{"id": f"{prefix}{i}", "title": "t", "paragraphs": [{
        "id": f"{prefix}{i}", "context": f"第{i}段：北京是中国的首都。上海是最大的城市。",
        "qas": [{"id": f"{prefix}{i}-Q0", "question": "中国的首都是哪里？",
                 "answers": [{"text": "北京", "answer_start": 3}, {"text": "北京市", "answer_start": 3}]}]}]}
        for i in range(n)]}


def write_public_formats(root: Path) -> Path:
    """One small file set per dataset missing from ../shared, each in its public layout."""
    nli = [{"sentence1": f"他今天去了北京{i}", "sentence2": "他在北京", "label": lab}
           for i, lab in enumerate(["entailment", "neutral", "contradiction", "-", "entailment", "neutral"])]
    _jsonl(root / "cmnli_public" / "dev.json", nli)
    _jsonl(root / "cmnli_public" / "train.json", nli)
    pairs = [{"id": i, "sentence1": f"花呗怎么还款{i}", "sentence2": "花呗如何还钱", "label": str(i % 2)} for i in range(6)]
    _jsonl(root / "afqmc_public" / "dev.json", pairs)
    _jsonl(root / "afqmc_public" / "train.json", pairs)
    _jsonl(root / "afqmc_public" / "test.json", [{"id": 0, "sentence1": "a", "sentence2": "b"}])  # unlabelled
    # CLUE's TNEWS layout: dev.json, no label_index2en2zh.json (the built-in names apply)
    _jsonl(root / "tnews_public" / "dev.json", [
        {"label": "10" + str(k), "label_desc": d, "sentence": f"新闻{k}", "keywords": ""}
        for k, d in enumerate(["news_story", "news_culture", "news_entertainment", "news_sports", "news_finance"])])
    # CLUE's CHID layout: passages with numbered blanks, answers in dev_answer.json
    _jsonl(root / "chid_public" / "dev.json", [
        {"candidates": ["一帆风顺", "半途而废", "画蛇添足"], "content": ["他做事#idiom000001#，从不#idiom000002#。"]}])
    _json(root / "chid_public" / "dev_answer.json", {"#idiom000001#": 0, "#idiom000002#": 1})
    _json(root / "c3" / "c3-m-dev.json", [[["男：你好。", "女：你好，请坐。"],
                                            [{"question": "女的让男的做什么？", "choice": ["坐", "站", "走"], "answer": "坐"}],
                                            "m-1"]])
    _json(root / "drcd" / "DRCD_dev.json", _squad("D", 3))
    _json(root / "drcd" / "DRCD_training.json", _squad("DT", 3))
    _json(root / "cmrc2019" / "cmrc2019_dev.json", {"version": "v1", "data": [{
        "context_id": "C1", "context": "春天来了。[BLANK1]小草发芽了。[BLANK2]大家都很高兴。",
        "choices": ["花儿开了。", "燕子回来了。", "冬天很冷。"], "answers": [1, 0]}]})
    _json(root / "webqa" / "me_validation.ann.json", {
        "Q_ANN_VAL_001": {"question": "中国的首都是哪里", "evidences": {
            "E1": {"answer": ["北京"], "evidence": "北京是首都"}, "E2": {"answer": ["no_answer"], "evidence": "无"}}},
        "Q_ANN_VAL_002": {"question": "无答案的问题", "evidences": {"E1": {"answer": ["no_answer"], "evidence": "x"}}}})
    _jsonl(root / "dureader" / "devset" / "search.dev.json", [{
        "question_id": 1, "question": "苹果是什么颜色", "question_type": "DESCRIPTION", "answers": ["苹果通常是红色的。"],
        "documents": [{"is_selected": False, "paragraphs": ["无关段落"], "most_related_para": 0},
                      {"is_selected": True, "paragraphs": ["介绍", "苹果通常是红色或绿色的。"], "most_related_para": 1}]}])
    _jsonl(root / "dureader" / "devset" / "zhidao.dev.json", [{
        "question_id": 2, "question": "天空为什么是蓝色", "answers": ["因为瑞利散射。"],
        "documents": [{"is_selected": True, "paragraphs": ["因为瑞利散射。"], "most_related_para": 0}]}])
    cloze = "1 ||| 小明 今天 去 了 北京 。\n2 ||| 他 在 北京 看到 了 天安门 。\n3 ||| 小明 在 XXXXX 看到 了 天安门 。\n\n" \
            "1 ||| 小红 喜欢 苹果 。\n2 ||| 她 每天 吃 一个 苹果 。\n3 ||| 小红 每天 吃 一个 XXXXX 。\n"
    answers = "3 ||| 北京\n3 ||| 苹果\n"
    for name in ("cmrc2017", "pd", "cft"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{name}_test.txt").write_text(cloze, encoding="utf-8")
        (root / name / f"{name}_test.answer").write_text(answers, encoding="utf-8")
    return root


def test_real_clue_files_are_found_by_public_names() -> None:
    clue = str(require_clue())
    counts = {}
    for name in ("tnews", "iflytek", "ocnli", "csl", "cluewsc", "chid", "bustm", "csldcp", "eprstmt"):
        records, located = loaders.load_clue(name, clue, "eval")
        assert located.split == "test_public" and located.path.endswith(f"{name}/test_public.json")
        counts[name] = len(records)
        train, located = loaders.load_clue(name, clue, "train")
        assert located.split == "train_few_all" and train
    assert counts == {"tnews": 2010, "iflytek": 1749, "ocnli": 2520, "csl": 2838, "cluewsc": 976, "chid": 2002,
                      "bustm": 1772, "csldcp": 1784, "eprstmt": 610}
    c3, located = loaders.load_c3(clue)  # no dev/test here: the train files are what there is
    assert located.split == "train" and len(c3) > 10_000
    assert all(0 <= r["label"] < len(r["choices"]) <= 4 for r in c3)
    squad, located = loaders.load_squad("cmrc2018", clue)
    assert located.split == "trial" and len(squad) == 1002


def test_templates_on_real_records() -> None:
    clue = str(require_clue())
    tnews = TASKS["tnews"].load(clue, "eval", 1).items
    assert all(len(i.candidates) == 4 and i.candidates[i.gold].startswith("这是关于") for i in tnews)
    labels = {lab for i in tnews for lab in i.meta["labels"]}
    assert len(labels) == 15 and "体育" in labels  # Chinese names from label_index2en2zh.json
    assert TASKS["tnews"].load(clue, "eval", 1).items[5].candidates == tnews[5].candidates  # seeded
    assert TASKS["tnews"].load(clue, "eval", 2).items != tnews
    iflytek = TASKS["iflytek"].load(clue, "eval", 1).items
    assert len({lab for i in iflytek for lab in i.meta["labels"]}) > 100  # label_des of the data
    ocnli = TASKS["ocnli"].load(clue, "eval", 1).items
    assert ocnli[0].candidates[0].endswith(ocnli[0].candidates[0].split("，", 1)[-1]) and "?对，" in ocnli[0].candidates[0]
    chid = TASKS["chid"].load(clue, "eval", 1).items
    assert len(chid[0].candidates) == 7 and "#idiom#" not in chid[0].candidates[0]
    wsc = TASKS["cluewsc"].load(clue, "eval", 1).items
    assert [c[-1] for c in wsc[0].candidates] == ["是", "否"]
    c3 = TASKS["c3"].load(clue, "eval", 1).items
    assert c3[0].candidates[0].startswith("问: ") and "\n该答案来自对话: " in c3[0].candidates[0]
    cmrc = TASKS["cmrc2018"].load(clue, "eval", 1).items
    assert cmrc[0].prompt.startswith("阅读文章：") and cmrc[0].prompt.endswith("\n答：")


def test_public_formats_of_missing_datasets(tmp_path: Path) -> None:
    root = str(write_public_formats(tmp_path / "data"))
    items = {name: TASKS[name].load(root, "eval", 0).items for name in
             ("cmnli", "afqmc", "tnews", "chid", "c3", "drcd", "cmrc2019", "webqa", "dureader", "cmrc2017", "pd", "cft")}
    assert len(items["cmnli"]) == 5  # the "-" label is dropped
    assert items["cmnli"][1].candidates[1] == "他今天去了北京1?或许，他在北京"
    assert items["afqmc"][1].candidates[items["afqmc"][1].gold].startswith("下面两个句子语义相同：")
    assert items["tnews"][3].candidates[items["tnews"][3].gold] == "这是关于体育的文章：新闻3"
    assert [i.candidates[i.gold] for i in items["chid"]] == ["他做事一帆风顺，从不。", "他做事，从不半途而废。"]
    assert items["c3"][0].candidates[0] == "问: 女的让男的做什么？\n答:坐\n该答案来自对话: 男：你好。\n女：你好，请坐。"
    assert len(items["drcd"]) == 3 and items["drcd"][0].answers == ["北京", "北京市"]
    assert [i.candidates[i.gold] for i in items["cmrc2019"]] == ["春天来了。燕子回来了。小草发芽了。大家都很高兴。",
                                                                 "春天来了。小草发芽了。花儿开了。大家都很高兴。"]
    assert [(i.prompt, i.answers) for i in items["webqa"]] == [("问：中国的首都是哪里\n答：", ["北京"])]
    assert items["dureader"][0].prompt == "阅读文章：苹果通常是红色或绿色的。\n问：苹果是什么颜色\n答："
    assert len(items["dureader"]) == 2
    assert [(i.prompt, i.answers) for i in items["cmrc2017"]] == [
        ("小明今天去了北京。他在北京看到了天安门。\n小明在", ["北京"]), ("小红喜欢苹果。她每天吃一个苹果。\n小红每天吃一个", ["苹果"])]
    # train splits for few-shot
    assert TASKS["drcd"].load(root, "train", 0).items and TASKS["afqmc"].load(root, "train", 0).items


def test_oracle_reaches_100_on_every_format(tmp_path: Path) -> None:
    root = str(write_public_formats(tmp_path / "data"))
    names = ["cmnli", "afqmc", "tnews", "chid", "c3", "drcd", "cmrc2019", "webqa", "dureader", "cmrc2017", "pd", "cft"]
    results, _ = evaluate(OracleScorer(), names, root)
    for name in names:
        summary = results["tasks"][name]
        assert summary["status"] == "ok", summary
        assert all(v == 100.0 for v in summary["scores"].values()), (name, summary["scores"])


def test_missing_data_is_a_message_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(loaders.DataNotFound, match=r"drcd \(eval\): not found at .*DRCD_dev.json"):
        loaders.load_squad("drcd", str(tmp_path))
    with pytest.raises(loaders.DataNotFound, match="does not exist"):
        loaders.load_c3(str(tmp_path / "nowhere"))
    results, _ = evaluate(OracleScorer(), "paper", str(tmp_path))
    assert {s["status"] for s in results["tasks"].values()} == {"not_found"}
    assert len(results["tasks"]) == len(PAPER_TASKS) == 17  # the 16 of the paper, PD&CFT as two
    assert "not found at" in results["tasks"]["webqa"]["message"]


def test_memory_filesystem(tmp_path: Path) -> None:
    local = write_public_formats(tmp_path / "data")
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe(f"/evalmem/{path.relative_to(local).as_posix()}", path.read_bytes())
    try:
        loaders.clear_cache()
        records, located = loaders.load_clue("afqmc", "memory://evalmem", "eval")
        assert located.path.startswith("memory://") and len(records) == 6
        assert len(TASKS["drcd"].load("memory://evalmem", "eval", 0).items) == 3
    finally:
        fs.rm("/evalmem", recursive=True)
        loaders.clear_cache()


def test_task_groups() -> None:
    assert [t.name for t in resolve_tasks("tnews, ocnli,tnews")] == ["tnews", "ocnli"]
    assert {t.name for t in resolve_tasks("extra")} == {"bustm", "csldcp", "eprstmt"}
    with pytest.raises(KeyError, match="unknown task"):
        resolve_tasks("nope")
