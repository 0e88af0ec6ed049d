"""One run per output directory at a time (training runs, evaluations).

Two runs started into the same output (a double start, a rerun while the first still trains) both trained
from the latest checkpoint, wrote the same checkpoint files at once and interleaved their metrics rows. The
first rank 0 holds an exclusive `flock` on the output directory itself for as long as its process lives (the
kernel releases it when the process ends, a `kill -9` included; no lock file is left behind); a second one is
refused, naming the holder's pid where /proc/locks shows it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class OutputInUse(OSError):
    """Another process writes into this output now."""


def claim_output(output: Path) -> int | None:
    """Hold `output` (made if missing) for this process; returns the descriptor that holds it (closing it releases
    the claim). Raises OutputInUse when another process holds it; None where the file system has no `flock`
    (some network file systems), which leaves the output unguarded."""
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputInUse(f"{output}: another run is writing there ({_holder(output)}); wait for it to "
                          f"end or give another output") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def check_output_free(output: Path) -> None:
    """Raise OutputInUse when a run holds `output` now (an existing directory is claimed and released at
    once; a missing one is free)."""
    if output.is_dir():
        fd = claim_output(output)
        if fd is not None:
            os.close(fd)


def _holder(output: Path) -> str:
    """`pid N, COMMAND` of the process holding a flock on `output`, from /proc/locks (Linux, same host)."""
    inode = os.stat(output).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE":
            if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit() and int(fields[4]) != os.getpid():
                return f"pid {fields[4]}{_command(int(fields[4]))}"
    return "another process"


def _command(pid: int, shown: int = 120) -> str:
    """`, COMMAND LINE` of process `pid` (its program's name without its directory), or nothing."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return ""
    if not argv or not argv[0]:
        return ""
    line = " ".join([os.path.basename(argv[0]), *argv[1:]])
    return ", " + (line if len(line) <= shown else line[:shown - 3] + "...")
