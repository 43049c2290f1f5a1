"""A WeChat OAuth2 simulator: a real loopback HTTP server imitating WeChat's four sns endpoints.

Keeper's tests, ``keeper demo`` and the benchmarks talk to it over real HTTP as they talk to
``api.weixin.qq.com``: every answer is HTTP 200 with a JSON body sent as charset-less
``text/plain``, errors are ``{"errcode": N, "errmsg": "..."}``, codes are single-use, refresh
tokens die after ``refresh_token_days``, quotas are per app in epoch-aligned windows, and an
avatar URL stops working once its user changes avatar (which ``avatar_change_every`` can make
happen on its own). ``/hostile/<kind>/...`` serves avatars no client should accept (an endless
body, a bomb, redirect loops, lying content types...: see ``HOSTILE_KINDS``); ``set_avatar_url``
points a user's ``headimgurl`` at one. ``/connect/qrconnect`` is WeChat's authorize page: a
browser confirms a simulated user there and is sent to the app's callback with a code and its
state. ``/_sim/*`` is a JSON admin API, so a simulator in another
process (``keeper simulate``) can be set up and inspected.

Times are Unix seconds read from ``clock`` (``time.time`` unless a test passes another);
durations are seconds unless their name says otherwise.
"""

from __future__ import annotations

from keeper.wechat.simulator.answers import ODD_ANSWERS, ODD_BY_NAME, OddAnswer, describe
from keeper.wechat.simulator.authorize import (
    LOGIN_PAGES,
    SIM_USERS,
    SimUser,
    openid_for,
    unionid_for,
)
from keeper.wechat.simulator.errmsgs import ERRCODES, UNKNOWN_ERRCODE, Errcode, errmsg
from keeper.wechat.simulator.hostile import HOSTILE_KINDS, HOSTILE_REDIRECT_OUT
from keeper.wechat.simulator.records import (
    ACCESS_TOKEN_LIFETIME_S,
    DEFAULT_QUOTAS,
    ENDPOINTS,
    FAILURE_KINDS,
    GRANT_STATES,
    HOSTILE_OK_KEY,
    SimQuota,
    parse_quota,
)
from keeper.wechat.simulator.server import Simulator

__all__ = [
    "ACCESS_TOKEN_LIFETIME_S",
    "DEFAULT_QUOTAS",
    "ENDPOINTS",
    "ERRCODES",
    "FAILURE_KINDS",
    "GRANT_STATES",
    "HOSTILE_KINDS",
    "HOSTILE_OK_KEY",
    "HOSTILE_REDIRECT_OUT",
    "LOGIN_PAGES",
    "ODD_ANSWERS",
    "ODD_BY_NAME",
    "SIM_USERS",
    "UNKNOWN_ERRCODE",
    "Errcode",
    "OddAnswer",
    "SimQuota",
    "SimUser",
    "Simulator",
    "describe",
    "errmsg",
    "openid_for",
    "parse_quota",
    "unionid_for",
]
