"""The local journal: results WeChat answered that could not reach the database before exit.

When keeper must exit while the database is down (SIGTERM during an outage), the results it
still holds are written here, one file per exit, and the next start writes them to the
database before it claims anything. Each line is one result, encrypted whole with the token
key (Fernet), so a journal file holds no token in the clear; files are created 0600, fsync'd,
renamed into place, and the directory fsync'd. Replaying is idempotent: a result is written
only while its lease or its starting tokens still hold (see :meth:`Store.apply`), so a file
replayed twice, or one whose results were committed after all, writes nothing twice and
never overwrites a newer token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from keeper.core.clean import sex_code
from keeper.core.models import Grant, Profile, Reauth
from keeper.core.policy import Schedule
from keeper.crypto import Cipher, WrongKey
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.journal")

SUFFIX = ".journal"


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$t": value.isoformat()}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "$t" in value:
        return datetime.fromisoformat(value["$t"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def _record(obj: Any) -> dict[str, Any] | None:
    return None if obj is None else {k: _encode(v) for k, v in asdict(obj).items()}


def _build(cls: Any, data: dict[str, Any] | None) -> Any:
    if data is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: _decode(v) for k, v in data.items() if k in names})


def _profile(data: dict[str, Any] | None) -> Profile | None:
    """A journaled profile. One journaled before ``sex`` became WeChat's integer (migration
    0009) holds it as text: it is made the integer, as a profile read would."""
    if data is not None and "sex" in data:
        data = {**data, "sex": sex_code(data["sex"])}
    return _build(Profile, data)  # type: ignore[no-any-return]


def dumps(write: GrantWrite, lease_id: str) -> str:
    """One result as a JSON line (tokens in it: encrypt before it leaves memory)."""
    return json.dumps({
        "lease_id": lease_id,
        "grant": _record(write.grant),
        "schedule": _record(write.schedule),
        "profile": _record(write.profile),
        "reauth": _record(write.reauth),
        "clear_reauth": write.clear_reauth,
        "base": list(write.base) if write.base else None,
        "hold_s": write.hold_s,
    }, ensure_ascii=False)


def loads(text: str) -> tuple[GrantWrite, str]:
    data = json.loads(text)
    base = data.get("base")
    write = GrantWrite(
        grant=_build(Grant, data["grant"]),
        schedule=_build(Schedule, data["schedule"]),
        profile=_profile(data.get("profile")),
        reauth=_build(Reauth, data.get("reauth")),
        clear_reauth=bool(data.get("clear_reauth")),
        base=(str(base[0]), str(base[1])) if base else None,
        hold_s=None if data.get("hold_s") is None else float(data["hold_s"]),
    )
    return write, str(data["lease_id"])


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Journal files under ``directory``, sealed with ``cipher``."""

    def __init__(self, directory: Path, cipher: Cipher) -> None:
        self.directory = directory
        self.cipher = cipher

    def write(self, entries: Sequence[tuple[GrantWrite, str]]) -> Path | None:
        """Keep ``entries`` (result, lease id) durably; the file, or None when empty.

        Raises OSError when the disk refuses (full, read-only): the caller logs what is lost.
        """
        if not entries:
            return None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.directory / f".{name}.tmp"
        final = self.directory / f"{name}{SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                for write, lease_id in entries:
                    f.write(self.cipher.encrypt(dumps(write, lease_id)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return final

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    @staticmethod
    @contextlib.contextmanager
    def _locked(path: Path) -> Iterator[int | None]:
        """The file's descriptor under an exclusive lock, or None if another process has it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield fd
        finally:
            os.close(fd)

    def replay(self, store: Store, now: datetime) -> dict[str, int]:
        """Write every journal file's results to ``store``; a file is removed once committed.

        Raises StoreError when the database fails (the files stay for the next try).
        """
        counts = {"files": 0, "results": 0, "written": 0, "unreadable": 0}
        for path in self.files():
            with self._locked(path) as fd:
                if fd is None or not path.exists():
                    continue  # another keeper process on this host is replaying it
                with os.fdopen(os.dup(fd), encoding="ascii") as f:
                    lines = [line.strip() for line in f if line.strip()]
                by_lease: dict[str, list[GrantWrite]] = {}
                try:
                    for line in lines:
                        write, lease_id = loads(self.cipher.decrypt(line))
                        by_lease.setdefault(lease_id, []).append(write)
                except (WrongKey, ValueError, KeyError, TypeError) as e:
                    counts["unreadable"] += 1
                    log.error("journal.unreadable", file=str(path), error=type(e).__name__)
                    continue
                for lease_id, writes in by_lease.items():
                    counts["written"] += store.apply(writes, lease_id, now)
                counts["files"] += 1
                counts["results"] += len(lines)
                path.unlink()
                _fsync_dir(self.directory)
        return counts
