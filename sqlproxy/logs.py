"""Log output: lines shaped like Google's proxy's, or one JSON object per line."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(message)s"
TEXT_DATEFMT = "%Y/%m/%d %H:%M:%S"
# Cloud Logging reads "severity" from JSON lines; these are its names for Python's levels.
SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


def fields(**values: Any) -> dict[str, Any]:
    """fields attaches structured fields to a log call: ``logger.info(..., extra=fields(...))``."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """JsonFormatter writes severity, message, timestamp and the record's fields as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": SEVERITY.get(record.levelno, record.levelname),
            "message": record.getMessage(),
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "logger": record.name,
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self._level


def configure(*, debug: bool = False, quiet: bool = False, structured: bool = False) -> None:
    """configure sends info lines to stdout and warnings and errors to stderr, like Go's proxy.

    ``quiet`` keeps only errors; ``debug`` adds debug lines; ``structured`` writes JSON lines.
    Libraries' own loggers stay at WARNING so they cannot flood or leak request details.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter: logging.Formatter = (
        JsonFormatter() if structured else logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT)
    )
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
