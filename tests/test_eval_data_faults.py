"""What `pangu eval` and `pangu model generate` do with faulty input: a damaged line of a task's data costs that
line (counted, with its file and line), a record without a usable label or text is counted rather than dropped
or stringified, a file that is not data at all is named, a crashed task ends the command in one line, a
tokenizer other than the one the export was trained with is refused, and sampling options given with
--greedy are refused rather than ignored."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

GOOD = [{"id": i, "sentence": f"第{i}条评论，质量{'很好' if i % 2 else '很差'}。", "label": "Positive" if i % 2 else "Negative"}
        for i in range(20)]


def _line(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _damaged_eprstmt(directory: Path) -> tuple[Path, dict[int, str]]:
    """An EPRSTMT test file of 27 records (and a blank line): 20 good ones and 7 that cannot be used, each a
    different fault; returns the file and line number → the reason it is counted under."""
    lines = [_line(r) for r in GOOD[:10]]
    faults = {
        11: (_line({"id": 100, "sentence": "没有标签的评论"}), "no label"),
        12: (_line({"id": 101, "sentence": "中性的评论", "label": "Neutral"}), "label not one of Positive, Negative"),
        13: (_line({"id": 102, "sentence": 12345, "label": "Positive"}), "sentence is not a string"),
        14: (b'{"id": 103, "sentence": "\xe5\xbe\x88\xff\xe5\xa5\xbd", "label": "Positive"}', "not UTF-8"),
        15: (b"[1, 2]", "not a JSON object"),
        16: (b'{"id": 104, "sentence": "\xe6\x96\xad\xe6\x8e\x89', "not JSON"),  # an unterminated line, mid-file
    }
    lines += [raw for raw, _ in faults.values()]
    lines += [b""] + [_line(r) for r in GOOD[10:]]  # a blank line (line 17) is no record
    lines.append(b'{"id": 105, "sentence": "\xe5\xbe')  # the file cut mid-character: line 28
    path = directory / "eprstmt" / "test_public.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n".join(lines))
    return path, {**{n: reason for n, (_, reason) in faults.items()}, 28: "not UTF-8"}


def test_damaged_lines_and_unusable_records_are_skipped_counted_and_named(tmp_path, monkeypatch, capsys) -> None:
    """The unterminated line used to fail the whole task (JSONDecodeError, no file named), the cut character
    to fail it with `'utf-8' codec can't decode byte 0xe5 in position ...`; the record without a label was
    dropped and the integer sentence stringified into a prompt, without a word (n 22 of 27 records)."""
    from flows.cli import main

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    data, faults = _damaged_eprstmt(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["eval", "--oracle", "--data-dir", str(tmp_path / "data"), "--tasks", "eprstmt",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))["tasks"]["eprstmt"]
    assert summary["status"] == "ok" and summary["scores"] == {"acc": 100.0}
    assert summary["n"] == summary["n_available"] == 20
    expected = {}
    for reason in faults.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["skipped"] == expected
    assert summary["n_available"] + sum(summary["skipped"].values()) == 27  # every record of the file
    # The first five places as file:line (1-based) with why: the lines that are no records (found as the file
    # is read), then the records the task cannot use
    examples = summary["skipped_examples"]
    assert len(examples) == 5
    for example in examples:
        place, reason = example.split(": ", 1)
        assert place.startswith(f"{data}:") and reason.split(" (")[0] == faults[int(place.rpartition(":")[2])]
    assert [example.split(": ", 1)[0] for example in examples] == [f"{data}:{n}" for n in (14, 15, 16, 28, 11)]
    assert examples[2].endswith("(Unterminated string starting at column 25)"), examples[2]
    err = capsys.readouterr().err
    assert "eprstmt: 7 of 27 records skipped (" in err and f"first: {data}:14: not UTF-8 (byte 0xff at column 29)" in err
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Skipped records" in report and "eprstmt: 7 of 27 records skipped" in report


def test_records_of_the_built_in_set_and_chid_are_checked_one_by_one(tmp_path) -> None:
    """A built-in record whose label is outside its choices stopped the whole task (ValueError); a CHID
    record without its blank or answer ended it with a KeyError."""
    from evaluation import loaders
    from evaluation.harness import OracleScorer, evaluate

    task = tmp_path / "review_sentiment"
    task.mkdir()
    good = [{"id": f"r{i}", "text": f"评论{i}", "choices": ["好评", "差评"], "label": i % 2} for i in range(6)]
    bad = [{"id": "b1", "text": "评论", "choices": ["好评", "差评"], "label": 2},
           {"id": "b2", "text": ["评论"], "choices": ["好评", "差评"], "label": 0},
           {"id": "b3", "text": "评论", "choices": "好评", "label": 0}]
    task.joinpath("test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good + bad),
                                           encoding="utf-8")
    chid = tmp_path / "chid"
    chid.mkdir()
    candidates = ["一心一意", "三心二意", "七上八下", "五湖四海", "九牛一毛", "十全十美", "百发百中"]
    records = [{"id": i, "content": "他做事#idiom#。", "candidates": candidates, "answer": i} for i in range(4)]
    records += [{"id": 10, "content": "没有空格。", "candidates": candidates, "answer": 0},
                {"id": 11, "content": "他做事#idiom#。", "candidates": candidates},
                {"id": 12, "content": "他做事#idiom#。", "candidates": candidates, "answer": 7}]
    chid.joinpath("test_public.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                                 encoding="utf-8")
    loaders.clear_cache()
    results, _ = evaluate(OracleScorer(), "review_sentiment,chid", str(tmp_path))
    review, idioms = results["tasks"]["review_sentiment"], results["tasks"]["chid"]
    assert review["n"] == 6 and review["skipped"] == {"label not among the candidates": 1, "text is not a string": 1,
                                                      "choices is not a list of strings": 1}
    assert idioms["n"] == 4 and idioms["skipped"] == {"no #idiom# blank in content": 1, "no answer": 1,
                                                      "answer not among the candidates": 1}
    assert idioms["skipped_examples"][0] == f"{chid / 'test_public.json'}:5: no #idiom# blank in content"


def test_a_file_that_is_not_data_at_all_is_named(tmp_path) -> None:
    """Whole-file faults say which file: the parser's and the codec's own messages named none."""
    from evaluation import loaders

    lines = tmp_path / "lines.json"
    lines.write_bytes(b"<html>\nnot json\n")
    with pytest.raises(loaders.DataUnreadable, match=rf"{lines}: not JSON lines: none of its 2 non-blank lines"):
        loaders.read_json_lines(str(lines))
    document = tmp_path / "c3-d-dev.json"
    document.write_bytes(b'[[["\xe4\xbd\xa0\xe5\xa5\xbd"], [{"question": "')
    with pytest.raises(loaders.DataUnreadable, match=rf"{document}: not JSON: Unterminated string starting at line 1"):
        loaders.read_json(str(document))
    text = tmp_path / "pd-test.txt"
    text.write_bytes("第一句".encode("utf-8") + b"\xff\n")
    with pytest.raises(loaders.DataUnreadable, match=rf"{text}: not UTF-8: byte 0xff at byte offset 9"):
        loaders.read_text(str(text))


def test_a_crashed_task_ends_the_command_in_one_line_and_the_others_are_written(tmp_path, monkeypatch, capsys) -> None:
    """`pangu eval` printed the traceback of EvaluationFailed (a plain RuntimeError) and exited 1."""
    from flows.cli import main

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    data = tmp_path / "data"
    _damaged_eprstmt(data)
    bustm = data / "bustm" / "test_public.json"
    bustm.parent.mkdir()
    bustm.write_bytes(b"<!doctype html>\n<p>Not found</p>\n")  # a download that saved an error page
    out = tmp_path / "out"
    code = main(["eval", "--oracle", "--data-dir", str(data), "--tasks", "bustm,eprstmt", "--output", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[pangu]")]
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"pangu eval: 1 of 2 evaluation tasks failed: bustm (DataUnreadable: {bustm}: not "
                               f"JSON lines"), lines[0]
    assert f"The others' results are in {out / 'results.json'}" in lines[0]
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))["tasks"]
    assert saved["bustm"]["status"] == "failed" and saved["eprstmt"]["status"] == "ok"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The test export with a domains.json that records its tokenizer's fingerprint, and a tokenizer of the same
    size whose two pieces trade places (same vocabulary, other ids for the same text)."""
    from sentencepiece import sentencepiece_model_pb2

    from tests.test_eval_common import checkpoint_dir
    from tokenizer.pangu import PanguTokenizer

    root = tmp_path_factory.mktemp("tokenizer-check")
    export = root / "export"
    shutil.copytree(checkpoint_dir(), export)
    own = PanguTokenizer.load(export / "tokenizer")
    (export / "domains.json").write_text(json.dumps({
        "tokenizer_sha256": own.fingerprint, "tokenizer": {"path": "/elsewhere", "sha256": own.fingerprint,
                                                           "pieces": own.vocab_size}}), encoding="utf-8")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(own.model_proto)
    proto.pieces[20].piece, proto.pieces[21].piece = proto.pieces[21].piece, proto.pieces[20].piece
    other = PanguTokenizer(proto.SerializeToString(), own.meta)
    other.save(root / "other")
    own.save(root / "same")
    assert other.vocab_size == own.vocab_size and other.fingerprint != own.fingerprint
    return {"export": export, "other": root / "other", "same": root / "same", "own": own.fingerprint,
            "other_sha": other.fingerprint, "bare": checkpoint_dir()}


