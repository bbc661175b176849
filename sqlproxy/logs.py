"""Log output: lines shaped like Google's proxy (``YYYY/MM/DD HH:MM:SS message``)."""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(message)s"
TEXT_DATEFMT = "%Y/%m/%d %H:%M:%S"


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATEFMT)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self._level


def configure(*, debug: bool = False, quiet: bool = False) -> None:
    """configure sends info lines to stdout and warnings and errors to stderr, like Go's proxy.

    ``quiet`` keeps only errors; ``debug`` adds debug lines. Libraries' own loggers stay at
    WARNING so their messages cannot flood or leak request details.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = _TextFormatter()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.ERROR if quiet else logging.DEBUG if debug else logging.INFO
    logging.getLogger("sqlproxy").setLevel(level)
    # The connector logs refresh failures with tracebacks of its own; sqlproxy's dialer
    # reports them in one line instead.
    logging.getLogger("google.cloud.sql.connector").setLevel(logging.CRITICAL)
