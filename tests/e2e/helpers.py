"""Helpers for end-to-end tests: grants known to both the simulator and keeper."""

from __future__ import annotations

import json
import time
from typing import Any

from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, Keeper

DAY = 86400.0


def make_grant(openid: str, *, access_in_s: float = 3600, issued_days_ago: float = 3,
               scope: str = "snsapi_userinfo", state: str = "ok", unionid: str | None = None,
               now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "appid": APPID, "openid": openid, "access_token": f"AT-{openid}-e2e-secret",
        "refresh_token": f"RT-{openid}-e2e-secret", "scope": scope,
        "access_expires_at": now + access_in_s, "refresh_issued_at": now - issued_days_ago * DAY,
        "unionid": unionid, "state": state,
    }


def seed(sim: Simulator, keeper: Keeper, grants: list[dict[str, Any]]) -> None:
    """Make WeChat (the simulator) and keeper (by `keeper import`) know these grants."""
    sim.add_grants([{k: v for k, v in g.items()} for g in grants])
    lines = "\n".join(
        json.dumps({k: v for k, v in g.items() if k != "state" and v is not None})
        for g in grants
    )
    ran = keeper.run("import", "-", stdin=lines + "\n")
    assert ran.code == 0, ran.err


def endpoint(sim: Simulator, name: str) -> dict[str, Any]:
    return sim.stats()["endpoints"][name]  # type: ignore[index,no-any-return]
