"""Loading the configuration: TOML and environment into one frozen :class:`Config`, validated
here and nowhere else. Every problem is a :class:`ConfigError` whose one-line message names
the key."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from keeper.config.api import parse_api, parse_metrics_listen
from keeper.config.keys import default
from keeper.config.model import (
    ACCESS_REFRESH,
    ACCESS_TOKEN_LIFE_S,
    DEFAULT_PATH,
    DEFAULT_QUOTAS,
    ENDPOINTS,
    LANGS,
    LOG_LEVELS,
    AppConfig,
    Config,
)
from keeper.config.values import (
    MAX_DURATION_S,
    Table,
    key_name,
    path_value,
    refuse_secrets,
    show,
)
from keeper.config.webhooks import parse_webhooks
from keeper.core.quota import Quota, parse_quota
from keeper.errors import ConfigError

_APPID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _credential_key(env: Mapping[str, str]) -> tuple[Path, ...]:
    """A systemd credential named ``keeper.key``, when no key file is configured."""
    creds = env.get("CREDENTIALS_DIRECTORY")
    path = Path(creds) / "keeper.key" if creds else None
    return (path,) if path and path.is_file() else ()


def _resolve(name: str, env: Mapping[str, str], base: Path) -> Path:
    """A file named in the configuration: absolute as given; a relative name is looked up
    among systemd's credentials first (LoadCredential=), then beside the configuration file."""
    path = Path(name)
    if path.is_absolute():
        return path
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / path).is_file():
        return Path(creds) / path
    return base / path


def _quotas(
    data: object, key: str, defaults: Mapping[str, Quota | None]
) -> dict[str, Quota | None]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a table of endpoint = \"COUNT/PERIOD\"")
    quotas = dict(defaults)
    for endpoint, value in data.items():
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"unknown configuration key: {key}.{key_name(endpoint)}")
        if value in ("none", "", False):
            quotas[endpoint] = None
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}.{endpoint}: expected \"COUNT/PERIOD\", got {show(value)}"
            )
        try:
            quota = parse_quota(value)
        except ValueError:
            raise ConfigError(f"{key}.{endpoint}: expected \"COUNT/PERIOD\" like "
                              f"'50000/minute' or '20/2 seconds', got {show(value)}") from None
        if quota.count > 10**9 or not 0 < quota.period_s <= MAX_DURATION_S:
            raise ConfigError(f"{key}.{endpoint}: out of range, got {show(value)}")
        quotas[endpoint] = quota
    return quotas


def _read_secret(app: Table, env: Mapping[str, str],
                 base: Path) -> tuple[str | None, str, str | None]:
    """(the AppSecret, its source, why it could not be read: ``None`` when it was)."""
    secret_env = app.string("secret_env")
    secret_file = app.string("secret_file")
    if secret_env and secret_file:
        raise ConfigError(f"{app.key('secret_env')}: give secret_env or secret_file, not both")
    if secret_env:
        value = env.get(secret_env, "").strip()
        return (value or None), f"env {secret_env}", None if value else (
            f"{app.key('secret_env')}: the environment variable {secret_env} is not set or "
            "empty")
    if secret_file:
        # A secret that cannot be read is not fatal here: only a code exchange needs it
        # (`keeper grant`, `POST /v1/grants`), and it says why then (the source carries the
        # reason for the start-up log line).
        key = app.key("secret_file")
        path = _resolve(path_value(secret_file, key), env, base)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            return (None, f"file {path} (cannot be read: {e.strerror})",
                    f"{key}: {path} cannot be read: {e.strerror}")
        except UnicodeDecodeError:
            return None, f"file {path} (not UTF-8 text)", f"{key}: {path} is not UTF-8 text"
        if not value:
            return None, f"file {path} (empty)", f"{key}: {path} is empty"
        return value, f"file {path}", None
    return None, "none", f"{app.prefix.rstrip('.')}: neither secret_env nor secret_file is given"


