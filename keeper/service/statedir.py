"""Which embedded SQLite database a command may open or create.

Under systemd the service's database lives in its state directory (``StateDirectory=``, owned by
the service's dynamic user, under ``/var/lib/private``). An operator who runs keeper by hand with
the system configuration must not end up beside it with a second, empty database (a relative
``database_url`` resolves against the shell's working directory), nor open the service's file as
another user: SQLite would leave ``-wal``/``-shm`` files owned by that user, which the service can
then no longer open. Both are refused with one line that points to ``keeper-ctl``, which runs a
command as the service itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from keeper.errors import ConfigError

#: Configuration files here are the system's: the units run with /etc/keeper/keeper.toml.
SYSTEM_CONFIG_DIR = Path("/etc/keeper")
#: Where systemd keeps the state directories of services with DynamicUser=yes.
PRIVATE_STATE_ROOT = Path("/var/lib/private")
HINT = "run it as the service instead: keeper-ctl COMMAND (e.g. keeper-ctl status)"


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def state_directories(env: Mapping[str, str]) -> list[Path]:
    """The state directories systemd gave this process (``$STATE_DIRECTORY``, colon-separated),
    resolved (with ``DynamicUser=`` each is a symlink into ``/var/lib/private``)."""
    return [Path(p).resolve() for p in env.get("STATE_DIRECTORY", "").split(":") if p]


def check_sqlite_file(
    db_file: Path,
    *,
    config_source: str,
    state_dirs: Sequence[Path],
    euid: int,
    system_config_dir: Path = SYSTEM_CONFIG_DIR,
    private_root: Path = PRIVATE_STATE_ROOT,
) -> None:
    """Refuse (:class:`ConfigError`) to open ``db_file`` when another user owns it, and to
    create it when it is missing and either the configuration is the system's or the file would
    land in a service's private state directory, unless it is inside ``state_dirs`` (the
    process's own state directories)."""
    path = db_file.resolve()
    try:
        owner = path.stat().st_uid
    except FileNotFoundError:
        owner = None
    if owner is not None:
        if owner != euid:
            raise ConfigError(
                f"database {path} belongs to uid {owner}, not to this user (uid {euid}): opening "
                f"it would leave files the service cannot open; {HINT}"
            )
        return
    if any(_within(path, d) for d in state_dirs):
        return
    config = Path(config_source).resolve()
    if _within(config, system_config_dir.resolve()):
        raise ConfigError(
            f"refusing to create a new database {path} for the system configuration {config}: "
            f"the service's database lives in its state directory; {HINT}"
        )
    if _within(path, private_root.resolve()):
        raise ConfigError(
            f"refusing to create a new database {path} in another service's state directory; "
            f"{HINT}"
        )


def guard_sqlite_file(db_file: Path, *, config_source: str) -> None:
    """:func:`check_sqlite_file` for this process: its user and ``$STATE_DIRECTORY``."""
    check_sqlite_file(
        db_file, config_source=config_source, state_dirs=state_directories(os.environ),
        euid=os.geteuid(),
    )
