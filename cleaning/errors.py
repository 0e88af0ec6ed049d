"""One line for a user's mistake: what the command lines print instead of a traceback.

pydantic's ValidationError (a ValueError) spreads each error over three lines and a link; a bad `--set`
or YAML field should read as one line that names the field, the rule and the value given.
"""
from __future__ import annotations

from typing import Any


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def one_line(exc: BaseException) -> str:
    """`exc` as one line: a pydantic validation error as `invalid MODEL: field: rule (got VALUE); ...`,
    anything else as its text with its line breaks folded."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and hasattr(exc, "title"):  # pydantic.ValidationError, without importing pydantic
        try:
            parts = []
            for error in errors():
                message = str(error.get("msg", "")).removeprefix("Value error, ")
                where = ".".join(str(part) for part in error.get("loc", ()))
                value = error.get("input")
                given = "" if not where or isinstance(value, (dict, list)) else f" (got {_shown(value)})"
                parts.append(f"{where}: {message}{given}" if where else message)
            return f"invalid {exc.title}: " + "; ".join(parts)
        except Exception:  # noqa: BLE001 - an unexpected shape: the plain text below
            pass
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).replace(":\n  - ", ": ").replace("\n  - ", "; ").split()) or type(exc).__name__
