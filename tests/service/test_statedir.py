"""keeper never creates a stray embedded database for the system configuration, and never
opens one another user owns (the service's, under systemd)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keeper.errors import ConfigError
from keeper.service.statedir import check_sqlite_file, state_directories
from tests.conftest import Keeper


@pytest.fixture
def system(tmp_path: Path) -> Path:
    """Stands in for /etc/keeper, with the system configuration in it."""
    etc = tmp_path / "etc-keeper"
    etc.mkdir()
    (etc / "keeper.toml").write_text("")
    return etc


def check(db: Path, config: Path, *, system: Path, state_dirs: list[Path] | None = None,
          euid: int | None = None, private_root: Path | None = None) -> None:
    check_sqlite_file(db, config_source=str(config), state_dirs=state_dirs or [],
                      euid=os.geteuid() if euid is None else euid, system_config_dir=system,
                      private_root=private_root or Path("/nonexistent/private"))


def test_the_system_configuration_never_creates_a_database_outside_the_state_directory(
    tmp_path: Path, system: Path
) -> None:
    stray = tmp_path / "cwd" / "var" / "keeper.db"
    with pytest.raises(ConfigError) as refused:
        check(stray, system / "keeper.toml", system=system)
    message = str(refused.value)
    assert str(stray) in message and "keeper-ctl" in message and "\n" not in message


def test_the_service_creates_its_database_in_its_own_state_directory(
    tmp_path: Path, system: Path
) -> None:
    state = tmp_path / "private" / "keeper"
    state.mkdir(parents=True)
    (tmp_path / "keeper").symlink_to(state)  # DynamicUser=: /var/lib/keeper -> private/keeper
    dirs = state_directories({"STATE_DIRECTORY": str(tmp_path / "keeper")})
    check(tmp_path / "keeper" / "keeper.db", system / "keeper.toml", system=system,
          state_dirs=dirs, private_root=tmp_path / "private")


def test_another_configuration_creates_its_database_anywhere_but_a_private_state_directory(
    tmp_path: Path, system: Path
) -> None:
    config = tmp_path / "keeper.toml"
    check(tmp_path / "var" / "keeper.db", config, system=system,
          private_root=tmp_path / "private")
    with pytest.raises(ConfigError, match="another service's state directory"):
        check(tmp_path / "private" / "keeper" / "keeper.db", config, system=system,
              private_root=tmp_path / "private")


def test_an_existing_database_is_opened_only_by_its_owner(tmp_path: Path, system: Path) -> None:
    db = tmp_path / "keeper.db"
    db.write_bytes(b"")
    check(db, system / "keeper.toml", system=system)  # exists, ours: fine, whatever the config
    with pytest.raises(ConfigError, match=f"belongs to uid {os.geteuid()}, not to this user"):
        check(db, tmp_path / "keeper.toml", system=system, euid=os.geteuid() + 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_root_does_not_open_a_database_another_user_owns(keeper: Keeper) -> None:
    assert keeper.run("db", "upgrade").code == 0
    db = keeper.workdir / "keeper.db"
    for f in keeper.workdir.glob("keeper.db*"):
        os.chown(f, 65534, 65534)
    before = sorted(p.name for p in keeper.workdir.iterdir())
    ran = keeper.run("status")
    assert ran.code == 2, ran.err
    assert f"database {db} belongs to uid 65534" in ran.err and "keeper-ctl" in ran.err
    assert sorted(p.name for p in keeper.workdir.iterdir()) == before  # no root-owned -wal/-shm
