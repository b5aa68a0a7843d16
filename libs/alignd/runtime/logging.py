"""structlog JSON logging shared by every alignd process.

Event names are constants (snake_case verbs: "server_started",
"weights_updated"); variable data goes in key/value fields. Prompts, responses
and secrets are only ever logged at DEBUG.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str = "info", *, role: str | None = None, stream=None) -> None:
    """Configures structlog to write one JSON object per line.

    Context bound with `structlog.contextvars.bind_contextvars` (the request
    id, the role) is merged into every event.
    """
    global _configured
    lvl = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    if role is not None:
        structlog.contextvars.bind_contextvars(role=role)
    _configured = True


def get_logger(name: str | None = None):
    if not _configured:
        configure_logging()
    # Lazy: resolves the configuration at each use, so loggers created at
    # import time follow a later configure_logging().
    return structlog.get_logger(component=name) if name else structlog.get_logger()
