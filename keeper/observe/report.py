"""What the status page shows, read in one place: ``keeper status``'s counts, grants by app and
state, the re-login forecast, the last sweeps and the quota used per app and endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keeper.config import Config
from keeper.core.forecast import Day
from keeper.core.quota import usage
from keeper.observe.forecast import DEFAULT_DAYS, forecast
from keeper.store.grants import Store

SWEEPS_SHOWN = 50


@dataclass(frozen=True)
class Sweep:
    """One sweep of the history (``seconds`` is ``None`` while it runs, or if it never
    finished)."""

    id: int
    started_at: datetime
    finished_at: datetime | None
    host: str
    seconds: float | None
    refreshed: int
    failures: int
    reauth_recorded: int


@dataclass(frozen=True)
class QuotaUse:
    """Permits taken by all processes in the current window of one app's endpoint quota."""

    appid: str
    endpoint: str
    used: int
    previous: int
    limit: int
    period_s: float


@dataclass(frozen=True)
class Report:
    now: datetime
    status: dict[str, Any]
    grants: dict[tuple[str, str], int]
    forecast: list[Day]
    sweeps: list[Sweep]
    quota: list[QuotaUse]
    webhooks: int = 0  # configured [[webhooks]]


def build_report(store: Store, config: Config, now: datetime,
                 days: int = DEFAULT_DAYS) -> Report:
    """Everything on the status page, read at ``now``."""
    status = store.status(now)
    status["last_sweep"] = store.last_sweep()
    status.update(store.delivery_counts())  # events_pending, events_failed
    return Report(now=now, status=status, grants=store.grant_counts(),
                  forecast=forecast(store, config, now, days),
                  sweeps=[_sweep(s) for s in store.recent_sweeps(SWEEPS_SHOWN)],
                  quota=quota_use(store, config, now), webhooks=len(config.webhooks))


def _sweep(row: dict[str, Any]) -> Sweep:
    s = row["summary"]
    seconds = s.get("seconds") if row["finished_at"] is not None else None
    return Sweep(
        id=row["id"], started_at=row["started_at"], finished_at=row["finished_at"],
        host=row["host"], seconds=float(seconds) if isinstance(seconds, int | float) else None,
        refreshed=int(s.get("refresh_tokens_refreshed", 0))
        + int(s.get("access_tokens_refreshed", 0)),
        failures=int(s.get("transient_failures", 0)),
        reauth_recorded=int(s.get("reauth_recorded", 0)),
    )


def quota_use(store: Store, config: Config, now: datetime) -> list[QuotaUse]:
    """Every configured quota with the permits taken in its current and previous window, as
    the shared quota rows count them (every process's permits)."""
    rows = {(r["appid"], r["endpoint"]): r for r in store.quota_rows()}
    now_us = int(now.timestamp() * 1_000_000)
    found = []
    for app in config.apps:
        for endpoint, quota in app.quotas.items():
            if quota is None:
                continue
            period_us = round(quota.period_s * 1_000_000)
            row = rows.get((app.appid, endpoint))
            current = previous = 0
            if row is not None:
                u = usage(row["window_us"], row["window_permits"], row["previous_permits"],
                          now_us, period_us)
                current, previous = u.current, u.previous
            found.append(QuotaUse(app.appid, endpoint, current, previous, quota.count,
                                  quota.period_s))
    return found
