"""`pangu eval`, `pangu model export-hf` and `pangu model generate` given what cannot run: one `error:` line
that names the option and the value, exit 2, refused before the weights are read (or the built-in set
fetched), nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_eval_common import VOCAB, checkpoint_dir, require_clue, tokenizer_dir

DOMAIN_NAMES = ["ebooks", "news", "public_datasets", "web"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A dense `tiny` export, a PanGu-Σ `sigma-tiny` export with its domain map, and a `tiny` export whose
    vocabulary (1,000) is smaller than the tokenizer's (2,000), each with the test tokenizer."""
    from pangu_model import PanguModel, get_config, save_checkpoint

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    sigma = save_checkpoint(PanguModel(get_config("sigma-tiny", vocab_size=VOCAB, dropout=0.0)), root / "sigma")
    shutil.copytree(tokenizer_dir(), sigma / "tokenizer")
    (sigma / "domains.json").write_text(json.dumps({
        "id_to_name": {str(i): name for i, name in enumerate(DOMAIN_NAMES)},
        "domains": {name: {"id": i, "tokens": 100 * (i + 1)} for i, name in enumerate(DOMAIN_NAMES)},
    }), encoding="utf-8")
    small = save_checkpoint(PanguModel(get_config("tiny", vocab_size=1000, dropout=0.0)), root / "small")
    return {"dense": checkpoint_dir(), "sigma": sigma, "small": small}


def _run(*args: str, capsys) -> tuple[int, str]:
    from flows.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


