"""YAML as the configs read it: a file of fields, or one `--set` value. A typo in either is one line that
names the file (or the override) and where it went wrong, not the parser's traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The fields of a YAML config file ({} when it is empty)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({_problem(exc)})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file (not UTF-8 at byte {exc.start})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of `field: value` lines, not a {type(data).__name__}")
    return data


def parse_value(text: str, where: str) -> Any:
    """One YAML value (`3e-4`, `[0.9, 0.95]`, `null`, a string) of the override `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: the value is not valid YAML ({_problem(exc)})") from exc