@pytest.mark.parametrize("command", ["eval", "generate", "export-hf"])
def test_a_tokenizer_other_than_the_trained_one_is_refused(command, exports, tmp_path, monkeypatch, capsys) -> None:
    """`--tokenizer` of the same size but other content was accepted, and the scores and text were garbage."""
    import evaluation.model_io
    from flows.cli import main

    monkeypatch.delenv("PANGU_DEBUG", raising=False)

    def weights_read(*args, **kwargs):
        raise AssertionError("the weights were read before the command was refused")

    monkeypatch.setattr(evaluation.model_io, "load_checkpoint", weights_read)
    (tmp_path / "data").mkdir()
    args = {"eval": ["eval", "--checkpoint", str(exports["export"]), "--data-dir", str(tmp_path / "data"),
                     "--output", str(tmp_path / "out")],
            "generate": ["model", "generate", str(exports["export"])],
            "export-hf": ["model", "export-hf", str(exports["export"]), "--output", str(tmp_path / "out")]}[command]
    assert main([*args, "--tokenizer", str(exports["other"])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    name = {"eval": "eval", "generate": "model generate", "export-hf": "model export-hf"}[command]
    assert len(lines) == 1 and lines[0].startswith(f"pangu {name}: error: tokenizer {exports['other']}"), lines
    assert f"sha256 {exports['other_sha'][:12]}…" in lines[0] and f"sha256 {exports['own'][:12]}…" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_trained_tokenizer_passes_and_an_export_that_records_none_takes_any(exports) -> None:
    from evaluation.model_io import check_model_options

    check_model_options(exports["export"])  # its own, bundled
    check_model_options(exports["export"], exports["same"])  # the same bytes elsewhere
    check_model_options(exports["bare"], exports["other"])  # no domains.json: nothing to compare with


def test_sampling_options_with_greedy_are_refused_and_otherwise_passed_on(monkeypatch, capsys) -> None:
    """`--greedy --temperature 0.5` ran greedy and ignored the temperature without a word."""
    import evaluation.samples
    from flows.cli import main

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    calls: list[dict] = []

    def generate_samples(export, prompts, **kwargs):
        calls.append(kwargs)
        return {"domain": None, "samples": []}

    monkeypatch.setattr(evaluation.samples, "generate_samples", generate_samples)
    assert main(["model", "generate", "EXPORT", "--greedy", "--temperature", "0.5"]) == 2
    assert main(["model", "generate", "EXPORT", "--greedy", "--top-p", "0.5", "--seed", "3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["pangu model generate: error: --greedy takes the most likely token each step and samples "
                     "nothing: --temperature would be ignored; leave it out, or --greedy",
                     "pangu model generate: error: --greedy takes the most likely token each step and samples "
                     "nothing: --top-p, --seed would be ignored; leave them out, or --greedy"]
    assert calls == []
    assert main(["model", "generate", "EXPORT", "--greedy"]) == 0
    assert main(["model", "generate", "EXPORT", "--temperature", "0.5", "--top-k", "5"]) == 0
    assert [{k: v for k, v in call.items() if k in ("greedy", "temperature", "top_p", "top_k", "seed")}
            for call in calls] == [{"greedy": True}, {"greedy": False, "temperature": 0.5, "top_k": 5}]
