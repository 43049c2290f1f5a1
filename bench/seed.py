"""The benchmarks' app and grants: the rows the simulator is seeded with, and the same grants
written to keeper's store, due (or not) when the bench says."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from keeper.core.models import Grant
from keeper.core.policy import Lifetime, schedule
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite

APPID = "wxbench0000000001"
SECRET = "bench-secret-not-used"  # noqa: S105 - a simulator app's made-up secret


def app_ids(n: int) -> list[str]:
    """``n`` apps' ids: :data:`APPID` first, then ones like it."""
    return [APPID] + [f"wxbench{i:010d}" for i in range(2, n + 1)]


def grant_rows(n: int, now: float, apps: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` grants as the simulator takes them, of :data:`APPID` or, in turn, of ``apps``;
    access tokens expired a minute before ``now``."""
    apps = apps or [APPID]
    return [
        {"appid": apps[i % len(apps)], "openid": f"bench-{i:07d}", "access_token": f"bench-at-{i}",
         "refresh_token": f"bench-rt-{i}", "access_expires_at": now - 60,
         "refresh_issued_at": now - 3 * 86400, "scope": "snsapi_base"}
        for i in range(n)
    ]


def store_grants(store: Store, rows: list[dict[str, Any]], clock: Lifetime, *,
                 access_expires_at: datetime, spread_s: float = 0.0) -> None:
    """Write ``rows`` to ``store`` (5,000 a batch), their access tokens expiring at
    ``access_expires_at`` and scheduled by ``clock``. ``spread_s``: each expires instead at a
    moment up to that much earlier, drawn at random (seeded), so that the sweep's order (most
    urgent first) is not the order the rows were stored in, as in a table filled by real
    logins: a claim's grants lie scattered over the table's pages, not side by side."""
    at = datetime.now(UTC)
    rng = random.Random(0)
    for i in range(0, len(rows), 5000):
        writes = []
        for r in rows[i:i + 5000]:
            expires = access_expires_at
            if spread_s:
                expires -= timedelta(seconds=rng.uniform(0, spread_s))
            g = Grant(0, r["appid"], r["openid"], None, r["scope"], r["access_token"],
                      r["refresh_token"], expires, at - timedelta(days=3))
            writes.append(GrantWrite(g, schedule(g, clock)))
        store.upsert_grants(writes, at)
