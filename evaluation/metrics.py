"""Metrics of the PanGu-α evaluation (SPEC §6): accuracy, CMRC 2018 EM/F1, ROUGE-1, cloze accuracy.

EM/F1 follow the official CMRC 2018 evaluation script (`cmrc2018_evaluate.py`, v5, the one CLUE and
PaddleNLP ship) rule for rule:

- both strings are lower-cased and stripped;
- the punctuation list `SP_CHAR` below is the script's `sp_char`, verbatim (its `'……'` entry is two
  characters long and so never matches one character: a lone `…` is *not* removed, as in the script);
- segmentation (`mixed_segmentation`): every character in U+4E00–U+9FA5 is one unit, every `sp_char`
  character is one unit (dropped when `rm_punc`), the runs of other characters in between are split
  by NLTK's word tokenizer (ported below, `english_tokens`);
- F1: per gold answer, the longest common *contiguous* run of units (`find_lcs`) of the answer and
  the prediction, both segmented with punctuation removed; precision = lcs / prediction units,
  recall = lcs / answer units; 0 when lcs is 0; the max over gold answers;
- EM: 1 if the prediction equals one gold answer after `remove_punctuation` (lower, strip, drop
  every `sp_char` character); inner whitespace is kept;
- corpus scores are 100 × mean over *all* questions (an unanswered question scores 0).

The one deliberate difference: `nltk.word_tokenize` first splits sentences with the punkt model (a
data download); we tokenize each non-CJK run as one sentence (`preserve_line=True`). They differ only
on runs that hold more than one English sentence.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

# The official script's punctuation list, verbatim.
SP_CHAR: tuple[str, ...] = (
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：",
    "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、", "「", "」", "（",
    "）", "－", "～", "『", "』",
)
_SP_SET = frozenset(SP_CHAR)  # membership of one character, as `char in sp_char` in the script
_CJK = re.compile(r"[\u4e00-\u9fa5]")


# --- NLTK's NLTKWordTokenizer (what nltk.word_tokenize runs per sentence), ported -----------------
# Regular expressions from nltk/tokenize/destructive.py (NLTK 3.x, Apache License 2.0), applied in
# the same order, so `english_tokens(s) == NLTKWordTokenizer().tokenize(s)` (tested against NLTK).
_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*+)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS2 = [re.compile(p) for p in (
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b",
    r"(?i)\b(gon)(?#X)(na)\b", r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b",
    r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
)]
_CONTRACTIONS3 = [re.compile(p) for p in (r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b")]


def english_tokens(text: str) -> list[str]:
    """NLTK's word tokenizer on one sentence (no punkt sentence split)."""
    for regexp, substitution in _STARTING_QUOTES:
        text = regexp.sub(substitution, text)
    for regexp, substitution in _PUNCTUATION:
        text = regexp.sub(substitution, text)
    text = _PARENS_BRACKETS[0].sub(_PARENS_BRACKETS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = " " + text + " "
    for regexp, substitution in _ENDING_QUOTES:
        text = regexp.sub(substitution, text)
    for regexp in _CONTRACTIONS2:
        text = regexp.sub(r" \1 \2 ", text)
    for regexp in _CONTRACTIONS3:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


# --- CMRC 2018 ------------------------------------------------------------------------------------
def mixed_segmentation(text: str, rm_punc: bool = False) -> list[str]:
    """CJK characters and punctuation one unit each, other runs NLTK-tokenized (official script)."""
    text = str(text).lower().strip()
    out: list[str] = []
    run = ""
    for char in text:
        if rm_punc and char in _SP_SET:
            continue
        if _CJK.match(char) or char in _SP_SET:
            if run:
                out.extend(english_tokens(run))
                run = ""
            out.append(char)
        else:
            run += char
    if run:
        out.extend(english_tokens(run))
    return out


def remove_punctuation(text: str) -> str:
    return "".join(c for c in str(text).lower().strip() if c not in _SP_SET)


def find_lcs(s1: Sequence[str], s2: Sequence[str]) -> tuple[Sequence[str], int]:
    """Longest common contiguous run (the first one found, as the script's dynamic programme)."""
    best = end = 0
    previous = [0] * (len(s2) + 1)
    for i in range(len(s1)):
        current = [0] * (len(s2) + 1)
        for j in range(len(s2)):
            if s1[i] == s2[j]:
                current[j + 1] = previous[j] + 1
                if current[j + 1] > best:
                    best, end = current[j + 1], i + 1
        previous = current
    return s1[end - best:end], best


def cmrc_f1(answers: Iterable[str], prediction: str) -> float:
    """Max over gold answers of the LCS F1 on mixed segments, punctuation removed (0–1)."""
    scores = [0.0]
    prediction_segs = mixed_segmentation(prediction, rm_punc=True)
    for answer in answers:
        answer_segs = mixed_segmentation(answer, rm_punc=True)
        _, lcs = find_lcs(answer_segs, prediction_segs)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision = lcs / len(prediction_segs)
        recall = lcs / len(answer_segs)
        scores.append(2 * precision * recall / (precision + recall))
    return max(scores)


def cmrc_em(answers: Iterable[str], prediction: str) -> float:
    """1.0 if the prediction equals a gold answer once punctuation is removed."""
    prediction_ = remove_punctuation(prediction)
    return 1.0 if any(remove_punctuation(a) == prediction_ for a in answers) else 0.0


# --- ROUGE-1 (DuReader) ---------------------------------------------------------------------------
def rouge1(references: Iterable[str], prediction: str) -> float:
    """ROUGE-1 F-measure, max over references, on the CMRC units (each CJK character one unit, other
    runs NLTK-tokenized), lower-cased and punctuation removed; clipped unigram counts (0–1)."""
    pred = Counter(mixed_segmentation(prediction, rm_punc=True))
    best = 0.0
    for reference in references:
        ref = Counter(mixed_segmentation(reference, rm_punc=True))
        overlap = sum((pred & ref).values())
        if overlap == 0:
            continue
        precision = overlap / sum(pred.values())
        recall = overlap / sum(ref.values())
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --- cloze accuracy (CMRC 2017, PD&CFT generation) -------------------------------------------------
def cloze_correct(answers: Iterable[str], prediction: str) -> float:
    """1.0 if the generated continuation starts with a gold answer (both punctuation-stripped): the
    model continues the query after the blank, so the answer word comes first and the rest of the
    sentence may follow."""
    prediction_ = remove_punctuation(prediction).replace(" ", "")
    return 1.0 if any((a_ := remove_punctuation(a).replace(" ", "")) and prediction_.startswith(a_)
                      for a in answers) else 0.0


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    if not golds:
        return 0.0
    return sum(int(p == g) for p, g in zip(predictions, golds)) / len(golds)


def generation_scores(metric: str, answers: Sequence[str], prediction: str) -> dict[str, float]:
    """Per-example scores (0–1) of one generation metric family."""
    if metric == "em_f1":
        return {"em": cmrc_em(answers, prediction), "f1": cmrc_f1(answers, prediction)}
    if metric == "rouge1":
        return {"rouge1": rouge1(answers, prediction)}
    if metric == "acc":
        return {"acc": cloze_correct(answers, prediction)}
    raise ValueError(f"unknown generation metric {metric!r}")


__all__ = [
    "SP_CHAR", "accuracy", "cloze_correct", "cmrc_em", "cmrc_f1", "english_tokens", "find_lcs",
    "generation_scores", "mixed_segmentation", "remove_punctuation", "rouge1",
]
