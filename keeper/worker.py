"""The work on one leased grant: refresh it if due, read its profile if due.

Runs in a worker thread. Takes WeChat's answers, applies the policy, and returns the grant's
new state for the sweep to write; never touches the database except through the quota gate.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

import structlog

from keeper.config import AppConfig, Config
from keeper.errors import (
    AppConfigRejected,
    NoProfile,
    QuotaExceeded,
    ReauthRequired,
    StaleAccessToken,
    TransientApiError,
)
from keeper.limiter import QuotaGate, QuotaWait, Stopped
from keeper.models import Grant, Profile, Reauth
from keeper.policy import (
    ACCESS,
    Lifetime,
    after_reauth,
    after_refresh,
    after_transient,
    profile_due,
    refresh_reason,
    schedule,
)
from keeper.store import GrantWrite
from keeper.wechat import WeChatClient

log = structlog.get_logger(__name__)

#: A worker waits this long at most for a quota permit; a longer pause (45011 until the next
#: minute, 45009 until midnight) defers the app's grants to a later sweep instead.
QUOTA_MAX_WAIT_S = 10.0


def lifetime(app: AppConfig, config: Config) -> Lifetime:
    """The policy's clock for one app."""
    return Lifetime(
        lifetime_s=app.refresh_lifetime_s,
        refresh_at_s=app.refresh_at_s,
        access_margin_s=config.access_margin_s,
        profile_interval_s=config.profile_interval_s,
    )


@dataclass
class Result:
    """What working one grant produced: a write, or a lease to give back, and counts."""

    grant: Grant
    write: GrantWrite | None = None
    counts: Counter[str] = field(default_factory=Counter)
    rejected_app: AppConfigRejected | None = None
    quota_wait: QuotaWait | None = None


class Worker:
    """Does the WeChat calls for grants; shared by all worker threads."""

    def __init__(
        self, *, config: Config, client: WeChatClient, gate: QuotaGate, stop: threading.Event,
        clock: Callable[[], datetime], rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.gate = gate
        self.stop = stop
        self.clock = clock
        self.rng = rng or random.Random()
        #: Set by a sweep that gave up on WeChat: grants still queued go back untouched.
        self.halt = threading.Event()
        self.clocks = {a.appid: lifetime(a, config) for a in config.apps}

    def _refresh(
        self, g: Grant, counts: Counter[str], reason: str
    ) -> tuple[Grant, Reauth | None, bool]:
        self.gate.acquire(g.appid, "refresh", max_wait_s=QUOTA_MAX_WAIT_S)
        answer = self.client.refresh(g.appid, g.refresh_token)
        now = self.clock()
        result = after_refresh(g, answer, self.clocks[g.appid], now)
        counts["access_tokens_refreshed" if reason == ACCESS else "refresh_tokens_refreshed"] += 1
        if result.renewed:
            counts["refresh_tokens_renewed"] += 1
        if result.reauth is not None:
            counts["refresh_tokens_expiring"] += 1
            counts["reauth_recorded"] += 1
            log.info("reauth.recorded", appid=g.appid, openid=g.openid,
                     reason=result.reauth.reason, errcode=None)
        return result.grant, result.reauth, result.clear_reauth

    def _userinfo(self, g: Grant) -> Profile:
        self.gate.acquire(g.appid, "userinfo", max_wait_s=QUOTA_MAX_WAIT_S)
        data = self.client.userinfo(g.access_token, g.openid, self.config.userinfo_lang)
        return Profile.from_answer(data, self.clock())

    def _profile(
        self, g: Grant, counts: Counter[str]
    ) -> tuple[Grant, Profile, Reauth | None, bool]:
        record: Reauth | None = None
        clear = False
        try:
            try:
                profile = self._userinfo(g)
            except StaleAccessToken:
                # WeChat no longer takes this access token: refresh it, then try once more.
                counts["stale_access_tokens"] += 1
                g, record, clear = self._refresh(g, counts, ACCESS)
                profile = self._userinfo(g)
        except NoProfile as e:
            now = self.clock()
            stop = e.errcode if e.errcode == 48001 else None
            counts["no_profile"] += 1
            g = replace(g, profile_at=now, profile_stop=stop)
            return g, Profile(fetched_at=now, errcode=e.errcode), record, clear
        counts["profiles_fetched"] += 1
        g = replace(g, profile_at=profile.fetched_at, unionid=profile.unionid or g.unionid)
        return g, profile, record, clear

    def work(
        self, grant: Grant, *, profile_reads: bool = True, force_refresh: bool = False
    ) -> Result:
        """Bring one leased grant up to date; never raises for WeChat's or the network's sake.

        ``profile_reads=False``: tokens only (``keeper token``); ``force_refresh``: refresh
        even when nothing is due.
        """
        result = Result(grant)
        counts = result.counts
        clock = self.clocks.get(grant.appid)
        if clock is None or self.stop.is_set() or self.halt.is_set():
            return result
        now = self.clock()
        g, profile, record, clear = grant, None, None, False
        try:
            reason = refresh_reason(g, clock, now) or (ACCESS if force_refresh else None)
            if reason:
                g, record, clear = self._refresh(g, counts, reason)
            if profile_reads and profile_due(g, clock, self.clock()):
                g, profile, rec2, clr2 = self._profile(g, counts)
                record, clear = rec2 or record, clr2 or clear
        except ReauthRequired as e:
            g, record = after_reauth(g, e.errcode, self.clock())
            counts["reauth_recorded"] += 1
            log.info("reauth.recorded", appid=g.appid, openid=g.openid, reason=record.reason,
                     errcode=e.errcode, endpoint=e.endpoint)
        except QuotaExceeded as e:
            counts["transient_failures"] += 1
            until = self.gate.pause(g.appid, e.endpoint, e.errcode or 45011, self.clock())
            g = after_transient(g, str(e.errcode), self.clock(), not_before=until, count=False)
        except AppConfigRejected as e:
            counts["transient_failures"] += 1
            result.rejected_app = e
            g = after_transient(g, str(e.errcode), self.clock(), rng=self.rng, count=False)
        except TransientApiError as e:
            counts["transient_failures"] += 1
            kind = str(e.errcode) if e.errcode is not None else e.detail[:64]
            log.debug("wechat.transient", appid=g.appid, openid=g.openid, endpoint=e.endpoint,
                      errcode=e.errcode, detail=e.detail)
            g = after_transient(g, kind, self.clock(), rng=self.rng)
        except QuotaWait as e:
            result.quota_wait = e
            counts["quota_deferred"] += 1
            if g is grant:
                return result  # nothing happened: give the lease back unchanged
            g = after_transient(g, "quota", self.clock(), not_before=e.until, count=False)
        except Stopped:
            if g is grant:
                return result
        if record is not None and record.reason != "refresh_token_expiring":
            clear = False
        result.write = GrantWrite(g, schedule(g, clock), profile, record, clear)
        return result
