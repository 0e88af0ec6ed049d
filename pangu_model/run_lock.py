"""One training run per output directory at a time.

Two runs started into the same output (a double start, a rerun while the first still trains) both trained
from the latest checkpoint, wrote the same checkpoint files at once and interleaved their metrics rows. The
first rank 0 holds an exclusive `flock` on `OUTPUT/.run.lock` for as long as its process lives (the kernel
releases it when the process ends, a `kill -9` included); a second one is refused, naming the holder.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".run.lock"


class OutputInUse(OSError):
    """Another process trains into this output now."""


def claim_output(output: Path) -> IO[str] | None:
    """Hold OUTPUT/.run.lock for this process (keep the returned handle; closing it releases the claim).
    Raises OutputInUse when another process holds it; None where the file system has no `flock` (some network
    file systems), which leaves the output unguarded."""
    output.mkdir(parents=True, exist_ok=True)
    handle = open(output / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputInUse(f"{output}: another training run is writing there ({holder}); wait for it to end "
                          f"or give another output") from None
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def check_output_free(output: Path) -> None:
    """Raise OutputInUse when a training run holds `output` now (claimed and released at once)."""
    if (output / LOCK_NAME).exists():
        handle = claim_output(output)
        if handle is not None:
            handle.close()
