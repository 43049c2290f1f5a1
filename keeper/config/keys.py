"""Every configuration key and its default, in one place.

The loader reads each key's default from here (:class:`keeper.config.values.Table` looks it
up by the key's name, so a key missing here cannot be read at all), the model's defaults come
from here, and tests/test_reference_docs.py checks docs/reference/configuration.md and
config/keeper.toml against this list: a key added here and not documented there, documented
there and not here, or shown there with another default fails that test. What each key means
is said on that page, not here, so that it is said once.

A key's name is dotted by the table that holds it: ``lease``, ``api.listen``,
``quotas.code``, ``apps.refresh_at_day`` (each ``[[apps]]`` table), ``webhooks.timeout``
(each ``[[webhooks]]`` table). Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from keeper.core.events import TYPES


@dataclass(frozen=True)
class Key:
    """One key. ``default`` is written as the TOML file would write it; ``None`` means the key
    has no value unless it is given (``required``: it must be; else what its absence means is
    on the reference page). ``duration``: whole seconds or ``"90s"``, ``"15m"``...; two
    spellings of the same length are the same default."""

    name: str
    default: Any = None
    duration: bool = False
    required: bool = False


KEYS: tuple[Key, ...] = (
    Key("database_url", "sqlite:///var/keeper.db"),
    Key("api_base", "https://api.weixin.qq.com"),
    Key("avatar_dir", "var/avatars"),
    Key("avatar_hosts", ["wx.qlogo.cn", "thirdwx.qlogo.cn"]),
    Key("sweep_interval", 60, duration=True),
    Key("profile_interval", 86400, duration=True),
    Key("workers", 32),
    Key("userinfo_lang", "zh_CN"),
    Key("access_margin", "5m", duration=True),
    Key("lease", "5m", duration=True),
    Key("connect_timeout", 3, duration=True),
    Key("read_timeout", 5, duration=True),
    Key("database_timeout", 30, duration=True),
    Key("database_pooler", "none"),
    Key("journal_dir", "var/journal"),
    Key("avatar_workers", 4),
    Key("avatar_timeout", 10, duration=True),
    Key("avatar_max_bytes", 5 * 1024 * 1024),
    Key("avatar_keep_when_removed", True),
    Key("log_level", "info"),
    Key("access_refresh", "ahead"),
    Key("events_retention", "7d", duration=True),
    Key("metrics_listen", "127.0.0.1:9790"),
    # None: the embedded default key file (beside the SQLite file, or a systemd credential).
    Key("encryption_key_file"),
    Key("api.listen", "127.0.0.1:8790"),
    Key("api.keys_file", "api-keys"),
    Key("api.processes", 1),
    Key("api.threads", 40),
    Key("api.token_wait", 10, duration=True),
    Key("api.head_timeout", 10, duration=True),
    # WeChat's documented quotas; "none" is how the file says "no limit".
    Key("quotas.code", "10000/minute"),
    Key("quotas.refresh", "50000/minute"),
    Key("quotas.userinfo", "50000/minute"),
    Key("quotas.auth", "none"),
    Key("apps.appid", required=True),
    Key("apps.secret_env"),
    Key("apps.secret_file"),
    Key("apps.refresh_token_days", 30),
    Key("apps.refresh_at_day", 29),
    # None: the [quotas] values.
    Key("apps.quotas"),
    Key("webhooks.url", required=True),
    # Exactly one of the two (the loader says so); neither has a default.
    Key("webhooks.secret_env"),
    Key("webhooks.secret_file"),
    Key("webhooks.events", list(TYPES)),
    Key("webhooks.timeout", 10, duration=True),
)

_BY_NAME: Mapping[str, Key] = MappingProxyType({k.name: k for k in KEYS})


def key(name: str) -> Key:
    """The key called ``name``. A name not in :data:`KEYS` is a programming error: every key
    the loader reads is listed there, with its default, so that the documentation can be
    checked against one list."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"configuration key {name!r} is not in keeper.config.keys.KEYS; add it "
                       "there with its default (and to docs/reference/configuration.md and "
                       "config/keeper.toml)") from None


def is_table(name: str) -> bool:
    """Whether ``name`` (dotted like a key's) is a table that holds keys: ``api``, ``quotas``,
    ``apps``, ``webhooks``."""
    return any(k.name.startswith(name + ".") for k in KEYS)


def default(name: str) -> Any:
    """The default of key ``name`` as the file would write it (a fresh list for a list, so a
    caller cannot change the catalogue)."""
    value = key(name).default
    return list(value) if isinstance(value, list) else value
