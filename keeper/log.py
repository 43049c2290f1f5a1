"""Logging: structlog JSON lines on stderr (pretty on a TTY), one renderer for everything.

Standard-library loggers (apscheduler, urllib3, sqlalchemy, alembic) go through the same
processors, so the redaction processor sees every line keeper writes.

A line written many times a second (the API's access log) may take :class:`DirectLogger`:
the same processors, renderer and handler, without the stdlib ``LogRecord`` built twice and
the caller's frame looked up, which were most of the line's cost.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
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

#: Replaced whole (under the lock) when one is added, never changed in place: a line being
#: scrubbed meanwhile reads the set it started with, without copying it.
_known_secrets: frozenset[str] = frozenset()
_known_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Scrub this exact string (an AppSecret, say) from every log line from now on."""
    global _known_secrets
    if value and len(value) >= 6:
        with _known_lock:
            _known_secrets = _known_secrets | {value}


def scrub(text: str) -> str:
    """``text`` with query-string and JSON secrets and every registered secret masked."""
    # Each pattern runs only on text that has what it needs (most values have neither): the
    # query pattern an "=", the JSON one a ":" and a quote (a timestamp has a ":" only).
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    if ":" in text and ('"' in text or "'" in text):
        text = _JSON_SECRET.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


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
    for key, value in event_dict.items():  # values replaced in place: the keys stay as they are
        if key in SECRET_FIELDS:
            event_dict[key] = REDACTED
        elif value.__class__ is str:  # most values: no type dispatch
            event_dict[key] = scrub(value)
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _scrub_value(value)
    return event_dict


class _Dumps:
    """``json.dumps`` for structlog's JSON renderer, its encoder made once: the renderer
    passes the same arguments every time, and ``json.dumps`` with a ``default`` makes a new
    encoder for each line."""

    def __init__(self) -> None:
        self._kw: dict[str, Any] | None = None
        self._encoder = json.JSONEncoder()

    def __call__(self, obj: Any, **kw: Any) -> str:
        if kw != self._kw:
            self._encoder, self._kw = json.JSONEncoder(**kw), kw
        return self._encoder.encode(obj)


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


#: JSON's own escaping of a string (the C function ``json.dumps`` uses, ``ensure_ascii``).
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
#: Fields structlog gives a meaning of their own (exceptions, stack, %-arguments), or that
#: stand for its record: a line with one takes structlog's processors.
_SPECIAL = frozenset({"exc_info", "stack_info", "positional_args", "_record",
                      "_from_structlog"})


def _flat_json(event_dict: dict[str, Any]) -> str | None:
    """What :func:`redact` then the JSON renderer make of ``event_dict``, for a dict of plain
    values (strings, whole numbers, finite floats, booleans, ``None``); ``None`` for any other
    value. The same text: JSON's own escaping and number forms, ``", "`` and ``": "``."""
    parts = []
    for key, value in event_dict.items():
        kind = value.__class__
        if key in SECRET_FIELDS:
            text = '"[redacted]"'
        elif kind is str:
            text = _json_str(scrub(value))
        elif kind is int:
            text = int.__repr__(value)
        elif value is None:
            text = "null"
        elif kind is bool:
            text = "true" if value else "false"
        elif kind is float and math.isfinite(value):
            text = float.__repr__(value)
        else:
            return None
        parts.append(f"{_json_str(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class _Direct:
    """What :func:`configure` set up for JSON lines, for :class:`DirectLogger`: the handler,
    structlog's processors (to tell that they are still in force), and the processors a line
    goes through after the stdlib record is made, but the record's own (a direct line makes
    none)."""

    handler: logging.StreamHandler[Any]
    processors: list[Any]  # a copy: capture_logs() changes the configured list in place
    stamp: Any
    final: tuple[Any, ...]

    def in_force(self) -> bool:
        """Whether keeper's configuration is the one in force: not replaced by another
        ``structlog.configure`` (``capture_logs()`` in a test) or another root handler."""
        handlers = logging.root.handlers
        return (len(handlers) == 1 and handlers[0] is self.handler
                and structlog.get_config()["processors"] == self.processors)

    def write(self, logger: logging.Logger, method: str, event: str,
              fields: dict[str, Any]) -> None:
        # The event dict structlog would make, in its order: the fields, the event, what
        # merge_contextvars adds, the logger's name, the level, the time.
        event_dict: Any = {**fields, "event": event}
        event_dict = structlog.contextvars.merge_contextvars(logger, method, event_dict)
        event_dict["logger"] = logger.name
        event_dict["level"] = method
        line = None
        if _SPECIAL.isdisjoint(fields):
            # TimeStamper(fmt="iso", utc=True)'s text, and its processors' output made at once
            event_dict["timestamp"] = datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")
            line = _flat_json(event_dict)
        if line is None:  # structlog's processors, in their order
            event_dict = self.stamp(logger, method, event_dict)
            for processor in self.final:
                event_dict = processor(logger, method, event_dict)
            line = event_dict
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(line + handler.terminator)
            handler.stream.flush()
        except Exception:  # as the handler does: a failed write never fails the caller
            handler.handleError(logging.makeLogRecord(
                {"name": logger.name, "msg": event, "levelno": logging.INFO}))
        finally:
            handler.release()


#: Set by :func:`configure` when lines are JSON; ``None`` otherwise (pretty, or not configured).
_direct: _Direct | None = None


class DirectLogger:
    """A module's structlog logger whose ``info`` lines go straight to the handler when the
    process logs JSON lines: the line is the one structlog would write (its processors,
    redaction and renderer, in its order), without stdlib logging's records. Anything else
    (other levels, a pretty console, a test's ``capture_logs()``) is structlog's own path.

    For a line written for every request (the API's access log: 68 µs of CPU a line through
    stdlib logging, 20 µs this way, measured on the development VM); other modules keep
    ``structlog.get_logger``. Handler filters are not run: keeper's own (``_Quiet``) is for
    library loggers only.
    """

    def __init__(self, name: str) -> None:
        self._stdlib = logging.getLogger(name)
        self._log = structlog.get_logger(name)

    def info(self, event: str, **fields: Any) -> None:
        direct = _direct
        if direct is None or not direct.in_force():
            self._log.info(event, **fields)
        elif self._stdlib.isEnabledFor(logging.INFO):
            direct.write(self._stdlib, "info", event, fields)

    def __getattr__(self, method: str) -> Any:
        return getattr(self._log, method)


def configure(level: str = "info", *, pretty: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``pretty``: coloured console lines; by default when stderr is a TTY.
    """
    if pretty is None:
        pretty = sys.stderr.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if pretty
        else structlog.processors.JSONRenderer(serializer=_Dumps(), sort_keys=False)
    )
    # Exceptions are rendered to text first so the redaction processor sees the traceback.
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(), processors=final
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
    chain = _pre_chain()
    processors = [
        structlog.stdlib.filter_by_level,
        *chain,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    global _direct
    # A direct line takes the pre-chain's own stamper and the formatter's processors but the
    # first (which removes the stdlib record's keys: a direct line has none).
    _direct = None if pretty else _Direct(handler, list(processors), chain[-1],
                                          tuple(final[1:]))


def set_level(level: str) -> None:
    """Change the level of a configured process (on SIGHUP, say)."""
    logging.getLogger().setLevel(level.upper())
