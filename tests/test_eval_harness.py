"""The harness end to end: oracle at 100 %, a random model at chance, few-shot sampling, results.json
and the markdown report written from a checkpoint directory."""
from __future__ import annotations

import json
import math

import pytest

from evaluation.harness import EvalConfig, ModelScorer, OracleScorer, evaluate, plan_evaluation, run_evaluation
from evaluation.report import markdown_report
from evaluation.scoring import VARIANTS
from tests.test_eval_common import checkpoint_dir, loaded, require_clue

AVAILABLE = ["cmrc2018", "chid", "cluewsc", "c3", "ocnli", "tnews", "iflytek", "csl", "bustm", "csldcp", "eprstmt"]


def test_oracle_reaches_100_on_the_real_tasks() -> None:
    clue = str(require_clue())
    results, predictions = evaluate(OracleScorer(), "all", clue, limit=40, shots=2)
    ok = [name for name, s in results["tasks"].items() if s["status"] == "ok"]
    assert sorted(ok) == sorted(AVAILABLE)
    for name in ok:
        summary = results["tasks"][name]
        assert summary["n"] == 40 and len(predictions[name]) == 40
        assert all(v == 100.0 for v in summary["scores"].values()), (name, summary["scores"])
        if summary["method"] == "ppl":
            assert {v: summary["ppl_variants"][v]["acc"] for v in VARIANTS} == {v: 100.0 for v in VARIANTS}


def _binomial_bound(p: float, n: int, z: float = 3.5) -> float:
    """Half-width of the z-sigma band of an accuracy of n independent trials at chance p (z 3.5: two-sided
    p ≈ 5e-4). Sampling 300 of a class-balanced test set adds no more than the same binomial noise for
    a scorer that always picks one label."""
    return z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("task,n", [("tnews", 300), ("chid", 240), ("ocnli", 300)])
def test_random_model_lands_at_chance(task: str, n: int) -> None:
    clue = str(require_clue())
    model, tok = loaded()
    results, predictions = evaluate(ModelScorer(model, tok), task, clue, limit=n, seed=11)
    summary = results["tasks"][task]
    chance = summary["chance"]["expected"] / 100
    assert summary["n"] == n and chance == pytest.approx(summary["chance"]["published"] / 100, abs=1e-5)
    bound = _binomial_bound(chance, n)
    for variant in VARIANTS:
        acc = summary["ppl_variants"][variant]["acc"] / 100
        assert abs(acc - chance) <= bound, (task, variant, acc, chance, bound)
    # the model's predictions are not constant (it ranks, it does not always take the first candidate)
    assert len({p["pred"] for p in predictions[task]}) > 1


class Recorder(OracleScorer):
    def __init__(self) -> None:
        self.contexts: dict[str, str] = {}

    def score(self, context, item):
        self.contexts[item.id] = context
        return super().score(context, item)


def test_few_shot_demonstrations_are_seeded_and_never_the_example() -> None:
    clue = str(require_clue())
    a, b, c = Recorder(), Recorder(), Recorder()
    evaluate(a, "c3", clue, limit=30, shots=3, seed=5)
    evaluate(b, "c3", clue, limit=30, shots=3, seed=5)
    evaluate(c, "c3", clue, limit=30, shots=3, seed=6)
    assert a.contexts == b.contexts and a.contexts != c.contexts
    from evaluation.tasks import TASKS

    items = {i.id: i for i in TASKS["c3"].load(clue, "eval", 5).items}
    for item_id, context in a.contexts.items():
        assert context.count("\n问: ") + context.startswith("问: ") == 3  # three demonstrations
        assert items[item_id].demo not in context  # C3 is evaluated on its train split here
    zero = Recorder()
    evaluate(zero, "tnews", clue, limit=5)
    assert set(zero.contexts.values()) == {""}


