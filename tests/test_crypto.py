"""Tokens at rest: encrypted, readable only with the right key, rotated without loss."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import make_url, text

from keeper import crypto
from keeper.core.models import Grant
from keeper.core.policy import Lifetime, schedule
from keeper.crypto import Cipher, WrongKey, create_key_file, key_id, load_keys
from keeper.errors import ConfigError
from keeper.store import db
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from keeper.wechat.simulator import Simulator
from tests.conftest import IN_CI, TEST_CIPHER, Keeper, require_postgres, reset_postgres
from tests.e2e.helpers import make_grant, seed

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CLOCK = Lifetime(30 * 86400, 29 * 86400, 300, 86400)


def grant(openid: str, access: str, refresh: str) -> Grant:
    return Grant(id=0, appid="wx1", openid=openid, unionid=None, scope="snsapi_base",
                 access_token=access, refresh_token=refresh,
                 access_expires_at=NOW - timedelta(hours=1),
                 refresh_issued_at=NOW - timedelta(days=3))


def put(store: Store, *grants: Grant) -> None:
    store.upsert_grants([GrantWrite(g, schedule(g, CLOCK)) for g in grants], NOW)


def tokens(n: int) -> list[tuple[str, str, str]]:
    return [(f"o{i}", f"ACCESS-plain-{i:04d}-zz", f"REFRESH-plain-{i:04d}-zz") for i in range(n)]


@given(st.text(max_size=300))
def test_any_token_string_round_trips(token: str) -> None:
    cipher = Cipher([Fernet.generate_key()])
    sealed = cipher.encrypt(token)
    assert cipher.decrypt(sealed) == token
    if len(token) >= 4:
        assert token not in sealed


_STORE_DIR = tempfile.mkdtemp(prefix="keeper-hyp-")
_STORE = Store(f"sqlite:///{_STORE_DIR}/h.db", cipher=Cipher([Fernet.generate_key()]),
               auto_upgrade=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=1, max_size=200), st.text(min_size=1, max_size=200))
def test_any_token_strings_survive_the_store(access: str, refresh: str) -> None:
    _STORE.open()
    put(_STORE, grant("o1", access, refresh))
    stored = _STORE.get_grant("wx1", "o1")
    assert stored is not None
    assert (stored.access_token, stored.refresh_token) == (access, refresh)


def test_the_raw_sqlite_files_hold_no_token(sim: Simulator, keeper: Keeper) -> None:
    grants = [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base") for i in range(20)]
    seed(sim, keeper, grants)
    assert keeper.run("sweep").code == 0  # new access tokens written by the sweep, too
    raw = b"".join(p.read_bytes() for p in keeper.workdir.glob("keeper.db*"))
    secrets = {g["access_token"] for g in grants} | {g["refresh_token"] for g in grants}
    con = Store(f"sqlite:///{keeper.workdir / 'keeper.db'}",
                cipher=Cipher(load_keys([keeper.workdir / "keeper.key"]))).open()
    for g in grants:
        stored = con.get_grant(g["appid"], g["openid"])
        assert stored is not None
        secrets |= {stored.access_token, stored.refresh_token}
    con.close()
    assert len(secrets) == 60
    assert [s for s in secrets if s.encode() in raw] == []
    assert (keeper.workdir / "keeper.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.db
@pytest.mark.e2e
def test_a_postgresql_dump_holds_no_token() -> None:
    url = require_postgres()
    reset_postgres()
    store = Store(url, cipher=TEST_CIPHER, auto_upgrade=True).open()
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        if IN_CI:
            pytest.fail("pg_dump is required when CI is set")
        pytest.skip("pg_dump is not installed")
    put(store, *(grant(o, a, r) for o, a, r in tokens(50)))
    store.close()
    parsed = make_url(url)
    dump = subprocess.run(
        [pg_dump, "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432), "-U",
         parsed.username or "postgres", "--data-only", parsed.database or "test"],
        capture_output=True, check=True,
    ).stdout
    assert b"ACCESS-plain-0001" not in dump and b"REFRESH-plain" not in dump
    assert dump.count(b"gAAAAA") >= 100  # the Fernet tokens are there instead


def test_the_wrong_key_is_refused_and_nothing_is_touched(db_url: str) -> None:
    right = Cipher([Fernet.generate_key()])
    s = Store(db_url, cipher=right, auto_upgrade=True).open()
    put(s, *(grant(o, a, r) for o, a, r in tokens(3)))
    s.close()
    wrong = Store(db_url, cipher=Cipher([Fernet.generate_key()]))
    with pytest.raises(WrongKey, match="key"):
        wrong.open()
    wrong.close()
    again = Store(db_url, cipher=right).open()
    stored = again.get_grant("wx1", "o2")
    assert stored is not None and stored.refresh_token == "REFRESH-plain-0002-zz"
    again.close()


def test_rotation_reencrypts_in_resumable_batches_and_the_old_key_can_go(db_url: str) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    s = Store(db_url, cipher=Cipher([old]), auto_upgrade=True).open()
    put(s, *(grant(o, a, r) for o, a, r in tokens(7)))
    s.close()
    both = Store(db_url, cipher=Cipher([new, old])).open()
    assert both.rotate_keys(batch=3) == (3, 4)  # interrupted here, say
    both.close()
    resumed = Store(db_url, cipher=Cipher([new, old])).open()
    assert resumed.rotate_keys(batch=3) == (3, 1)
    assert resumed.rotate_keys(batch=3) == (1, 0)
    resumed.close()
    only_new = Store(db_url, cipher=Cipher([new])).open()
    for o, a, r in tokens(7):
        g = only_new.get_grant("wx1", o)
        assert g is not None and (g.access_token, g.refresh_token) == (a, r)
    only_new.close()
    with pytest.raises(WrongKey):
        Store(db_url, cipher=Cipher([old])).open()


def test_plaintext_tokens_from_before_encryption_are_encrypted_by_a_migration(
    db_url: str,
) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, target="0001")
    with engine.begin() as conn:
        for o, a, r in tokens(5):
            conn.execute(text(
                "INSERT INTO grants (appid, openid, scope, access_token, refresh_token, "
                "access_expires_at, refresh_issued_at, state, failures, created_at, updated_at) "
                "VALUES ('wx1', :o, 'snsapi_base', :a, :r, :t, :t, 'active', 0, :t, :t)"
            ), {"o": o, "a": a, "r": r, "t": NOW if engine.url.get_backend_name() != "sqlite"
                else NOW.replace(tzinfo=None)})
    cipher = Cipher([Fernet.generate_key()])
    assert db.upgrade(engine, cipher=cipher)[1] == db.head_revision(engine)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT access_token, refresh_token, key_id FROM grants "
                                   "ORDER BY id")).all()
    engine.dispose()
    assert all(row.key_id == cipher.primary_id for row in stored)
    assert [(cipher.decrypt(a), cipher.decrypt(r)) for a, r, _ in stored] == [
        (a, r) for _, a, r in tokens(5)]
    s = Store(db_url, cipher=cipher).open()
    g = s.get_grant("wx1", "o4")
    assert g is not None and g.access_token == "ACCESS-plain-0004-zz"
    s.close()


@pytest.mark.e2e
def test_the_embedded_default_creates_its_key_once_mode_0600(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(f'database_url = "sqlite:///{tmp_path}/var/keeper.db"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    runs = [subprocess.run([sys.executable, "-m", "keeper", "--config", str(config), "status"],
                           capture_output=True, text=True, env=env, check=False)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    key = tmp_path / "var" / "keeper.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert ["encryption.key_created" in r.stderr for r in runs] == [True, False]
    assert load_keys([key])[0].decode() not in runs[0].stderr + runs[0].stdout


def test_postgresql_needs_a_configured_key(keeper: Keeper) -> None:
    keeper.write_config('api_base = "http://127.0.0.1:9"\n')
    keeper.env["KEEPER_DATABASE_URL"] = "postgresql+psycopg://postgres@127.0.0.1:1/x"
    ran = keeper.run("status")
    assert ran.code == 2 and "encryption_key_file is required" in ran.err


def test_rotate_key_command(sim: Simulator, keeper: Keeper) -> None:
    seed(sim, keeper, [make_grant(f"o{i}") for i in range(5)])
    new = keeper.run("rotate-key", "--new")
    assert new.code == 0 and len(new.out.strip()) == 44
    old_key = (keeper.workdir / "keeper.key").read_text()
    (keeper.workdir / "keeper.key").write_text(new.out + old_key)
    ran = keeper.run("rotate-key", "--json")
    assert ran.code == 0, ran.err
    assert json.loads(ran.out) == {"rotated": 5, "key_id": key_id(new.out.strip().encode())}
    assert new.out.strip() not in ran.err + ran.out
    (keeper.workdir / "keeper.key").write_text(new.out)  # the old key is gone now
    token = keeper.run("token", "--app", "wx00000000000000a1", "o3")
    assert token.code == 0 and token.out.strip() == "AT-o3-e2e-secret"
    (keeper.workdir / "keeper.key").write_text(Fernet.generate_key().decode())
    refused = keeper.run("status")
    assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1
    assert "key" in refused.err


def test_a_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a Fernet key"):
        load_keys([bad])
    good = tmp_path / "good.key"
    create_key_file(good)
    with pytest.raises(FileExistsError):
        create_key_file(good)  # never overwritten
    assert len(load_keys([good])) == 1


def test_a_token_read_with_remember_is_written_back_as_it_was() -> None:
    """A sweep writes back the refresh token it read when WeChat answers with the same one:
    the stored token is reused rather than sealed again, and still decrypts."""
    cipher = Cipher([Fernet.generate_key()])
    stored = cipher.encrypt("rt-1")
    assert cipher.decrypt(stored, remember=True) == "rt-1"
    assert cipher.encrypt("rt-1") == stored
    assert cipher.encrypt("rt-2") != cipher.encrypt("rt-2")  # others are sealed anew
    assert cipher.decrypt(cipher.encrypt("rt-1")) == "rt-1"


def test_only_what_the_primary_key_sealed_is_remembered_and_no_more_than_its_bound() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    sealed_by_old = Cipher([old]).encrypt("rt-1")
    cipher = Cipher([new, old])
    assert cipher.decrypt(sealed_by_old, remember=True) == "rt-1"
    resealed = cipher.encrypt("rt-1")  # a rotation must move it to the new key
    assert resealed != sealed_by_old and Cipher([new]).decrypt(resealed) == "rt-1"
    for i in range(crypto.REMEMBERED + 10):
        cipher.decrypt(cipher.encrypt(f"t-{i}"), remember=True)
    assert len(cipher._sealed) == crypto.REMEMBERED
