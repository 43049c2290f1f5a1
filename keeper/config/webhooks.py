"""The ``[[webhooks]]`` tables and ``events_retention``: where keeper sends events, signed
with which secret.

A webhook's secret comes from ``secret_env`` or ``secret_file`` (exactly one; a relative file
is looked up among systemd's credentials first), never from the TOML file. Only a process that
sends events signs them (``keeper run``, ``keeper events deliver``): a secret that cannot be
read is loaded as ``None`` with the reason, and :func:`require_secrets` refuses to start those
two without it, so adding a webhook never stops the commands that send nothing (the API, a
sweep). A malformed table is refused at load, for every command. A webhook is known by
``key``, a short digest of its url: the delivery rows and logs name it by that (and by host),
never by the url, whose query string could hold a token of the receiver's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from keeper.config.values import Table, default_seconds, key_name, path_value, show
from keeper.core.events import TYPES
from keeper.errors import ConfigError

DEFAULT_TIMEOUT_S = default_seconds("webhooks.timeout")
DEFAULT_RETENTION_S = default_seconds("events_retention")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class WebhookConfig:
    """One receiver of events. ``timeout_s``: the deadline of one whole attempt
    (resolving, connecting, sending, reading the status and a little of the body).
    ``secret`` is ``None`` when its source is unset or unreadable, and ``secret_problem``
    then says why, naming the key (only the processes that send need it)."""

    url: str = field(repr=False)  # its query string may hold a secret of the receiver's
    secret: str | None = field(repr=False)
    secret_source: str
    events: frozenset[str]
    timeout_s: float = DEFAULT_TIMEOUT_S
    secret_problem: str | None = None

    @property
    def key(self) -> str:
        """A stable name for this webhook (12 hex digits of the url's SHA-256)."""
        return webhook_key(self.url)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"

    def redacted(self) -> dict[str, object]:
        return {"key": self.key, "host": self.host, "events": sorted(self.events),
                "secret_source": self.secret_source + ("" if self.secret else " (unavailable)"),
                "timeout_s": self.timeout_s}

    @property
    def secret_missing(self) -> str | None:
        """Without a secret: why, naming the key, the source and the webhook (by key and host,
        never by the url, whose query string may hold a secret); else ``None``."""
        if self.secret:
            return None
        return (f"{self.secret_problem or 'no secret'} (webhook {self.key}, host {self.host}: "
                "its events cannot be signed)")

    def require_secret(self) -> str:
        """The signing secret; ``ConfigError`` (:attr:`secret_missing`) without it."""
        if not self.secret:
            raise ConfigError(str(self.secret_missing))
        return self.secret


def require_secrets(hooks: Iterable[WebhookConfig]) -> None:
    """For a process that sends events, before it starts: ``ConfigError``, one line naming
    every webhook whose secret could not be read."""
    missing = [m for h in hooks if (m := h.secret_missing)]
    if missing:
        raise ConfigError("; ".join(missing))


def webhook_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def _secret(t: Table, env: Mapping[str, str],
            resolve: Callable[[str], Path]) -> tuple[str | None, str, str | None]:
    """(the secret, where it is read from, why it could not be: ``None`` when it was). Which
    source is given is checked here; whether it can be read matters only to the senders."""
    secret_env = t.string("secret_env")
    secret_file = t.string("secret_file")
    if bool(secret_env) == bool(secret_file):
        raise ConfigError(f"{t.key('secret_env')}: give secret_env or secret_file (one of them)")
    if secret_env:
        value = env.get(secret_env, "").strip()
        if not value:
            return None, f"env {secret_env}", (f"{t.key('secret_env')}: the environment "
                                               f"variable {secret_env} is not set or empty")
        return value, f"env {secret_env}", None
    path = resolve(path_value(secret_file, t.key("secret_file")))
    source, key = f"file {path}", t.key("secret_file")
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        return None, source, f"{key}: {path} cannot be read: {e.strerror}"
    except UnicodeDecodeError:
        return None, source, f"{key}: {path} is not UTF-8 text"
    if not value:
        return None, source, f"{key}: {path} is empty"
    return value, source, None


def _webhook(raw: object, index: int, env: Mapping[str, str],
             resolve: Callable[[str], Path]) -> WebhookConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"webhooks[{index}]: expected a table ([[webhooks]])")
    t = Table(raw, f"webhooks[{index}].", "webhooks.")
    url = t.string("url")
    if url is None:
        raise ConfigError(f"webhooks[{index}].url: required")
    parts = urlsplit(url) if not _CONTROL.search(url) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # Not the url itself: it may carry a secret in its query string.
        raise ConfigError(f"webhooks[{index}].url: expected an http:// or https:// URL")
    secret, source, problem = _secret(t, env, resolve)
    kinds = t.value("events")
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(f"webhooks[{index}].events: expected a list of event types")
    unknown = [k for k in kinds if k not in TYPES]
    if unknown:
        raise ConfigError(f"webhooks[{index}].events: unknown event type {key_name(unknown[0])}"
                          f" (known: {', '.join(TYPES)})")
    timeout = t.duration("timeout")
    if not 0.1 <= timeout <= 60:
        raise ConfigError(f"webhooks[{index}].timeout: expected 0.1 s to 60 s, got "
                          f"{show(timeout)}")
    t.finish()
    return WebhookConfig(url, secret, source, frozenset(kinds), timeout, problem)


def parse_webhooks(raw: object, env: Mapping[str, str],
                   resolve: Callable[[str], Path]) -> tuple[WebhookConfig, ...]:
    """Every ``[[webhooks]]`` table; a url given twice is refused."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("webhooks: expected [[webhooks]] tables")
    hooks = tuple(_webhook(r, i, env, resolve) for i, r in enumerate(raw))
    keys = [h.key for h in hooks]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise ConfigError(f"webhooks[{i}].url: the same url as webhooks[{keys.index(k)}]")
    return hooks
