"""Expected errors of the `pangu` command line: one clear line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
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
                    "no-such-export/config.json")
    assert not (tmp_path / "run").exists()


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


def test_the_training_program_says_a_config_error_in_one_line(tmp_path, capsys):
    """`python -m pangu_model.train` (what torchrun and the flows start) with a field out of range."""
    from pangu_model.train import main

    config = tmp_path / "train.yaml"
    config.write_text(f"model: tiny\ndata: {tmp_path}\noutput: {tmp_path / 'run'}\nzero_stage: 7\n")
    assert main(["--config", str(config), "--set", "optimizer.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pangu_model.train: invalid TrainConfig: optimizer.lr: Input should be a valid number, unable to "
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
