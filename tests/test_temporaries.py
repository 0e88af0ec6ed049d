"""Temporary files named after their writer: a killed writer's leftovers are removed, files being
written by a live process are not."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cleaning.temporaries import (_host_tag, is_orphaned_temporary, process_alive, remove_orphaned_temporaries,
                                  temporary_directory, temporary_path)


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not process_alive(proc.pid)
    return proc.pid


def test_a_writer_that_has_ended_but_is_not_yet_reaped_is_gone():
    """A worker killed with its job stays a zombie until init reaps it; its temporaries are leftovers (a rerun
    on a busy machine kept one and found it after the build)."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.05)
        assert not process_alive(proc.pid)
    finally:
        proc.wait()
    assert process_alive(os.getpid())


def left_by_a_killed_writer(target) -> Path:
    """The temporary name a writer of `target` that has since died used."""
    return Path(temporary_path(str(target)).replace(f".{os.getpid()}-", f".{dead_pid()}-", 1))


def test_a_temporary_names_its_writer_and_counts_as_orphaned_only_once_the_writer_is_gone(tmp_path):
    mine = os.path.basename(temporary_path(str(tmp_path / "00000.npy")))
    assert mine.startswith(f".00000.npy.{os.getpid()}-{_host_tag()}-") and mine.endswith(".tmp")
    assert not is_orphaned_temporary(mine)  # this process is writing it
    dead = mine.replace(f".{os.getpid()}-", f".{dead_pid()}-")
    assert is_orphaned_temporary(dead)
    other_host = mine.replace(_host_tag(), _host_tag("another-host"))
    assert not is_orphaned_temporary(other_host.replace(f".{os.getpid()}-", f".{dead_pid()}-"))
    assert is_orphaned_temporary(".00000.npy.0a1b2c3d.tmp")  # named before writers were tagged
    for name in ("00000.npy", ".model.safetensors.tmp", "notes.tmp", ".hidden"):
        assert not is_orphaned_temporary(name)


def test_remove_orphaned_temporaries_removes_leftovers_at_any_depth_and_keeps_live_writes(tmp_path):
    pid = dead_pid()
    left = [tmp_path / "a" / f".00000.npy.{pid}-{_host_tag()}-0a1b2c3d.tmp",
            tmp_path / "a" / "b" / "c" / f".summary.json.{pid}-{_host_tag()}-0a1b2c3e.tmp"]
    folder = tmp_path / f".spm.model.{pid}-{_host_tag()}-0a1b2c3f.tmp"  # a directory, with files inside
    live = tmp_path / "a" / os.path.basename(temporary_path(str(tmp_path / "a" / "00001.npy")))
    kept = [tmp_path / "a" / "00000.npy", live]
    for path in left + kept + [folder / "spm.model"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = remove_orphaned_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in left + [folder])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left + [folder])
    assert remove_orphaned_temporaries(str(tmp_path)) == []
    assert remove_orphaned_temporaries(str(tmp_path / "missing")) == []


def test_a_temporary_directory_replaces_what_killed_builders_of_its_target_left(tmp_path):
    killed = left_by_a_killed_writer(tmp_path / "tok")
    killed.mkdir()
    (killed / "spm.model").write_bytes(b"partial")
    other = left_by_a_killed_writer(tmp_path / "other")  # another target's: not this builder's to remove
    other.mkdir()
    with temporary_directory(tmp_path / "tok") as work:
        assert work.is_dir() and work.parent == tmp_path and work.name.startswith(".tok.")
        assert not killed.exists() and other.exists()
        (work / "out").mkdir()
        (work / "out").rename(tmp_path / "tok")
    assert not work.exists() and (tmp_path / "tok").is_dir()
    try:
        with temporary_directory(tmp_path / "tok") as work:
            (work / "part").write_bytes(b"x")
            raise RuntimeError("the build failed")
    except RuntimeError:
        pass
    assert not work.exists()
