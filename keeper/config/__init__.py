"""Configuration: one frozen dataclass tree (:mod:`~keeper.config.model`), loaded and
validated in one place (:mod:`~keeper.config.load`). Components take keyword arguments from it
and never read the environment or files themselves."""

from keeper.config.load import build_config, load_config
from keeper.config.model import (
    ACCESS_TOKEN_LIFE_S,
    DEFAULT_PATH,
    DEFAULT_QUOTAS,
    ENDPOINTS,
    LANGS,
    LOG_LEVELS,
    AppConfig,
    Config,
    redact_url,
)
from keeper.config.values import parse_duration

__all__ = [
    "ACCESS_TOKEN_LIFE_S",
    "DEFAULT_PATH",
    "DEFAULT_QUOTAS",
    "ENDPOINTS",
    "LANGS",
    "LOG_LEVELS",
    "AppConfig",
    "Config",
    "build_config",
    "load_config",
    "parse_duration",
    "redact_url",
]
