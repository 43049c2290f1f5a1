"""The configuration tree: frozen dataclasses (``Config``, one ``AppConfig`` per app). Their
defaults, like the loader's, come from :mod:`keeper.config.keys`. Built only by
:mod:`keeper.config.load`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keeper.config.api import (
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_METRICS_PORT,
    ApiConfig,
)
from keeper.config.keys import KEYS, default
from keeper.config.values import default_seconds
from keeper.config.webhooks import DEFAULT_RETENTION_S, WebhookConfig
from keeper.core.policy import Lifetime
from keeper.core.quota import Quota
from keeper.errors import ConfigError

DEFAULT_PATH = "config/keeper.toml"
#: Each endpoint's default quota (``None``: no limit), from the ``[quotas]`` keys.
DEFAULT_QUOTAS: Mapping[str, str | None] = {
    k.name.removeprefix("quotas."): None if k.default == "none" else k.default
    for k in KEYS if k.name.startswith("quotas.")
}
ENDPOINTS = tuple(DEFAULT_QUOTAS)
LANGS = ("zh_CN", "zh_TW", "en")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: An access token lives 7200 s (WeChat's ``expires_in``); refreshing it earlier than that
#: would refresh on every sweep.
ACCESS_TOKEN_LIFE_S = 7200
ACCESS_REFRESH = ("ahead", "on_demand")


@dataclass(frozen=True)
class AppConfig:
    """One WeChat app. ``secret`` is ``None`` when its source is unset or unreadable; only a
    code exchange needs it, and it says so then, in the words of ``secret_problem`` (which
    names the key and where the secret is read from)."""

    appid: str
    secret: str | None = field(repr=False)
    secret_source: str
    refresh_token_days: float
    refresh_at_day: float
    quotas: Mapping[str, Quota | None]
    secret_problem: str | None = None

    @property
    def refresh_lifetime_s(self) -> float:
        return self.refresh_token_days * 86400

    @property
    def refresh_at_s(self) -> float:
        return self.refresh_at_day * 86400


@dataclass(frozen=True)
class Config:
    """The whole configuration. Durations are seconds (``*_s``)."""

    database_url: str = field(repr=False)  # may hold a password
    api_base: str
    avatar_dir: Path
    avatar_hosts: tuple[str, ...]
    sweep_interval_s: float
    profile_interval_s: float
    workers: int
    userinfo_lang: str
    access_margin_s: float
    lease_s: float
    connect_timeout_s: float
    read_timeout_s: float
    log_level: str
    apps: tuple[AppConfig, ...]
    source: str
    #: Token encryption keys, in order (the first encrypts). Empty: the default key file.
    encryption_key_files: tuple[Path, ...] = ()
    avatar_workers: int = default("avatar_workers")
    avatar_timeout_s: float = default_seconds("avatar_timeout")
    avatar_max_bytes: int = default("avatar_max_bytes")
    avatar_keep_when_removed: bool = default("avatar_keep_when_removed")
    #: Longest a database statement (PostgreSQL ``statement_timeout``) or a wait for SQLite's
    #: write lock (``busy_timeout``) may take before it fails as "database unavailable".
    database_timeout_s: float = default_seconds("database_timeout")
    #: ``"pgbouncer"``: PostgreSQL is reached through PgBouncer in transaction pooling mode
    #: (no prepared statements, timeouts set per transaction); ``"none"``: directly.
    database_pooler: str = default("database_pooler")
    #: Where results that could not be written before an exit are kept until the next start.
    journal_dir: Path = Path(default("journal_dir"))
    #: ``"ahead"``: sweeps refresh every access token before it expires; ``"on_demand"``: only
    #: refresh tokens are kept alive, access tokens are refreshed when asked for.
    access_refresh: str = default("access_refresh")
    api: ApiConfig = field(default_factory=ApiConfig)
    #: Where ``keeper run`` serves ``/metrics`` (``HOST:PORT``); ``""``: not served.
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    metrics_host: str | None = DEFAULT_METRICS_HOST
    metrics_port: int | None = DEFAULT_METRICS_PORT
    #: Where events are sent (``[[webhooks]]``), and how long sent ones are kept.
    webhooks: tuple[WebhookConfig, ...] = ()
    events_retention_s: float = DEFAULT_RETENTION_S

    def app(self, appid: str) -> AppConfig:
        """The app called ``appid``; ``ConfigError`` if it is not configured."""
        for app in self.apps:
            if app.appid == appid:
                return app
        raise ConfigError(f"app {appid!r} is not configured (no [[apps]] entry)")

    def lifetime(self, app: AppConfig) -> Lifetime:
        """The policy's clock for one app's grants: its refresh token's life and refresh day,
        and this configuration's access margin and profile interval."""
        return Lifetime(
            lifetime_s=app.refresh_lifetime_s,
            refresh_at_s=app.refresh_at_s,
            access_margin_s=self.access_margin_s,
            profile_interval_s=self.profile_interval_s,
            access_ahead=self.access_refresh == "ahead",
        )

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log line: no secret, no password."""
        return {
            "config": self.source,
            "database_url": redact_url(self.database_url),
            "api_base": self.api_base,
            "avatar_dir": str(self.avatar_dir),
            "avatar_hosts": list(self.avatar_hosts),
            "avatar_workers": self.avatar_workers,
            "sweep_interval_s": self.sweep_interval_s,
            "profile_interval_s": self.profile_interval_s,
            "workers": self.workers,
            "userinfo_lang": self.userinfo_lang,
            "access_margin_s": self.access_margin_s,
            "lease_s": self.lease_s,
            "database_timeout_s": self.database_timeout_s,
            "database_pooler": self.database_pooler,
            "journal_dir": str(self.journal_dir),
            "access_refresh": self.access_refresh,
            "api_listen": self.api.listen,
            "api_keys_file": str(self.api.keys_file),
            "metrics_listen": self.metrics_listen,
            "log_level": self.log_level,
            "webhooks": [w.redacted() for w in self.webhooks],
            "events_retention_s": self.events_retention_s,
            "encryption_key_files": [str(p) for p in self.encryption_key_files] or "default",
            "apps": [
                {
                    "appid": a.appid,
                    "secret_source": a.secret_source + ("" if a.secret else " (unavailable)"),
                    "refresh_token_days": a.refresh_token_days,
                    "refresh_at_day": a.refresh_at_day,
                    # One string: a nested key named "code" would be masked by the redactor.
                    "quotas": ", ".join(f"{k} {v or 'none'}" for k, v in a.quotas.items()),
                }
                for a in self.apps
            ],
        }


def redact_url(url: str) -> str:
    """``scheme://user:***@host/db``: a database URL without its password."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
