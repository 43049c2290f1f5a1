"""Reading single configuration values: durations, paths, key names, values that look like
secrets, and ``Table``, one TOML table read key by key (unknown keys refused)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from keeper.config.keys import default, is_table
from keeper.errors import ConfigError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
#: The longest duration keeper accepts: ten years. Longer ones are typos, and overflow dates.
MAX_DURATION_S = 3650 * 86400
#: Values that look like an AppSecret (32 hex digits) or a Fernet key: never in the file.
_SECRET_LOOKING = re.compile(r"^(?:[0-9a-fA-F]{32}|[A-Za-z0-9_-]{43}=)$")


def refuse_secrets(value: object, key: str) -> None:
    """Refuse a configuration file that holds something that looks like a secret."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            refuse_secrets(v, f"{key}.{key_name(k)}" if key else key_name(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_secrets(v, f"{key}[{i}]")
    elif isinstance(value, str) and _SECRET_LOOKING.match(value.strip()):
        raise ConfigError(
            f"{key}: looks like a secret; secrets never go in the configuration file "
            "(use secret_env, secret_file or encryption_key_file)"
        )


def show(value: object) -> str:
    """A value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def key_name(name: object) -> str:
    """A key for an error message: as written when it is a plain name, else quoted (one line)."""
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return name
    return show(name)


def path_value(value: object, key: str) -> str:
    """A file or directory name from the configuration."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a path, got {show(value)}")
    if "\x00" in value:
        raise ConfigError(f"{key}: a path cannot hold a NUL character")
    return value


def parse_duration(value: object, key: str) -> float:
    """Whole seconds or ``"90s"``, ``"15m"``, ``"24h"``, ``"29d"`` → seconds (>= 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected seconds or a duration like '15m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"{key}: expected seconds or a duration like '15m', got {show(value)}"
        )
    if math.isnan(seconds) or seconds < 0:
        raise ConfigError(f"{key}: must not be negative, got {show(value)}")
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"{key}: must be at most 3650 days, got {show(value)}")
    return seconds


class Table:
    """A TOML table being read: typed getters that name the key, and a check for leftovers.

    ``prefix`` names the table in messages (``apps[wx1].``); ``section`` is its name in
    :mod:`keeper.config.keys` (``apps.``), where every getter takes the key's default from:
    there is no other way to give one, so a key read here is a key listed there."""

    def __init__(self, data: Mapping[str, Any], prefix: str, section: str = "") -> None:
        self.data = dict(data)
        self.prefix = prefix
        self.section = section

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def value(self, name: str) -> Any:
        """The key's value as the file has it, else its default."""
        return self.data.pop(name, default(self.section + name))

    def table(self, name: str, empty: Any) -> Any:
        """A table of keys within this one (``[api]``, ``[[apps]]``...), ``empty`` if absent."""
        if not is_table(self.section + name):
            raise KeyError(f"{self.section + name!r} is not a table of keeper.config.keys.KEYS")
        return self.data.pop(name, empty)

    def string(self, name: str) -> str | None:
        value = self.value(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a string, got {show(value)}")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{self.key(name)}: must not be empty")
        return value

    def number(self, name: str, *, most: float) -> float:
        """A positive number no larger than ``most``."""
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: expected a number, got {show(value)}")
        if not 0 < value <= most:  # also refuses nan
            raise ConfigError(f"{self.key(name)}: expected more than 0 and at most {most:g}, "
                              f"got {show(value)}")
        return float(value)

    def duration(self, name: str) -> float:
        return parse_duration(self.value(name), self.key(name))

    def finish(self) -> None:
        if self.data:
            names = ", ".join(self.key(key_name(k)) for k in sorted(self.data))
            raise ConfigError(f"unknown configuration key: {names}")


def default_seconds(name: str) -> float:
    """The default of the duration key ``name``, in seconds (for the model's defaults)."""
    return parse_duration(default(name), name)
