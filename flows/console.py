"""What the terminal shows of a failed task or flow run.

Prefect logs a failed run's exception with its traceback, to the run's log on the server and to the
terminal. For an error the user can fix (a vocabulary larger than the text allows, a missing path)
the terminal shows the one-line message only, as the `pangu` command line does for its own errors;
the run's log on the server keeps the traceback, for whoever reads it in the UI.
"""
from __future__ import annotations

import logging
import os
from typing import Callable


class _ExpectedErrorsInOneLine(logging.Formatter):
    """Formats like `inner`, without the traceback of an expected error."""

    def __init__(self, inner: logging.Formatter, is_expected: Callable[[BaseException], bool]) -> None:
        super().__init__()
        self.inner, self.is_expected = inner, is_expected

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not self.is_expected(error) or os.environ.get("PANGU_DEBUG"):
            return self.inner.format(record)
        # The record is shared with the server's log handler, which formatted it already: put back
        # what was taken.
        kept = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = kept


class _EachExpectedErrorOnce(logging.Filter):
    """Passes the first record of an expected error and drops the ones that repeat it: the task run's failure,
    then its failed state, the flow run's exception and its failed state, and those of each parent flow run
    said the same message four to seven times before the command's own `error:` line."""

    def __init__(self, is_expected: Callable[[BaseException], bool]) -> None:
        super().__init__()
        self.is_expected = is_expected
        self.shown: list[str] = []  # the opening of each expected error's message shown so far

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("PANGU_DEBUG"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and self.is_expected(error):
            opening = str(error).strip().splitlines()[0][:100] if str(error).strip() else ""
            if opening and opening in self.shown:
                return False
            self.shown.append(opening)
            return True
        text = record.getMessage()
        return not any(opening and opening in text for opening in self.shown)  # a failed state that repeats it


class _HeartbeatsAfterTheEnd(logging.Filter):
    """Drops the traceback of a flow run's heartbeat that found Prefect's event service stopped. The heartbeat
    thread checks the run's state, then sends: a SIGTERM or Ctrl-C between the two ends the run and stops the
    service, and the heartbeat of a run that is over (of no use to anyone) was logged as an error with its
    traceback after the command's own `terminated` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.name == "prefect.events.utilities" and "prefect.flow-run.heartbeat" in record.getMessage()
                    and isinstance(error, RuntimeError) and "stopped service instance" in str(error))


def expected_errors_in_one_line(is_expected: Callable[[BaseException], bool]) -> None:
    """Prefect's console handlers show an error for which `is_expected` holds without its traceback, once."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect configures logging once a process; later calls keep these handlers
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _ExpectedErrorsInOneLine):
            handler.setFormatter(_ExpectedErrorsInOneLine(handler.formatter or logging.Formatter(), is_expected))
            handler.addFilter(_EachExpectedErrorOnce(is_expected))
            handler.addFilter(_HeartbeatsAfterTheEnd())
