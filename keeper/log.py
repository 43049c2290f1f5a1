"""Logging: structlog JSON lines on stderr (pretty on a TTY), one renderer for everything.

Standard-library loggers (apscheduler, urllib3, sqlalchemy, alembic) go through the same
processors, so the redaction processor sees every line keeper writes.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

#: Field names whose values are never logged.
SECRET_FIELDS = frozenset(
    {"access_token", "refresh_token", "code", "secret", "appsecret", "password", "key", "token"}
)
_QUERY_SECRET = re.compile(
    r"(?i)\b(access_token|refresh_token|code|secret|appsecret|password)=([^&\s\"'<>]+)"
)
_JSON_SECRET = re.compile(
    r"(?i)([\"'](?:access_token|refresh_token|code|secret)[\"']\s*:\s*[\"'])([^\"']+)"
)
REDACTED = "[redacted]"

_known_secrets: set[str] = set()
_known_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Scrub this exact string (an AppSecret, say) from every log line from now on."""
    if value and len(value) >= 6:
        with _known_lock:
            _known_secrets.add(value)


def scrub(text: str) -> str:
    """``text`` with query-string and JSON secrets and every registered secret masked."""
    if "=" in text or ":" in text:  # both patterns need one (most values have neither)
        text = _scrub_patterns(text)
    for secret in tuple(_known_secrets):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_patterns(text: str) -> str:
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _JSON_SECRET.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if k in SECRET_FIELDS else _scrub_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: drop secret fields, mask secrets inside strings."""
    for key in list(event_dict):
        if key in SECRET_FIELDS:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub_value(event_dict[key])
    return event_dict


#: Free-text lines of libraries that would reach journald during a database outage or a long
#: sweep, and the structured event each becomes (at debug level, so silent at info):
#: - APScheduler skips a sweep that comes due while the last one still runs; the next one
#:   starts when it is due after that (coalesce), so there is nothing to act on;
#: - psycopg and SQLAlchemy's pool report the failure of closing or resetting a connection
#:   that already failed; keeper reports the outage itself, once, as database.unavailable.
_QUIETED = (
    ("apscheduler", "maximum number of running instances reached", "sweep.skipped"),
    ("psycopg", "error ignored", "database.connection_discarded"),
    ("sqlalchemy.pool", "Exception during reset", "database.connection_discarded"),
    ("sqlalchemy.pool", "Exception closing connection", "database.connection_discarded"),
)


class _Quiet(logging.Filter):
    """Turns the library lines in :data:`_QUIETED` into debug events (see there for why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for prefix, needle, event in _QUIETED:
            if record.name.startswith(prefix) and needle in str(record.msg):
                if logging.getLogger().level > logging.DEBUG:
                    return False
                record.msg, record.args = event, ()
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return True
        return True


def _pre_chain() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure(level: str = "info", *, pretty: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``pretty``: coloured console lines; by default when stderr is a TTY.
    """
    if pretty is None:
        pretty = sys.stderr.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if pretty
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    # Exceptions are rendered to text first so the redaction processor sees the traceback.
    final: Iterable[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(), processors=list(final)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_Quiet())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 logs full URLs (with tokens) at DEBUG; SQLAlchemy echoes parameters at INFO.
    for noisy in ("urllib3", "sqlalchemy", "alembic.runtime.migration", "apscheduler", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_pre_chain(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def set_level(level: str) -> None:
    """Change the level of a configured process (on SIGHUP, say)."""
    logging.getLogger().setLevel(level.upper())