def test_run_evaluation_writes_results_and_report(tmp_path) -> None:
    clue = str(require_clue())
    out = tmp_path / "eval"
    config = EvalConfig(checkpoint=str(checkpoint_dir()), tasks="tnews,cmrc2018,drcd", data_dir=clue,
                        output=str(out), shots=1, limit=12)
    results = run_evaluation(config)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(results, ensure_ascii=False))
    tnews, cmrc, drcd = (saved["tasks"][k] for k in ("tnews", "cmrc2018", "drcd"))
    assert tnews["status"] == "ok" and tnews["n"] == 12 and tnews["shots"] == 1
    assert set(tnews["ppl_variants"]) == {"mean_token", "char_norm", "sum"}
    assert tnews["reference"] == {"PanGu-α 2.6B": 60.95, "PanGu-α 13B": 60.26}
    assert tnews["chance"] == {"published": 25.0, "expected": 25.0}
    assert cmrc["status"] == "ok" and set(cmrc["scores"]) == {"em", "f1"}
    assert cmrc["decoding"]["top_p"] == 0.8 and cmrc["decoding"]["temperature"] == 0.8
    assert drcd["status"] == "not_found" and "DRCD_dev.json" in drcd["message"]
    assert saved["meta"]["model"] == "tiny" and saved["meta"]["shots"] == 1
    rows = [json.loads(line) for line in (out / "predictions" / "cmrc2018.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and {"prediction", "answers", "em", "f1"} <= set(rows[0])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report == markdown_report(saved)
    assert "| TNEWS | ppl | acc | test_public | 12 |" in report and "| 60.95 | 60.26 | 25.00 |" in report
    assert "1.21 / 16.65" in report and "**drcd**" in report
    # same seed, same numbers (generation samples with a per-example seed), on another number of threads
    import torch

    torch.set_num_threads(1)
    again = run_evaluation(EvalConfig(**{**config.model_dump(), "output": str(tmp_path / "again"), "threads": 2}))
    assert torch.get_num_threads() == 2  # `pangu eval --threads 2` (the suite's fixture sets 1 back)
    assert again["tasks"]["cmrc2018"]["scores"] == cmrc["scores"]
    assert again["tasks"]["tnews"]["ppl_variants"] == tnews["ppl_variants"]
    # the thread count is not part of what a result depends on: a rerun with another one keeps the results
    assert plan_evaluation(EvalConfig(**{**config.model_dump(), "threads": 3})).results_as_written() is not None


def test_a_rerun_after_a_kill_or_a_crash_runs_only_the_unfinished_tasks(tmp_path, monkeypatch) -> None:
    import evaluation.harness as harness

    real_run_task = harness.run_task
    ran: list[str] = []
    failing: dict[str, BaseException] = {}

    def run_task(task, *args, **kwargs):
        ran.append(task.name)
        if task.name in failing:
            raise failing[task.name]
        return real_run_task(task, *args, **kwargs)

    monkeypatch.setattr(harness, "run_task", run_task)
    config = EvalConfig(checkpoint=str(checkpoint_dir()), tasks="tnews,ocnli,cmrc2018", data_dir=str(require_clue()),
                        output=str(tmp_path / "eval"), limit=6)
    whole = run_evaluation(config.model_copy(update={"output": str(tmp_path / "whole")}))

    # Killed during the second task (Ctrl-C here): the first one is kept, there are no results yet.
    ran.clear()
    failing["ocnli"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    assert ran == ["tnews", "ocnli"] and not (tmp_path / "eval" / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "eval" / "tasks").iterdir()) == ["tnews.json"]

    # The rerun crashes in the same task: the others run, the crash is reported and named.
    ran.clear()
    failing["ocnli"] = RuntimeError("simulated crash")
    with pytest.raises(harness.EvaluationFailed, match=r"1 of 3 evaluation tasks failed: ocnli \(RuntimeError: simulated crash\)"):
        run_evaluation(config)
    assert ran == ["ocnli", "cmrc2018"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    assert [t["status"] for t in saved["tasks"].values()] == ["ok", "failed", "ok"]

    # Fixed: only the crashed task runs; the results are those of an uninterrupted run.
    ran.clear()
    failing.clear()
    results = run_evaluation(config)
    assert ran == ["ocnli"]
    drop = {"seconds"}
    assert {n: {k: v for k, v in t.items() if k not in drop} for n, t in results["tasks"].items()} == \
           {n: {k: v for k, v in t.items() if k not in drop} for n, t in whole["tasks"].items()}
    for name in ("tnews", "ocnli", "cmrc2018"):
        assert (tmp_path / "eval" / "predictions" / f"{name}.jsonl").read_bytes() == \
               (tmp_path / "whole" / "predictions" / f"{name}.jsonl").read_bytes()
    # Nothing left to run: results.json is returned as written. Other settings run every task again.
    ran.clear()
    written = (tmp_path / "eval" / "results.json").stat().st_mtime_ns
    assert run_evaluation(config) == results and ran == []
    assert (tmp_path / "eval" / "results.json").stat().st_mtime_ns == written
    run_evaluation(config.model_copy(update={"limit": 5}))
    assert ran == ["tnews", "ocnli", "cmrc2018"]


def test_a_run_with_other_settings_leaves_no_predictions_of_the_earlier_run_beside_its_results(tmp_path) -> None:
    """Evaluated into one output with two tasks, then with one task and other settings (another checkpoint
    alike): predictions/ held the first run's file of the other task, beside results.json of the second."""
    out = tmp_path / "eval"
    first = EvalConfig(oracle=True, tasks="tnews,ocnli", data_dir=str(require_clue()), output=str(out), limit=4)
    run_evaluation(first)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["ocnli.jsonl", "tnews.jsonl"]

    second = first.model_copy(update={"tasks": "tnews", "limit": 3})
    results = run_evaluation(second)
    assert list(results["tasks"]) == ["tnews"] and results["tasks"]["tnews"]["n"] == 3
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["tnews.jsonl"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["tnews.json"]
    assert len((out / "predictions" / "tnews.jsonl").read_text(encoding="utf-8").splitlines()) == 3

    # a task of the same settings that this run does not list stays, for a run that lists it again
    run_evaluation(second.model_copy(update={"tasks": "ocnli"}))
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["ocnli.jsonl", "tnews.jsonl"]
    assert plan_evaluation(second.model_copy(update={"tasks": "tnews,ocnli"})).todo == []


def test_a_task_without_data_is_reused_until_its_data_arrives(tmp_path, monkeypatch) -> None:
    import evaluation.harness as harness

    real_run_task = harness.run_task
    ran: list[str] = []
    monkeypatch.setattr(harness, "run_task", lambda task, *a, **k: ran.append(task.name) or real_run_task(task, *a, **k))
    data = tmp_path / "data" / "fewclue"
    data.mkdir(parents=True)
    # Linked, not copied: the loader follows symlinked directories (fsspec's find listed them as files).
    (data / "tnews").symlink_to(require_clue() / "fewclue" / "tnews")
    config = EvalConfig(oracle=True, tasks="tnews,ocnli", data_dir=str(tmp_path / "data"), output=str(tmp_path / "eval"),
                        limit=5)
    first = run_evaluation(config)
    assert [t["status"] for t in first["tasks"].values()] == ["ok", "not_found"] and ran == ["tnews", "ocnli"]
    ran.clear()
    assert run_evaluation(config) == first and ran == []  # still missing: nothing runs
    (data / "ocnli").symlink_to(require_clue() / "fewclue" / "ocnli")
    assert run_evaluation(config)["tasks"]["ocnli"]["status"] == "ok" and ran == ["ocnli"]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_data_dir_that_is_not_a_directory_is_refused_before_anything_is_written(tmp_path, kind) -> None:
    data = tmp_path / "data"
    if kind == "file":
        data.write_text("{}", encoding="utf-8")
    error = NotADirectoryError if kind == "file" else FileNotFoundError
    out = tmp_path / "eval"
    config = EvalConfig(oracle=True, tasks="tnews,ocnli", data_dir=str(data), output=str(out))
    with pytest.raises(error, match=f"data directory {data} "):
        run_evaluation(config)
    assert not out.exists()
    with pytest.raises(error, match=f"data directory {data} "):
        evaluate(OracleScorer(), "tnews", str(data))
    # An existing directory without any task's data (a wrong --data-dir) is refused too: it used to give an
    # empty report and exit 0. One with some of them runs those, and records the others as not found (above).
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"--data-dir {tmp_path / 'empty'} holds data for none of the 2 "
                                                r"task\(s\) asked for \(tnews, ocnli\)"):
        run_evaluation(config.model_copy(update={"data_dir": str(tmp_path / "empty")}))
    assert not out.exists()
    # The built-in set (what `pangu eval` reads without --data-dir) is named as such, with the tasks it has: the
    # advice to leave --data-dir out was what the user had done.
    (tmp_path / "empty" / "_EVAL.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"the built-in evaluation set .* holds none of the 2 task\(s\) asked "
                                                r"for \(tnews, ocnli\): its tasks are thucnews_title, .* give --data-dir"):
        run_evaluation(config.model_copy(update={"data_dir": str(tmp_path / "empty")}))


@pytest.mark.parametrize("device, cuda, refused", [
    ("cpu", (False, 0), None),
    ("cuda", (True, 1), None),
    ("cuda:1", (True, 2), None),
    ("tpu", (True, 2), "--device 'tpu' is not a device: give cpu, cuda or cuda:N"),
    ("", (True, 2), "--device '' is not a device"),
    ("cuda:x", (True, 2), "--device 'cuda:x' is not a device"),
    ("meta", (True, 2), "--device 'meta': the model runs on cpu, cuda or cuda:N, not meta"),
    ("cuda", (False, 0), "--device 'cuda': CUDA is not available"),
    ("cuda:0", (False, 0), "--device 'cuda:0': CUDA is not available"),
    ("cuda:2", (True, 2), r"--device 'cuda:2': this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"),
    ("cuda:1", (True, 1), r"--device 'cuda:1': this machine has 1 CUDA device \(cuda:0\)$"),
])
def test_a_device_is_checked_before_the_model_is_loaded(device, cuda, refused, monkeypatch) -> None:
    """cpu, cuda and cuda:N of a GPU PyTorch sees are kept; anything else is one ValueError naming --device
    (`tpu` used to reach safetensors, whose error blamed the export; `cuda` without CUDA a traceback)."""
    import torch

    from evaluation.model_io import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda[1])
    if refused is None:
        assert check_device(device) == device
    else:
        with pytest.raises(ValueError, match=refused):
            check_device(device)


def test_the_checkpoint_hash_is_remembered_until_the_weights_change(tmp_path, monkeypatch) -> None:
    """The resume key hashed every byte of model.safetensors on each `pangu eval`, a rerun whose tasks are
    all finished included (minutes at 13B and above); an unchanged file is now hashed once."""
    import os
    import shutil

    import cleaning.inputs
    from evaluation.harness import run_key

    monkeypatch.setenv("PANGU_HOME", str(tmp_path / "home"))
    export = shutil.copytree(checkpoint_dir(), tmp_path / "export")
    hashed = []
    real = cleaning.inputs.content_hash
    monkeypatch.setattr(cleaning.inputs, "content_hash", lambda uri: hashed.append(uri) or real(uri))
    config = EvalConfig(checkpoint=str(export), tasks="tnews", data_dir=str(tmp_path), output=str(tmp_path / "eval"))
    first = run_key(config)
    assert run_key(config) == first and len(hashed) == 1
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the same size: a different last weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    changed = run_key(config)
    assert len(hashed) == 2 and changed["checkpoint_xxh3"] != first["checkpoint_xxh3"]
    assert changed["settings"] == first["settings"]


def test_a_task_stopped_midway_goes_on_from_the_predictions_it_kept(tmp_path, monkeypatch) -> None:
    """A task used to be kept only when it ended: a stop in the middle of a long task lost all of its examples."""
    from evaluation.resume import PARTIAL_DIR, PREDICTIONS_DIR

    config = EvalConfig(checkpoint=str(checkpoint_dir()), tasks="tnews,cmrc2018", data_dir=str(require_clue()),
                        output=str(tmp_path / "eval"), limit=12)
    whole = run_evaluation(config.model_copy(update={"output": str(tmp_path / "whole")}))
    seen: list[str] = []
    stop_at: list[int] = [5]
    real_score, real_generate = ModelScorer.score, ModelScorer.generate

    def stopping(real):
        def call(self, context, item, *args):
            seen.append(item.id)
            if len(seen) == stop_at[0]:
                raise KeyboardInterrupt  # a Ctrl-C, or a SIGTERM raised as an exception, in the 5th example
            return real(self, context, item, *args)
        return call

    monkeypatch.setattr(ModelScorer, "score", stopping(real_score))
    monkeypatch.setattr(ModelScorer, "generate", stopping(real_generate))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    partial = json.loads((tmp_path / "eval" / PARTIAL_DIR / "tnews.json").read_text(encoding="utf-8"))
    assert [p["id"] for p in partial["predictions"]] == seen[:4]

    seen.clear()
    stop_at[0] = 8 + 3  # the rest of TNEWS, then stopped in CMRC2018's 3rd example
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    assert len(seen) == 11 and seen[:8] == [json.loads(line)["id"] for line in
                                            (tmp_path / "whole" / PREDICTIONS_DIR / "tnews.jsonl").open()][4:]
    assert not (tmp_path / "eval" / PARTIAL_DIR / "tnews.json").exists()  # finished: kept as a task

    seen.clear()
    stop_at[0] = 0
    again = run_evaluation(config)
    assert len(seen) == 10  # CMRC2018's examples 3 to 12
    for task in ("tnews", "cmrc2018"):
        assert again["tasks"][task]["scores"] == whole["tasks"][task]["scores"]
        assert again["tasks"][task].get("ppl_variants") == whole["tasks"][task].get("ppl_variants")
        assert ((tmp_path / "eval" / PREDICTIONS_DIR / f"{task}.jsonl").read_bytes()
                == (tmp_path / "whole" / PREDICTIONS_DIR / f"{task}.jsonl").read_bytes())
    assert not list((tmp_path / "eval" / PARTIAL_DIR).iterdir())


def test_an_unfinished_task_is_kept_every_interval_and_other_settings_do_not_resume_it(tmp_path) -> None:
    from evaluation.harness import run_task
    from evaluation.resume import keep_partial, partial_predictions
    from evaluation.tasks import TASKS

    kept: list[int] = []
    run = run_task(TASKS["tnews"], OracleScorer(), str(require_clue()), limit=6,
                   keep=lambda predictions: kept.append(len(predictions)), keep_every_s=0)
    assert kept == [1, 2, 3, 4, 5, 6]  # a kill -9 loses at most one interval
    keep_partial(tmp_path, {"seed": 1}, "tnews", run.predictions[:3])
    assert partial_predictions(tmp_path, {"seed": 1}, "tnews") == run.predictions[:3]
    assert partial_predictions(tmp_path, {"seed": 2}, "tnews") == []
    # predictions kept from other data (another subset) are scored again from the first that differs
    other = [dict(run.predictions[0]), dict(run.predictions[1], id="elsewhere")]
    again = run_task(TASKS["tnews"], OracleScorer(), str(require_clue()), limit=6, resumed=other)
    assert again.predictions[0] is other[0] and again.predictions[1] is not other[1]
    assert again.predictions == run.predictions and again.summary["scores"] == run.summary["scores"]