def _app(raw: object, index: int, env: Mapping[str, str], base: Path,
         quotas: Mapping[str, Quota | None]) -> AppConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"apps[{index}]: expected a table")
    t = Table(raw, f"apps[{index}].", "apps.")
    appid = t.string("appid")
    if appid is None:
        raise ConfigError(f"apps[{index}].appid: required")
    if not _APPID_RE.match(appid):
        raise ConfigError(f"apps[{index}].appid: {show(appid)} is not an appid")
    t.prefix = f"apps[{appid}]."
    secret, source, problem = _read_secret(t, env, base)
    days = t.number("refresh_token_days", most=3650)
    at_day = t.number("refresh_at_day", most=3650)
    if at_day >= days:
        raise ConfigError(
            f"{t.key('refresh_at_day')}: must be less than refresh_token_days ({days:g}),"
            f" got {at_day:g}"
        )
    own = t.value("quotas")
    app_quotas = _quotas({} if own is None else own, t.key("quotas"), quotas)
    t.finish()
    return AppConfig(appid, secret, source, days, at_day, app_quotas, problem)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the configuration.

    ``path``: ``--config``, else ``$KEEPER_CONFIG``, else ``config/keeper.toml``.
    ``KEEPER_DATABASE_URL`` and ``KEEPER_API_BASE`` override the file.
    """
    env = os.environ if env is None else env
    source = path or env.get("KEEPER_CONFIG") or DEFAULT_PATH
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {source} does not exist") from None
    except OSError as e:
        raise ConfigError(f"configuration file {source} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"configuration file {source} is not UTF-8 text (at byte {e.start})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {source} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"configuration file {source} is nested too deeply") from None
    try:
        return build_config(data, env=env, source=source)
    except RecursionError:
        raise ConfigError(f"configuration file {source} is nested too deeply") from None


def _check_database_url(url: str) -> None:
    """A URL SQLAlchemy can parse (whether its driver exists is checked when it is used)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError("database_url: not a database URL like "
                          "'sqlite:///var/keeper.db' or 'postgresql+psycopg://host/db'") from None
    if "\x00" in url or not parsed.drivername:
        raise ConfigError("database_url: not a database URL")


