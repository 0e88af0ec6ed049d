"""Metrics: CMRC 2018 EM/F1 as the official script computes them, ROUGE-1, cloze accuracy."""
from __future__ import annotations

import json
import re

import pytest

from evaluation import metrics as m
from tests.test_eval_common import require_clue


def test_mixed_segmentation_rules() -> None:
    # each CJK character one unit; Latin runs tokenized; sp_char kept as units unless rm_punc
    assert m.mixed_segmentation("北京Nexon公司，2012年") == ["北", "京", "nexon", "公", "司", "，", "2012", "年"]
    assert m.mixed_segmentation("北京Nexon公司，2012年", rm_punc=True) == ["北", "京", "nexon", "公", "司", "2012", "年"]
    # "%" and "." are not in sp_char: NLTK splits them off the number
    assert m.mixed_segmentation("涨了50%。") == ["涨", "了", "50", "%", "。"]
    # "……" in sp_char is two characters, so one "…" is never removed (as in the script)
    assert m.remove_punctuation("好…") == "好…"
    assert m.remove_punctuation(" 《三体》：刘慈欣 ") == "三体刘慈欣"


def test_em_f1_official_rules() -> None:
    assert m.cmrc_em(["4分钟"], "4分钟。") == 1.0  # punctuation removed for EM
    assert m.cmrc_em(["4分钟"], "4 分钟") == 0.0  # inner spaces are kept
    assert m.cmrc_em(["甲", "乙"], "乙") == 1.0  # any gold answer
    # LCS is contiguous: "踢X爆" shares only one unit in a row with "踢爆"
    assert m.cmrc_f1(["踢爆"], "踢X爆") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert m.cmrc_f1(["踢爆", "水枪"], "用水枪") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # max over answers
    assert m.cmrc_f1(["踢爆"], "") == 0.0
    assert m.cmrc_f1(["Nexon公司"], "NEXON") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))  # lower-cased


def _trial_predictions(gt: dict) -> dict[str, str]:
    """Deterministic predictions of seven kinds (exact, punctuated, half, superset, unrelated, Latin
    suffix, bracketed); every 13th question unanswered."""
    preds, k = {}, 0
    for article in gt["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                a, c = qa["answers"][0]["text"], paragraph["context"]
                if k % 13 != 12:
                    preds[qa["id"].strip()] = [a, a + "。", a[: max(1, len(a) // 2)], "答案是" + a + "的", c[:20],
                                               a.upper() + " Extra words, OK.", "（" + a + "）"][k % 7]
                k += 1
    return preds


def test_cmrc2018_trial_matches_the_official_script() -> None:
    """F1 71.31091437534174 and EM 39.62075848303393 over the 1,002 trial questions (77 unanswered) are
    what the official cmrc2018_evaluate.py (v5) prints for these predictions (nltk.word_tokenize run
    without punkt, i.e. NLTKWordTokenizer per run); computed once outside the project."""
    clue = require_clue()
    gt = json.loads((clue / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))
    preds = _trial_predictions(gt)
    em = f1 = 0.0
    total = 0
    for article in gt["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"].strip() in preds:
                    answers = [x["text"] for x in qa["answers"]]
                    em += m.cmrc_em(answers, preds[qa["id"].strip()])
                    f1 += m.cmrc_f1(answers, preds[qa["id"].strip()])
    assert total == 1002 and len(preds) == 1002 - 77
    assert 100 * f1 / total == pytest.approx(71.31091437534174, abs=1e-9)
    assert 100 * em / total == pytest.approx(39.62075848303393, abs=1e-9)


def test_english_tokens_match_nltk() -> None:
    nltk_tokenize = pytest.importorskip("nltk.tokenize").NLTKWordTokenizer().tokenize
    clue = require_clue()
    gt = json.loads((clue / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))
    runs = [r for a in gt["data"] for p in a["paragraphs"] for r in re.split(r"[\u4e00-\u9fa5]+", p["context"]) if r]
    runs += ["Good muffins cost $3.88 (roughly 3,36 euros)\nin New York.  Please buy me\ntwo of them.\nThanks.",
             "can't won't I'm", '"quoted" text', "a--b", "U.S.A.", "e.g. this...", "'tis", "gimme", "x, y: z; @ # & !?"]
    assert len(runs) > 1000
    assert [m.english_tokens(r) for r in runs] == [nltk_tokenize(r) for r in runs]


def test_rouge1_and_cloze() -> None:
    assert m.rouge1(["今天天气很好"], "今天天气很好。") == 1.0
    # 2 of 3 prediction units, 2 of 4 reference units
    assert m.rouge1(["天气很好"], "天气差") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert m.rouge1(["甲乙", "天气很好"], "天气很好") == 1.0  # max over references
    assert m.rouge1(["天气"], "") == 0.0
    assert m.rouge1(["天天"], "天") == pytest.approx(2 * 1 * 0.5 / 1.5)  # clipped counts
    assert m.cloze_correct(["北京"], "北京 是首都") == 1.0
    assert m.cloze_correct(["北京"], "“北京”") == 1.0  # quotes are in sp_char
    assert m.cloze_correct(["北京"], "南京") == 0.0
    assert m.generation_scores("em_f1", ["甲"], "甲") == {"em": 1.0, "f1": 1.0}
