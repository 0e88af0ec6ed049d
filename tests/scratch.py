"""A scratch directory per test session for module-level helpers that cannot take pytest fixtures."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_ROOTS: dict[str, Path] = {}


def session_dir(name: str) -> Path:
    """`pangu-NAME-tests-*`, made on first use and removed when the session ends."""
    if name not in _ROOTS:
        _ROOTS[name] = Path(tempfile.mkdtemp(prefix=f"pangu-{name}-tests-"))
        atexit.register(shutil.rmtree, _ROOTS[name], True)
    return _ROOTS[name]
