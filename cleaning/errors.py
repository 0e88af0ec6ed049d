"""One line for a user's mistake: what the command lines print instead of a traceback.

pydantic's ValidationError (a ValueError) spreads each error over three lines and a link; a bad `--set`
or YAML field should read as one line that names the field, the rule and the value given.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

USAGE_ERROR = 2  # argparse's own exit code for a bad command line; ours for every expected error


def is_user_error(exc: BaseException) -> bool:
    """A mistake the user can fix (a missing path or asset, a mismatch, an invalid value): a message is
    enough. Anything else is a bug and keeps its traceback."""
    return isinstance(exc, (OSError, ValueError, KeyError))


class ReportedFailure(RuntimeError):
    """A failure whose message says what the user needs (a training job that exited non-zero, with its last
    lines and what its exit means): not the user's mistake (exit 1, not 2), but the traceback of the code that
    noticed it adds nothing, so the terminal shows the message alone."""


def needs_no_traceback(exc: BaseException) -> bool:
    """A user's mistake, or a failure its message reports whole: the terminal shows one line of it."""
    return is_user_error(exc) or isinstance(exc, ReportedFailure)


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


def reported_as_user_error(command: str, exc: BaseException) -> bool:
    """Prints `COMMAND: error: ...` on standard error when `exc` is a user's mistake, and says whether it did;
    a bug (or any error with PANGU_DEBUG=1) is left to its traceback."""
    if not is_user_error(exc) or os.environ.get("PANGU_DEBUG"):
        return False
    print(f"{command}: error: {one_line(exc)}", file=sys.stderr)
    return True


@contextmanager
def user_errors_in_one_line(command: str) -> Iterator[None]:
    """A command's body: a user's mistake inside it ends the command with one line and exit 2, as argparse
    ends a bad command line."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs right here
        if not reported_as_user_error(command, exc):
            raise
        raise SystemExit(USAGE_ERROR) from None


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` no smaller than `minimum` (a count of 0 workers, nodes or steps, or a
    negative size, is a typo, refused with the flag's name like any other bad value)."""
    def parse(text: str) -> Any:
        value = kind(text)  # not a number: argparse's own "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} (got {text})")
        return value

    parse.__name__ = kind.__name__
    return parse
