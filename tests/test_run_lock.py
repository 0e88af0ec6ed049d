"""One training run per output directory (pangu_model/run_lock.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pangu_model.run_lock import OutputInUse, check_output_free, claim_output
from tests.test_cli_errors import ROOT, _one_line_error, pangu
from tests.test_train_common import packed_tokens

HOLD = ("import sys, time; from pathlib import Path; from pangu_model.run_lock import claim_output; "
        "fd = claim_output(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


@pytest.fixture()
def held(tmp_path):
    """An output that another process (a training run) holds, until the fixture kills it with SIGKILL."""
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield output, holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_second_run_into_a_held_output_is_refused_and_a_killed_holder_frees_it(held) -> None:
    """Two runs into one output both trained, wrote the same checkpoints at once and interleaved their metrics;
    the second is refused now, naming the first, and a run killed with -9 leaves nothing that blocks a rerun."""
    output, holder = held
    with pytest.raises(OutputInUse, match=f"another run is writing there \\(pid {holder.pid}, .*-c import sys"):
        claim_output(output)
    with pytest.raises(OutputInUse):
        check_output_free(output)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    check_output_free(output)  # the kernel released the lock with the process
    fd = claim_output(output)
    assert fd is not None
    os.close(fd)


def test_pangu_pretrain_into_a_held_output_is_one_line_before_any_flow_run(held) -> None:
    output, holder = held
    done = pangu("pretrain", "--preset", "alpha-tiny", "--data", str(packed_tokens()), "--output", str(output),
                 "--steps", "2")
    _one_line_error(done, f"{output}: another run is writing there (pid {holder.pid}, ", "-c import sys, time;")
    assert "temporary server" not in done.stderr
    assert not any(output.iterdir())  # nothing written


def test_a_second_evaluation_into_a_held_output_is_one_line_and_writes_nothing(held) -> None:
    """Two evaluations into one output (a double start, a rerun while the first still ran) both computed every
    task and wrote the same files at once."""
    from tests.test_eval_common import require_clue

    output, holder = held
    done = pangu("eval", "--oracle", "--tasks", "tnews", "--data-dir", str(require_clue()), "--output", str(output),
                 "--limit", "5")
    _one_line_error(done, f"pangu eval: error: {output}: another run is writing there (pid {holder.pid}, ")
    assert not any(output.iterdir())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    done = pangu("eval", "--oracle", "--tasks", "tnews", "--data-dir", str(require_clue()), "--output", str(output),
                 "--limit", "5")
    assert done.returncode == 0 and (output / "results.json").is_file(), done.stderr[-2000:]
    # progress in a log too, not only in a terminal
    assert any(line.startswith("[pangu] tnews: 5/5 (") for line in done.stderr.splitlines()), done.stderr[-2000:]
