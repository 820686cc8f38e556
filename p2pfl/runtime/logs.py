"""structlog set-up: one JSON line per event, to a file per process, with bound context."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog


def configure(path: Path | None = None, level: str = "info", cache: bool = True) -> None:
    """Send this process's structlog events as JSON lines to `path` (stderr if None).

    `cache = False` (a library call inside someone else's process) keeps loggers
    uncached, so a later reconfiguration, such as `structlog.testing.capture_logs`,
    still reaches them.
    """
    stream: TextIO
    if path is None:
        stream = sys.stderr
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("a", buffering=1)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
