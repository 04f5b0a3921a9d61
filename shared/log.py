"""Logging for every daemon: structlog, JSON lines in production, readable in a terminal.

Each daemon binds ``service`` (and its name) once; request-scoped lines carry ``rid``, the id the
gateway gave the request, so ``grep rid=...`` (or a JSON query) follows it through every daemon.
Logs go to stderr, which systemd's journal collects.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(service: str, fmt: str = "auto", level: str = "info", **context: object):
    """Configure structlog for this process and return a logger bound to the service."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(service=service, **context)
