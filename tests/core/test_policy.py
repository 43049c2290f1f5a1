"""The policy reads like the reference: refresh day 29 of 30, same token means expiring."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keeper.core.models import ACTIVE, EXPIRING, REAUTH, Grant, Reauth, TokenAnswer
from keeper.core.policy import (
    ACCESS,
    BACKOFF_CAP_S,
    LIFETIME_OVER,
    REFRESH_DAY,
    Lifetime,
    after_reauth,
    after_refresh,
    after_transient,
    backoff_s,
    confirm_held,
    held_answer,
    profile_due,
    reauth_reason,
    refresh_reason,
    schedule,
)

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CLOCK = Lifetime(lifetime_s=30 * 86400, refresh_at_s=29 * 86400, access_margin_s=300,
                 profile_interval_s=86400)
DAY = timedelta(days=1)


def grant(**kw: object) -> Grant:
    base = Grant(
        id=1, appid="wx1", openid="o1", unionid=None, scope="snsapi_userinfo",
        access_token="AT", refresh_token="RT", access_expires_at=NOW + timedelta(hours=1),
        refresh_issued_at=NOW - 10 * DAY,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def answer(refresh_token: str = "RT", access_token: str = "AT2") -> TokenAnswer:
    return TokenAnswer(access_token, 7200, refresh_token, "o1", "snsapi_userinfo")


def test_a_fresh_grant_needs_nothing() -> None:
    assert refresh_reason(grant(), CLOCK, NOW) is None


def test_an_expired_access_token_is_refreshed() -> None:
    assert refresh_reason(grant(access_expires_at=NOW - DAY), CLOCK, NOW) == ACCESS


def test_an_access_token_within_the_margin_is_refreshed() -> None:
    g = grant(access_expires_at=NOW + timedelta(seconds=299))
    assert refresh_reason(g, CLOCK, NOW) == ACCESS
    assert refresh_reason(replace(g, access_expires_at=NOW + timedelta(seconds=301)), CLOCK,
                          NOW) is None


def test_a_refresh_token_is_refreshed_on_its_refresh_day() -> None:
    assert refresh_reason(grant(refresh_issued_at=NOW - 29 * DAY), CLOCK, NOW) == REFRESH_DAY
    assert refresh_reason(grant(refresh_issued_at=NOW - 29 * DAY + timedelta(seconds=1)),
                          CLOCK, NOW) is None


def test_refresh_day_follows_the_app_clock() -> None:
    mobile = Lifetime(180 * 86400, 179 * 86400, 300, 86400)
    assert refresh_reason(grant(refresh_issued_at=NOW - 100 * DAY), mobile, NOW) is None


def test_same_refresh_token_on_refresh_day_records_expiring_and_keeps_the_clock() -> None:
    g = grant(refresh_issued_at=NOW - 29 * DAY)
    result = after_refresh(g, answer("RT"), CLOCK, NOW)
    assert result.grant.state == EXPIRING
    assert result.grant.refresh_issued_at == g.refresh_issued_at
    assert result.reauth is not None and result.reauth.reason == "refresh_token_expiring"
    assert not result.renewed
    assert result.grant.access_token == "AT2"
    assert result.grant.access_expires_at == NOW + timedelta(seconds=7200)


def test_a_different_refresh_token_restarts_the_clock() -> None:
    g = grant(refresh_issued_at=NOW - 29 * DAY)
    result = after_refresh(g, answer("RT-new"), CLOCK, NOW)
    assert result.renewed and result.reauth is None
    assert result.grant.refresh_issued_at == NOW and result.grant.state == ACTIVE
    assert result.grant.refresh_token == "RT-new"


def test_a_rotated_token_clears_an_expiring_record() -> None:
    g = grant(refresh_issued_at=NOW - 29 * DAY, state=EXPIRING)
    result = after_refresh(g, answer("RT-new"), CLOCK, NOW)
    assert result.clear_reauth and result.grant.state == ACTIVE


def test_an_expiring_grant_is_tried_once_more_after_its_lifetime() -> None:
    g = grant(refresh_issued_at=NOW - 30 * DAY, state=EXPIRING,
              access_expires_at=NOW + timedelta(hours=1))
    assert refresh_reason(g, CLOCK, NOW) == LIFETIME_OVER
    assert schedule(g, CLOCK).refresh_due_at == g.refresh_issued_at + 30 * DAY


def test_success_after_the_lifetime_renews_the_clock() -> None:
    g = grant(refresh_issued_at=NOW - 31 * DAY, state=EXPIRING)
    result = after_refresh(g, answer("RT"), CLOCK, NOW)
    assert result.renewed and result.grant.refresh_issued_at == NOW
    assert result.grant.state == ACTIVE and result.clear_reauth


def test_the_same_token_before_the_refresh_day_changes_nothing() -> None:
    result = after_refresh(grant(), answer("RT"), CLOCK, NOW)
    assert result.grant.state == ACTIVE and result.reauth is None and not result.renewed


def test_refreshes_of_an_expiring_grant_do_not_record_it_again() -> None:
    g = grant(refresh_issued_at=NOW - 29 * DAY - timedelta(hours=5), state=EXPIRING)
    result = after_refresh(g, answer("RT"), CLOCK, NOW)
    assert result.reauth is None and result.grant.state == EXPIRING


@pytest.mark.parametrize(("errcode", "reason"), [
    (40030, "refresh_token_invalid"), (42002, "refresh_token_expired"),
    (42007, "authorization_revoked"), (40003, "other"),
])
def test_definitive_errors_map_to_the_contract_reasons(errcode: int, reason: str) -> None:
    assert reauth_reason(errcode) == reason
    g, record = after_reauth(grant(), errcode, NOW)
    assert g.state == REAUTH and record.reason == reason and record.errcode == errcode
    assert record.since == NOW
    assert schedule(g, CLOCK) == schedule(g, CLOCK).__class__(None, None, None)


def test_a_transient_failure_backs_off_and_never_changes_the_state() -> None:
    g = after_transient(grant(), "timeout", NOW, rng=random.Random(1))
    assert g.state == ACTIVE and g.failures == 1 and g.retry_at is not None
    assert NOW + timedelta(seconds=7) <= g.retry_at <= NOW + timedelta(seconds=15)
    due = schedule(replace(g, access_expires_at=NOW - DAY), CLOCK)
    assert due.access_due_at == g.retry_at


def test_backoff_grows_exponentially_up_to_a_cap_with_jitter() -> None:
    rng = random.Random(3)
    ceilings = [max(backoff_s(n, rng) for _ in range(50)) for n in range(1, 12)]
    assert ceilings[0] <= 15 and ceilings[1] <= 30 and ceilings[2] <= 60
    assert ceilings[-1] <= BACKOFF_CAP_S and ceilings[-1] > BACKOFF_CAP_S / 2
    assert len({round(backoff_s(5, rng)) for _ in range(20)}) > 1  # jittered


def test_a_quota_pause_sets_the_retry_without_growing_the_backoff() -> None:
    until = NOW + timedelta(seconds=40)
    g = after_transient(grant(failures=3), "45011", NOW, not_before=until, count=False)
    assert g.failures == 3 and g.retry_at == until


def test_profiles_are_due_every_interval_for_userinfo_scope_only() -> None:
    assert profile_due(grant(), CLOCK, NOW)
    assert not profile_due(grant(profile_at=NOW - timedelta(hours=1)), CLOCK, NOW)
    assert profile_due(grant(profile_at=NOW - DAY), CLOCK, NOW)
    assert not profile_due(grant(scope="snsapi_base"), CLOCK, NOW)
    assert not profile_due(grant(profile_stop=48001), CLOCK, NOW)
    every_sweep = replace(CLOCK, profile_interval_s=0)
    assert profile_due(grant(profile_at=NOW), every_sweep, NOW)


def test_the_schedule_puts_refresh_work_before_access_work() -> None:
    g = grant(refresh_issued_at=NOW - 29 * DAY - timedelta(hours=3),
              access_expires_at=NOW - timedelta(hours=5))
    s = schedule(g, CLOCK)
    assert s.refresh_due_at == g.refresh_issued_at + 29 * DAY
    assert s.access_due_at == g.access_expires_at - timedelta(seconds=300)
    assert s.profile_due_at is not None and s.profile_due_at < NOW


ON_DEMAND = replace(CLOCK, access_ahead=False)


def test_on_demand_sweeps_leave_access_tokens_alone_but_keep_refresh_tokens_alive() -> None:
    expired = grant(access_expires_at=NOW - DAY)
    assert refresh_reason(expired, ON_DEMAND, NOW) is None
    assert schedule(expired, ON_DEMAND).access_due_at is None
    assert schedule(expired, CLOCK).access_due_at == NOW - DAY - timedelta(seconds=300)
    day29 = grant(access_expires_at=NOW - DAY, refresh_issued_at=NOW - 29 * DAY)
    assert refresh_reason(day29, ON_DEMAND, NOW) == REFRESH_DAY
    assert schedule(day29, ON_DEMAND).refresh_due_at == NOW
    held = schedule(replace(expired, retry_at=NOW + DAY), ON_DEMAND)
    assert held.access_due_at is None and held.refresh_due_at == NOW + 19 * DAY


def test_only_answers_another_holders_refresh_explains_are_held() -> None:
    """40030 (a replaced refresh token) and 42002 (an old one past its lifetime, whose
    successor may exist) are what a takeover hears while a frozen holder has the new tokens;
    42007 kills every token of the authorization, the newest too, and 40003 is about the
    openid: those never wait."""
    assert held_answer(40030) and held_answer(42002)
    assert not any(held_answer(code) for code in (42007, 40003, None))


def test_a_held_answer_is_confirmed_as_wechat_gave_it_and_the_hold_ends() -> None:
    since = NOW - timedelta(minutes=5)
    dead, record = confirm_held(grant(held_errcode=42002, held_since=since, taken_over=True))
    assert record == Reauth("refresh_token_expired", 42002, since)
    assert dead.state == REAUTH and dead.held_errcode is None and dead.held_since is None
    with pytest.raises(ValueError):
        confirm_held(grant())