# case → (command line, fragments of the error line, CUDA as this case's machine has it: (available, count))
CASES = {
    "eval device tpu": (["eval", "--checkpoint", "{dense}", "--device", "tpu"],
                        ["--device 'tpu' is not a device", "cpu, cuda or cuda:N"], None),
    "eval device mps": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{out}", "--device",
                         "mps"], ["--device 'mps'", "cpu, cuda or cuda:N, not mps"], None),
    "eval device cuda without a GPU": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{out}",
                                       "--device", "cuda"], ["--device 'cuda': CUDA is not available"], (False, 0)),
    "eval device cuda:3 of 2 GPUs": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{out}",
                                     "--device", "cuda:3"],
                                    ["--device 'cuda:3': this machine has 2 CUDA devices (cuda:0 to cuda:1)"], (True, 2)),
    "eval domain of a dense export": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{out}",
                                      "--domain", "news"],
                                     ["--domain 'news'", "is a dense PanGu-α model (no experts)", "PanGu-Σ domain"], None),
    "export-hf domain of a dense export": (["model", "export-hf", "{dense}", "--output", "{out}", "--domain", "news"],
                                          ["pangu model export-hf: error: --domain 'news'", "dense PanGu-α"], None),
    "export-hf unknown domain of a sigma export": (["model", "export-hf", "{sigma}", "--output", "{out}", "--domain",
                                                   "nosuch"], ["--domain 'nosuch' is not one of this model's domains",
                                                               "1 news"], None),
    "eval negative domain of a sigma export": (["eval", "--checkpoint", "{sigma}", "--data-dir", "{data}", "--output",
                                               "{out}", "--domain", "-1"],
                                              ["--domain -1 is outside this model's domains"], None),
    "eval tokenizer larger than the model": (["eval", "--checkpoint", "{small}", "--tokenizer", "{tokenizer}",
                                              "--data-dir", "{data}", "--output", "{out}"],
                                             ["tokenizer has 2000 pieces but the model only 1000"], None),
    "export-hf tokenizer larger than the model": (["model", "export-hf", "{small}", "--tokenizer", "{tokenizer}",
                                                   "--output", "{out}"],
                                                  ["tokenizer has 2000 pieces but the model only 1000"], None),
    "eval output is a file": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{file}"],
                              ["--output {file} is a file, not a directory"], None),
    "export-hf output is a file": (["model", "export-hf", "{dense}", "--output", "{file}"],
                                   ["--output {file} is a file, not a directory"], None),
    "export-hf output under a file": (["model", "export-hf", "{dense}", "--output", "{file}/hf"],
                                      ["--output {file}/hf is under {file}, a file, not a directory"], None),
    "eval tasks naming none": (["eval", "--checkpoint", "{dense}", "--data-dir", "{data}", "--output", "{out}",
                               "--tasks", ","], ["--tasks ',' names no task"], None),
    "eval without a checkpoint": (["eval", "--data-dir", "{data}", "--output", "{out}"],
                                  ["give --checkpoint (or --oracle)"], None),
    "eval shots beyond the train split": (["eval", "--checkpoint", "{dense}", "--data-dir", "{clue}", "--output",
                                           "{out}", "--tasks", "tnews", "--shots", "100000"],
                                          ["--shots 100000: tnews's train split", "gives at most"], None),
    "export-hf into an export": (["model", "export-hf", "{sigma}", "--output", "{dense}"],
                                 ["--output {dense} holds something else (config.json", "a transformers directory "
                                  "goes to a new or empty directory"], None),
    "generate prompt the model cannot continue": (["model", "generate", "{dense}", "中国的首都是北京。" * 40],
                                                  ["prompt 1 is", "tokens: the model reads at most 128 (max_seq_len)",
                                                   "shorten it"], None),
    "generate temperature 0": (["model", "generate", "{dense}", "--temperature", "0"],
                               ["temperature must be > 0 (got 0.0)"], None),
    "generate top-p above 1": (["model", "generate", "{dense}", "--top-p", "1.5"], ["top_p must be in (0, 1]"], None),
    "generate domain of a dense export": (["model", "generate", "{dense}", "--domain", "news"],
                                          ["--domain 'news'", "dense PanGu-α"], None),
    "generate device tpu": (["model", "generate", "{sigma}", "--device", "tpu"], ["--device 'tpu' is not a device"],
                            None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_cannot_run_is_one_line_before_the_weights_are_read(case, exports, tmp_path, monkeypatch, capsys):
    """`--device tpu` used to end in safetensors' error blamed on the export, `--device cuda` on a machine
    without CUDA in a traceback; `--domain` of a dense export was ignored, `--shots` beyond the train split
    clamped and `--tasks ,` ran nothing, silently; an --output that is a file was found only after the tasks
    ran; a tokenizer that does not fit only after the weights were loaded."""
    import evaluation.model_io

    args, expected, cuda = CASES[case]
    monkeypatch.delenv("PANGU_DEBUG", raising=False)
    if cuda is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda[1])

    def weights_read(*args, **kwargs):
        raise AssertionError("the weights were read before the command was refused")

    monkeypatch.setattr(evaluation.model_io, "load_checkpoint", weights_read)
    (tmp_path / "data").mkdir()
    afile = tmp_path / "afile"
    afile.write_text("kept\n", encoding="utf-8")
    places = {"dense": exports["dense"], "sigma": exports["sigma"], "small": exports["small"],
              "tokenizer": tokenizer_dir(), "data": tmp_path / "data", "out": tmp_path / "out", "file": afile,
              "clue": require_clue() if "{clue}" in args else None}
    code, err = _run(*(arg.format(**places) for arg in args), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"pangu {' '.join(args[:2]) if args[0] == 'model' else 'eval'}: error: "), lines
    for fragment in expected:
        assert fragment.format(**places) in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and afile.read_text(encoding="utf-8") == "kept\n"
    assert not (exports["dense"].parent / "eval").exists()


class _GoneStderr:
    """stderr after the reader of its pipe has gone (`pangu eval ... 2>&1 | head`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_progress_in_a_log_marks_starts_tenths_and_ends_and_a_gone_stderr_fails_no_task(monkeypatch, capsys):
    from flows.cli import _eval_progress

    progress = _eval_progress(terminal=False)
    for done in range(1, 21):
        progress("tnews", done, 20)
    progress("ocnli", 7, 30)  # goes on from 7 examples an unfinished run kept
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == (["[pangu] tnews: 1/20"] + [f"[pangu] tnews: {n}/20" for n in range(2, 21, 2)]
                     + ["[pangu] ocnli: 7/30"])

    monkeypatch.setattr("sys.stderr", _GoneStderr())
    for terminal in (False, True):
        progress = _eval_progress(terminal)
        for done in range(1, 4):
            progress("tnews", done, 3)  # raised BrokenPipeError inside the task, which was then recorded as failed
