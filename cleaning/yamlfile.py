"""YAML as the configs read it: a file of fields, or one `--set` value. A typo in either is one line that
names the file (or the override) and where it went wrong, not the parser's traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml


def _problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def names_a_file(name_or_path: str | Path) -> bool:
    """Whether a `--preset`/`--config`/`--topology` argument is a file's path rather than a preset's name.
    A name may hold a dot (the model preset `2.6b`), so a path is one with a directory part, a YAML suffix,
    or a suffix and a file of that name."""
    path = Path(name_or_path)
    return len(path.parts) > 1 or path.suffix.lower() in YAML_SUFFIXES or (bool(path.suffix) and path.is_file())


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The fields of a YAML config file ({} when it is empty)."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory, not a YAML config file")
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


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` strings (`--set`) → {dotted key: YAML value}."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = parse_value(value, f"--set {item!r}")
    return overrides


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`data` (a config's fields) with `a.b=value` strings or {dotted key: value} set in place."""
    items = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    for dotted, value in items.items():
        keys = dotted.split(".")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {dotted}: {key} is a {type(target).__name__}, not a group of fields")
        target[keys[-1]] = value
    return data
