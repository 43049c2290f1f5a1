"""The re-login forecast of ``keeper forecast`` and the status page: one range query per
configured app (each app has its own ``refresh_token_days``), summed per China date."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keeper.config import Config
from keeper.core.forecast import Day, china_today, day_start, days_of
from keeper.store.grants import Store

DEFAULT_DAYS = 30


def forecast(store: Store, config: Config, now: datetime, days: int = DEFAULT_DAYS) -> list[Day]:
    """For each of ``days`` days from today (China), the live grants of the configured apps
    whose refresh token's lifetime ends that day. Grants of apps no longer configured are
    left out: keeper does not keep them, and their lifetime is not known."""
    today = china_today(now)
    start = day_start(today)
    return days_of(today, days, (
        store.lapse_counts(app.appid, app.refresh_lifetime_s, start, days)
        for app in config.apps))


def forecast_document(days: list[Day]) -> dict[str, Any]:
    """``keeper forecast --json``: ``{"days": [{"date", "lapsing", "expiring"}, ...]}``."""
    return {"days": [{"date": d.date.isoformat(), "lapsing": d.lapsing,
                      "expiring": d.expiring} for d in days]}
