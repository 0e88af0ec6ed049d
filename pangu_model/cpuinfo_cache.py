"""DeepSpeed's questions about the host CPU, answered once per environment (`import pangu_model` installs it).

Kept apart from `pangu_model.ops` (which builds the ops) so that the package's import does not import the
module that `python -m pangu_model.ops` runs.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from cleaning.writers import write_json_atomic


def _cpu_key() -> str | None:
    """The host CPU's identity: /proc/cpuinfo without its clock readings, hashed (None off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    stable = "\n".join(line for line in text.splitlines() if not line.startswith("cpu MHz"))
    return hashlib.sha256(stable.encode()).hexdigest()[:16]


def remember_cpu_info() -> None:
    """DeepSpeed asks py-cpuinfo about the host CPU each time it loads an op (the architecture and SIMD flags
    make the op's compiler flags, part of its build hash) and CPU Adam asks for the vendor. py-cpuinfo probes
    in a new Python process each time, about 1.2 s: 2 probes in every CPU rank (the shared-memory collectives)
    and 3 in an ECSS rank, 2.3-3.5 s of each rank's start-up. After this the first answer is kept, in the
    process and in TORCH_EXTENSIONS_DIR beside the ops built with it (one file per CPU: `_cpu_key`)."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed falls back to lscpu
        return
    probe: Callable[[], dict[str, Any]] = cpuinfo.get_cpu_info
    if getattr(probe, "remembered", False):
        return

    @functools.cache
    def answer() -> dict[str, Any]:  # read or probed when DeepSpeed first asks, not at import
        key = _cpu_key()
        kept = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / f"cpuinfo-{key}.json" if key else None
        if kept is not None:
            try:
                return json.loads(kept.read_text())
            except (OSError, ValueError):
                pass
        info = probe()
        if kept is not None:
            try:
                write_json_atomic(kept, info)
            except OSError:  # a read-only environment probes again next time
                pass
        return info

    def get_cpu_info() -> dict[str, Any]:
        return copy.deepcopy(answer())  # callers may change their copy

    get_cpu_info.remembered = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info
