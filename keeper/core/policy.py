"""What is due, what an answer means for a grant, and when to try again.

Pure code with ``now`` as a parameter: it reads like the documentation it implements
(docs/reference/wechat.md) and is tested without a clock, a network or a database.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from keeper.core.models import (
    ACTIVE,
    AUTHORIZATION_REVOKED,
    EXPIRING,
    OTHER,
    REAUTH,
    REFRESH_TOKEN_EXPIRED,
    REFRESH_TOKEN_EXPIRING,
    REFRESH_TOKEN_INVALID,
    Grant,
    Reauth,
    TokenAnswer,
)

#: Why a refresh call is made: the first two keep the refresh token alive, the last the access
#: token.
REFRESH_DAY = "refresh_day"
LIFETIME_OVER = "lifetime_over"
ACCESS = "access"

BACKOFF_BASE_S = 15.0
BACKOFF_CAP_S = 900.0

_REAUTH_REASONS = {
    40030: REFRESH_TOKEN_INVALID,
    42002: REFRESH_TOKEN_EXPIRED,
    42007: AUTHORIZATION_REVOKED,
}


@dataclass(frozen=True)
class Lifetime:
    """An app's refresh-token clock, in seconds."""

    lifetime_s: float
    refresh_at_s: float
    access_margin_s: float
    profile_interval_s: float
    #: ``access_refresh = "ahead"``: sweeps keep access tokens valid. ``False``
    #: (``"on_demand"``): only when asked for, or when a profile read needs one.
    access_ahead: bool = True


@dataclass(frozen=True)
class Schedule:
    """When each kind of work on a grant falls due (``None``: never)."""

    refresh_due_at: datetime | None  # keep the refresh token alive
    access_due_at: datetime | None  # keep the access token valid
    profile_due_at: datetime | None  # read the profile


def refresh_reason(grant: Grant, clock: Lifetime, now: datetime) -> str | None:
    """Why ``grant`` needs a refresh call at ``now``, or ``None``."""
    if grant.state == REAUTH:
        return None
    issued = grant.refresh_issued_at
    if grant.state == EXPIRING:
        # Past its lifetime keeper tries once more and lets WeChat's answer decide.
        if now >= issued + timedelta(seconds=clock.lifetime_s):
            return LIFETIME_OVER
    elif now >= issued + timedelta(seconds=clock.refresh_at_s):
        return REFRESH_DAY
    if clock.access_ahead and access_stale(grant, clock, now):
        return ACCESS
    return None


def access_stale(grant: Grant, clock: Lifetime, now: datetime) -> bool:
    """Whether the access token expires within the margin at ``now``."""
    return now >= grant.access_expires_at - timedelta(seconds=clock.access_margin_s)


def profile_due(grant: Grant, clock: Lifetime, now: datetime) -> bool:
    """Whether the profile of ``grant`` should be read at ``now``."""
    if grant.state == REAUTH or not grant.wants_profile:
        return False
    if grant.profile_retry_at is not None and now < grant.profile_retry_at:
        return False
    return grant.profile_at is None or now >= grant.profile_at + timedelta(
        seconds=clock.profile_interval_s
    )


def schedule(grant: Grant, clock: Lifetime) -> Schedule:
    """When each kind of work on ``grant`` falls due, after any backoff."""
    if grant.state == REAUTH:
        return Schedule(None, None, None)
    issued = grant.refresh_issued_at
    refresh_due = issued + timedelta(
        seconds=clock.lifetime_s if grant.state == EXPIRING else clock.refresh_at_s
    )
    access_due: datetime | None = None
    if clock.access_ahead:
        access_due = grant.access_expires_at - timedelta(seconds=clock.access_margin_s)
    profile: datetime | None = None
    if grant.wants_profile:
        profile = (
            grant.profile_at + timedelta(seconds=clock.profile_interval_s)
            if grant.profile_at
            else issued - timedelta(days=1)  # never read: due at once
        )
    if grant.retry_at:
        hold = grant.retry_at
        refresh_due = max(refresh_due, hold)
        access_due = max(access_due, hold) if access_due else None
        profile = max(profile, hold) if profile else None
    if profile and grant.profile_retry_at:
        profile = max(profile, grant.profile_retry_at)  # a failed read waits; tokens do not
    return Schedule(refresh_due, access_due, profile)


@dataclass(frozen=True)
class RefreshResult:
    """A grant after a successful refresh, and what changed about its re-authorization."""

    grant: Grant
    renewed: bool  # the 30-day clock restarted
    reauth: Reauth | None  # a record to write (refresh_token_expiring)
    clear_reauth: bool  # the expiring record no longer holds