def build_config(data: Mapping[str, Any], *, env: Mapping[str, str], source: str) -> Config:
    """Validate parsed TOML ``data`` into a :class:`Config`."""
    refuse_secrets(data, "")
    if re.search(r"://[^/@:]+:[^@/]+@", str(data.get("database_url", ""))):
        raise ConfigError("database_url: holds a password; set KEEPER_DATABASE_URL in the "
                          "environment (an EnvironmentFile) instead")
    t = Table(data, "")
    # Set in the environment, the file's value is not read at all (the pops below drop it).
    database_url = env.get("KEEPER_DATABASE_URL") or t.string("database_url")
    t.data.pop("database_url", None)
    api_base = env.get("KEEPER_API_BASE") or t.string("api_base")
    t.data.pop("api_base", None)
    assert database_url is not None and api_base is not None
    _check_database_url(database_url)
    if not re.match(r"^https?://[^/\s]+", api_base) or _CONTROL.search(api_base):
        raise ConfigError(f"api_base: expected an http(s) URL, got {show(api_base)}")
    avatar_dir = path_value(t.value("avatar_dir"), "avatar_dir")
    journal_dir = path_value(t.value("journal_dir"), "journal_dir")
    hosts = t.value("avatar_hosts")
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"avatar_hosts: expected a list of host names, got {hosts!r}")
    workers = t.value("workers")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 1024:
        raise ConfigError(f"workers: expected a whole number from 1 to 1024, got {workers!r}")
    lang = t.string("userinfo_lang")
    if lang not in LANGS:
        raise ConfigError(f"userinfo_lang: expected one of {', '.join(LANGS)}, got {lang!r}")
    level = (t.string("log_level") or default("log_level")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    sweep_interval = t.duration("sweep_interval")
    if sweep_interval < 1:
        raise ConfigError(f"sweep_interval: must be at least 1 second, got {sweep_interval:g}")
    lease = t.duration("lease")
    read_timeout = t.duration("read_timeout")
    if lease < 2 * read_timeout + 30:
        raise ConfigError(f"lease: must exceed two read timeouts plus 30 s, got {lease:g}")
    database_timeout = t.duration("database_timeout")
    if not 1 <= database_timeout <= 3600:
        raise ConfigError(f"database_timeout: expected 1 s to 1 h, got {database_timeout:g}")
    if (pooler := t.string("database_pooler")) not in ("none", "pgbouncer"):
        raise ConfigError(f'database_pooler: expected "none" or "pgbouncer", got {show(pooler)}')
    quotas = _quotas(
        t.table("quotas", {}), "quotas",
        {k: parse_quota(v) if v else None for k, v in DEFAULT_QUOTAS.items()},
    )
    raw_apps = t.table("apps", [])
    if not isinstance(raw_apps, list):
        raise ConfigError("apps: expected [[apps]] tables")
    base = Path(source).resolve().parent
    avatar_workers = t.value("avatar_workers")
    if isinstance(avatar_workers, bool) or not isinstance(avatar_workers, int) or not (
        1 <= avatar_workers <= 64
    ):
        raise ConfigError(f"avatar_workers: expected a whole number from 1 to 64, got "
                          f"{avatar_workers!r}")
    avatar_max = t.value("avatar_max_bytes")
    if isinstance(avatar_max, bool) or not isinstance(avatar_max, int) or avatar_max < 1024:
        raise ConfigError(f"avatar_max_bytes: expected a whole number of bytes >= 1024, got "
                          f"{avatar_max!r}")
    keep_removed = t.value("avatar_keep_when_removed")
    if not isinstance(keep_removed, bool):
        raise ConfigError(f"avatar_keep_when_removed: expected true or false, got "
                          f"{keep_removed!r}")
    key_files = t.value("encryption_key_file")
    if key_files is None:
        key_files = []
    elif isinstance(key_files, str):
        key_files = [key_files]
    if not isinstance(key_files, list):
        raise ConfigError("encryption_key_file: expected a path or a list of paths")
    key_files = [path_value(k, "encryption_key_file") for k in key_files]
    apps = tuple(_app(raw, i, env, base, quotas) for i, raw in enumerate(raw_apps))
    seen: set[str] = set()
    for app in apps:
        if app.appid in seen:
            raise ConfigError(f"apps[{app.appid}]: configured twice")
        seen.add(app.appid)
    access_margin = t.duration("access_margin")
    if access_margin >= ACCESS_TOKEN_LIFE_S:
        raise ConfigError(f"access_margin: must be shorter than an access token's life "
                          f"({ACCESS_TOKEN_LIFE_S} s), got {access_margin:g}")
    access_refresh = t.string("access_refresh")
    if access_refresh not in ACCESS_REFRESH:
        raise ConfigError(f"access_refresh: expected \"ahead\" or \"on_demand\", got "
                          f"{show(access_refresh)}")
    api = parse_api(t.table("api", None), lambda name: _resolve(name, env, base))
    m_listen, m_host, m_port = parse_metrics_listen(t.value("metrics_listen"))
    webhooks = parse_webhooks(t.table("webhooks", None), env,
                              lambda n: _resolve(n, env, base))
    retention = t.duration("events_retention")
    if retention < 3600:
        raise ConfigError(f"events_retention: must be at least 1 hour, got {retention:g}")
    config = Config(
        database_url=database_url,
        api_base=api_base.rstrip("/"),
        avatar_dir=Path(avatar_dir),
        avatar_hosts=tuple(hosts),
        sweep_interval_s=sweep_interval,
        profile_interval_s=t.duration("profile_interval"),
        workers=workers,
        userinfo_lang=lang or default("userinfo_lang"),
        access_margin_s=access_margin,
        lease_s=lease,
        connect_timeout_s=max(0.001, t.duration("connect_timeout")),
        read_timeout_s=max(0.001, read_timeout),
        log_level=level,
        apps=apps,
        source=source,
        avatar_workers=avatar_workers,
        avatar_timeout_s=max(0.001, t.duration("avatar_timeout")),
        avatar_max_bytes=avatar_max,
        avatar_keep_when_removed=keep_removed,
        database_timeout_s=database_timeout, database_pooler=str(pooler),
        journal_dir=Path(journal_dir),
        access_refresh=str(access_refresh),
        api=api,
        metrics_listen=m_listen, metrics_host=m_host, metrics_port=m_port,
        webhooks=webhooks,
        events_retention_s=retention,
        encryption_key_files=(
            tuple(_resolve(k, env, base) for k in key_files) or _credential_key(env)
        ),
    )
    t.finish()
    return config
