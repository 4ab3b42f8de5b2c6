"""Logging: a request id on every line, text or JSON, to stderr or a file.

Nothing here ever sees a token: request paths are logged as route templates, and
the access log redacts query strings (see `server.AccessLogger`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import random
import sys
import time
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")


def new_request_id() -> str:
    # For telling log lines apart, not a secret: no system call per request.
    return f"{random.getrandbits(48):012x}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def setup_logging(level: str, fmt: str, file: str | None) -> logging.Handler:
    """Configure the root logger; returns the handler (SIGHUP reopens a file handler)."""
    handler: logging.Handler
    if file:
        # Watched: a rotated-away file is noticed and reopened even without SIGHUP.
        handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def reopen(handler: logging.Handler) -> None:
    """SIGHUP: let logrotate's `create` mode work by reopening the file."""
    if isinstance(handler, logging.FileHandler):
        handler.acquire()
        try:
            handler.close()
            handler.stream = handler._open()
        finally:
            handler.release()