def after_refresh(
    grant: Grant, answer: TokenAnswer, clock: Lifetime, now: datetime
) -> RefreshResult:
    """Apply a refresh answer received at ``now``.

    The 30-day clock restarts only when WeChat returns a *different* refresh token, or when a
    refresh past the token's lifetime still succeeds. The same token returned on or after the
    refresh day means the grant will lapse at its end: the user is listed as
    ``refresh_token_expiring``.
    """
    issued = grant.refresh_issued_at
    new = replace(
        grant,
        access_token=answer.access_token,
        access_expires_at=now + timedelta(seconds=answer.expires_in_s),
        refresh_token=answer.refresh_token,
        scope=answer.scope or grant.scope,
        unionid=answer.unionid or grant.unionid,
        failures=0,
        retry_at=None,
        last_error=None,
    )
    rotated = answer.refresh_token != grant.refresh_token
    if rotated or now >= issued + timedelta(seconds=clock.lifetime_s):
        return RefreshResult(
            replace(new, refresh_issued_at=now, state=ACTIVE), True, None, grant.state == EXPIRING
        )
    if now >= issued + timedelta(seconds=clock.refresh_at_s):
        if grant.state == EXPIRING:
            return RefreshResult(new, False, None, False)
        record = Reauth(REFRESH_TOKEN_EXPIRING, None, now)
        return RefreshResult(replace(new, state=EXPIRING), False, record, False)
    return RefreshResult(new, False, None, False)


def reauth_reason(errcode: int | None) -> str:
    """The contract's reason for a definitive WeChat answer."""
    return _REAUTH_REASONS.get(errcode or 0, OTHER)


def after_reauth(grant: Grant, errcode: int | None, now: datetime) -> tuple[Grant, Reauth]:
    """WeChat said the grant is dead: the user must log in again."""
    record = Reauth(reauth_reason(errcode), errcode, now)
    return replace(grant, state=REAUTH, retry_at=None, last_error=str(errcode),
                   held_errcode=None, held_since=None), record


#: Definitive answers that another holder's refresh explains as well as a dead grant does.
#: WeChat answers 40030 for a refresh token it has replaced and 42002 for one past its
#: lifetime, so a process that took a grant over from a lapsed lease, and sent the tokens it
#: found, hears one of them while the earlier holder (frozen, not dead) holds the successor.
#: 42007 (a password change, a withdrawn authorization) kills every token of the
#: authorization, the newest too: no earlier holder can hold a live one.
SUPERSEDABLE = frozenset({40030, 42002})


def held_answer(errcode: int | None) -> bool:
    """Whether a definitive answer about the tokens a holder started from is held, not
    recorded, when an earlier holder may still write their successor."""
    return errcode in SUPERSEDABLE


def confirm_held(grant: Grant) -> tuple[Grant, Reauth]:
    """The hold on WeChat's answer is over and nobody wrote newer tokens meanwhile: the answer
    stands, as WeChat gave it then (no second call: the tokens are the ones it refused)."""
    if grant.held_errcode is None or grant.held_since is None:
        raise ValueError("the grant holds no answer to confirm")
    return after_reauth(grant, grant.held_errcode, grant.held_since)


def backoff_s(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``failures`` transient failures in a row:
    capped exponential with "equal jitter" (half fixed, half random) so an outage does not
    bring every grant back in the same second."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** max(0, failures - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def after_transient(
    grant: Grant, kind: str, now: datetime, *, not_before: datetime | None = None,
    rng: random.Random | None = None, count: bool = True,
) -> Grant:
    """A transient failure: try again later, never a re-authorization.

    ``not_before``: a quota pause; ``count=False`` for failures that are not the grant's
    (a quota pause, an app-wide configuration error) and so do not grow its backoff.
    """
    failures = grant.failures + 1 if count else grant.failures
    retry = now + timedelta(seconds=backoff_s(max(1, failures), rng))
    if not_before and (not count or not_before > retry):
        retry = not_before
    return replace(grant, failures=failures, retry_at=retry, last_error=kind)


#: Profile reads failing in a row before the grant is reported (``profile.failing``, counted
#: as ``profiles_failing`` in ``keeper status``).
PROFILE_FAILING_AFTER = 3


def after_profile_failure(
    grant: Grant, kind: str, now: datetime, *, not_before: datetime | None = None,
    rng: random.Random | None = None,
) -> Grant:
    """A profile read failed (transiently, or with an answer keeper cannot use): only the
    profile waits, with its own backoff; the grant's token refreshes keep their schedule."""
    failures = grant.profile_failures + 1
    retry = now + timedelta(seconds=backoff_s(failures, rng))
    if not_before and not_before > retry:
        retry = not_before
    return replace(grant, profile_failures=failures, profile_retry_at=retry, profile_error=kind)


def after_profile_read(grant: Grant, fetched_at: datetime) -> Grant:
    """A profile read answered (with a profile, or with why there is none)."""
    return replace(grant, profile_at=fetched_at, profile_failures=0, profile_retry_at=None,
                   profile_error=None)
