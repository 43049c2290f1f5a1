"""The avatar pass: after a sweep's grants are written, check the avatars of the profiles read
since their avatar was last checked, and download the ones that changed.

It holds no grant lease and runs after the grant work, with its own threads, concurrency limit
and time budget, so a slow or hostile avatar host cannot stall refreshes. What it leaves
undone stays due for the next sweep. A refused download is logged once and tried again only
after the next profile read.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from keeper.avatars.fetcher import AvatarRefused, Fetcher
from keeper.errors import DatabaseUnavailable, StoreError
from keeper.store.avatar_state import AvatarDue
from keeper.store.grants import Store

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.avatar_pass")
PAGE = 200


class AvatarKeeper:
    """Keeps a copy of every user's current avatar under ``avatar_dir``."""

    def __init__(
        self, *, store: Store, fetcher: Fetcher, clock: Callable[[], datetime],
        workers: int = 4, keep_when_removed: bool = True,
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.clock = clock
        self.workers = workers
        self.keep_when_removed = keep_when_removed
        self._db_error: StoreError | None = None
        self._disk_error: OSError | None = None

    def check(self, due: AvatarDue) -> str:
        """Bring one profile's avatar copy up to date; the name of what happened."""
        if not due.headimgurl:
            # The user has no avatar: say so, and keep the last picture unless told not to.
            self.store.record_avatar(due, now=self.clock(), clear_file=not self.keep_when_removed)
            return "avatars_removed"
        if due.avatar_url == due.headimgurl and self.fetcher.intact(due.avatar_path,
                                                                     due.avatar_sha256):
            self.store.record_avatar(due, now=self.clock())
            return "avatars_unchanged"
        try:
            saved = self.fetcher.fetch(due.headimgurl)
        except AvatarRefused as e:
            log.warning("avatar.refused", appid=due.appid, openid=due.openid,
                        host=urlsplit(due.headimgurl).hostname, reason=str(e))
            self.store.record_avatar(due, now=self.clock(), error=str(e)[:120])
            return "avatars_refused"
        self.store.record_avatar(due, now=self.clock(), sha256=saved.sha256, path=saved.path,
                                 size=saved.size, mime=saved.mime)
        log.debug("avatar.saved", appid=due.appid, openid=due.openid, sha256=saved.sha256,
                  size=saved.size, type=saved.mime)
        return "avatars_saved"

    def run(self, stop: threading.Event, *, budget_s: float) -> Counter[str]:
        """Check due avatars until none is left, ``stop`` is set or the budget is spent.

        Raises StoreError when the database fails (once, for the whole pass: the sweep
        reports it as the database being unavailable, not per avatar).
        """
        counts: Counter[str] = Counter()
        deadline = time.monotonic() + budget_s
        after = 0
        self._db_error = self._disk_error = None
        with ThreadPoolExecutor(self.workers, thread_name_prefix="keeper-avatar") as pool:
            while not stop.is_set() and time.monotonic() < deadline:
                page = self.store.due_avatars(PAGE, after_id=after)
                if not page:
                    break
                after = page[-1].grant_id
                for outcome in pool.map(self._safe_check, page):
                    counts[outcome] += 1
                if self._db_error is not None:
                    raise DatabaseUnavailable(str(self._db_error))
                if self._disk_error is not None:
                    break
        return counts

    def _safe_check(self, due: AvatarDue) -> str:
        if self._db_error is not None or self._disk_error is not None:
            return "avatars_postponed"
        try:
            return self.check(due)
        except StoreError as e:  # the database, not this avatar: the pass ends
            self._db_error = e
            return "avatars_postponed"
        except OSError as e:  # a full or read-only disk: said once, the pass ends
            if self._disk_error is None:
                self._disk_error = e
                log.error("avatar.disk_error", error=f"{type(e).__name__}: {e.strerror or e}",
                          directory=str(self.fetcher.avatar_dir))
            return "avatars_postponed"
        except Exception:  # a bug must not end the sweep
            log.exception("avatar.failed", appid=due.appid, openid=due.openid)
            return "avatar_errors"


def cleanup(store: Store, avatar_dir: Path, *, min_age_s: float, now: float) -> Counter[str]:
    """Remove files no profile points to, older than ``min_age_s`` (a download finishing right
    now is never removed: its file is new, and the database is read after the walk)."""
    counts: Counter[str] = Counter()
    if not avatar_dir.is_dir():
        return counts
    candidates = []
    for path in avatar_dir.rglob("*"):
        if path.is_file() and now - path.stat().st_mtime >= min_age_s:
            candidates.append(path)
    in_use = store.avatar_paths()
    for path in candidates:
        relative = path.relative_to(avatar_dir).as_posix()
        if relative in in_use:
            counts["kept"] += 1
            continue
        path.unlink(missing_ok=True)
        counts["removed"] += 1
    return counts
