"""The local journal: sealed, durable, replayed once, never overwriting a newer token."""

from __future__ import annotations

import fcntl
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from keeper.core.models import Profile, Reauth
from keeper.core.policy import schedule
from keeper.crypto import Cipher
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from keeper.sweep.journal import Journal, dumps, loads
from tests.conftest import TEST_CIPHER
from tests.store.test_grants import CLOCK, LEASE, NOW, claim, grant, put


def result(store: Store, openid: str = "o1") -> tuple[GrantWrite, str]:
    put(store, grant(openid, access_expires_at=NOW - timedelta(days=1)))
    [g] = [x for x in claim(store, lease_id=f"L-{openid}") if x.openid == openid]
    new = replace(g, access_token=f"AT-{openid}-rotated-secret",
                  refresh_token=f"RT-{openid}-rotated-secret", refresh_issued_at=NOW)
    write = GrantWrite(new, schedule(new, CLOCK), Profile(NOW, nickname="昵称\U0001f600"),
                       Reauth("refresh_token_expiring", None, NOW), clear_reauth=True,
                       base=(g.access_token, g.refresh_token))
    return write, f"L-{openid}"


def test_a_result_round_trips_exactly(store: Store) -> None:
    write, lease = result(store)
    assert loads(dumps(write, lease)) == (write, lease)
    # A takeover's doubtful answer keeps what lets the store hold it when replayed.
    taken = replace(write, grant=replace(write.grant, taken_over=True, held_errcode=40030,
                                         held_since=NOW), hold_s=300.0)
    assert loads(dumps(taken, lease)) == (taken, lease)


def test_a_profile_journaled_before_sex_was_an_integer_loads_as_one(store: Store) -> None:
    write, lease = result(store)
    write = replace(write, profile=replace(write.profile, sex=1))  # type: ignore[type-var]
    line = dumps(write, lease)
    assert '"sex": 1' in line
    assert loads(line.replace('"sex": 1', '"sex": "1"')) == (write, lease)


def test_files_are_sealed_private_and_hold_no_token(store: Store, tmp_path: Path) -> None:
    write, lease = result(store, "openid-journal-marker")
    path = Journal(tmp_path / "j", TEST_CIPHER).write([(write, lease)])
    assert path is not None and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o700
    raw = path.read_bytes()
    assert b"rotated-secret" not in raw and b"openid-journal-marker" not in raw
    assert raw.startswith(b"gAAAA")
    assert not list((tmp_path / "j").glob(".*.tmp"))


def test_replay_writes_once_and_removes_the_file(store: Store, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", TEST_CIPHER)
    w1, l1 = result(store, "o1")
    w2, l2 = result(store, "o2")
    journal.write([(w1, l1), (w2, l2)])
    counts = journal.replay(store, NOW)
    assert counts == {"files": 1, "results": 2, "written": 2, "unreadable": 0}
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.refresh_token == "RT-o1-rotated-secret"
    assert store.reauth_record(stored.id) is not None and journal.files() == []
    # The same results again (a second copy of the file): superseded, nothing written.
    journal.write([(w1, l1)])
    assert journal.replay(store, NOW)["written"] == 0


def test_a_journaled_result_survives_its_lease_lapsing(store: Store, tmp_path: Path) -> None:
    write, lease = result(store)
    journal = Journal(tmp_path / "j", TEST_CIPHER)
    journal.write([(write, lease)])
    later = LEASE + timedelta(minutes=1)
    assert journal.replay(store, later)["written"] == 1


def test_a_file_another_process_is_replaying_is_left_to_it(store: Store, tmp_path: Path) -> None:
    write, lease = result(store)
    journal = Journal(tmp_path / "j", TEST_CIPHER)
    path = journal.write([(write, lease)])
    assert path is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert journal.replay(store, NOW)["files"] == 0 and path.exists()
    finally:
        os.close(fd)


def test_a_file_the_keys_cannot_open_is_kept_and_said(store: Store, tmp_path: Path) -> None:
    write, lease = result(store)
    Journal(tmp_path / "j", Cipher([Fernet.generate_key()])).write([(write, lease)])
    journal = Journal(tmp_path / "j", TEST_CIPHER)
    with capture_logs() as logs:
        counts = journal.replay(store, datetime.now(UTC))
    assert counts["unreadable"] == 1 and len(journal.files()) == 1
    assert [e["event"] for e in logs] == ["journal.unreadable"]
