"""The process's own metrics: what this process did since it started (counters, histograms).

Defined once, in prometheus_client's default registry, and recorded through the small
functions below, which do nothing until :func:`enable` is called: ``keeper run`` (with a
``metrics_listen``) and ``keeper serve`` enable them; one-shot commands, whose counts nobody
could scrape, do not pay for them. Labels are names from fixed sets (an appid from the
configuration, an endpoint, an outcome, a route template, a status): never an openid, a
token or anything a request can choose.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram, disable_created_metrics

from keeper.errors import (
    ApiError,
    AppConfigRejected,
    BadCode,
    KeeperBugAnswer,
    MalformedAnswer,
    NoProfile,
    QuotaExceeded,
    ReauthRequired,
    StaleAccessToken,
)

# A ``_created`` series beside every counter doubles what Prometheus stores for nothing it
# needs (it sees restarts as resets).
disable_created_metrics()  # type: ignore[no-untyped-call]

_enabled = False


def enable(on: bool = True) -> None:
    """Start (or stop) recording in this process."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


WECHAT_CALLS = Counter(
    "keeper_wechat_calls", "Calls to WeChat's /sns endpoints, by app, endpoint and outcome.",
    ["app", "endpoint", "outcome"])
WECHAT_SECONDS = Histogram(
    "keeper_wechat_call_duration_seconds", "How long a call to WeChat took (all outcomes).",
    ["app", "endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
SWEEPS = Counter(
    "keeper_sweeps", "Sweeps this process ran, by result: finished or failed (the database).",
    ["result"])
SWEEP_SECONDS = Histogram(
    "keeper_sweep_duration_seconds", "How long a finished sweep took.",
    buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0))
SWEEP_WORK = Counter(
    "keeper_sweep_work", "What finished sweeps did (the sweep summary's counters), by kind.",
    ["kind"])
QUOTA_PERMITS = Counter(
    "keeper_quota_permits", "Quota permits this process took from the shared quota rows.",
    ["app", "endpoint"])
QUOTA_WAIT = Counter(
    "keeper_quota_wait_seconds", "Seconds callers waited for a quota permit.",
    ["app", "endpoint"])
QUOTA_EXHAUSTED = Counter(
    "keeper_quota_exhausted",
    "Calls put off because the next quota permit was further away than the caller waits.",
    ["app", "endpoint"])
LEASES_LOST = Counter(
    "keeper_leases_lost",
    "Results not written because a newer token was stored meanwhile (another process, a "
    "login or an import after this process's lease lapsed).")
API_REQUESTS = Counter(
    "keeper_api_requests", "Requests keeper serve answered, by method, route template and "
    "status.", ["method", "route", "status"])
API_SECONDS = Histogram(
    "keeper_api_request_duration_seconds", "How long keeper serve took to answer a request.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

#: The sweep summary's counters that become ``keeper_sweep_work_total{kind}``.
WORK_KINDS = (
    "refresh_tokens_refreshed", "access_tokens_refreshed", "refresh_tokens_renewed",
    "refresh_tokens_expiring", "reauth_recorded", "profiles_fetched", "no_profile",
    "profile_failures", "avatars_saved", "transient_failures", "quota_deferred",
    "grants_worked", "leases_lost", "abandoned", "worker_errors",
)

#: Every outcome of a WeChat call (``keeper_wechat_calls_total{outcome}``).
OUTCOMES = ("ok", "reauth_required", "quota_exceeded", "app_rejected", "bad_code",
            "stale_token", "no_profile", "keeper_bug", "malformed", "error_answer",
            "http_error", "timeout", "network")


def outcome_of(error: ApiError | None) -> str:
    """The outcome label of a call that ended with ``error`` (``None``: success)."""
    if error is None:
        return "ok"
    for kind, name in ((ReauthRequired, "reauth_required"), (QuotaExceeded, "quota_exceeded"),
                       (AppConfigRejected, "app_rejected"), (BadCode, "bad_code"),
                       (StaleAccessToken, "stale_token"), (NoProfile, "no_profile"),
                       (KeeperBugAnswer, "keeper_bug"), (MalformedAnswer, "malformed")):
        if isinstance(error, kind):
            return name
    if error.errcode is not None:
        return "error_answer"  # -1 (system busy) or an errcode keeper does not know
    if error.detail.startswith("HTTP"):
        return "http_error"
    return "timeout" if error.detail == "timeout" else "network"


#: The label children of each (app, endpoint, outcome): ``labels()`` validates and locks on
#: every call, and a sweep makes thousands a second (7 µs a call with it, 4 µs without).
_calls: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def wechat_call(app: str, endpoint: str, error: ApiError | None, seconds: float) -> None:
    if _enabled:
        key = (app, endpoint, outcome_of(error))
        children = _calls.get(key)
        if children is None:  # a race here makes the same children twice: harmless
            children = _calls[key] = (WECHAT_CALLS.labels(*key),
                                      WECHAT_SECONDS.labels(app, endpoint))
        children[0].inc()
        children[1].observe(seconds)


def sweep_finished(summary: dict[str, object]) -> None:
    if _enabled:
        SWEEPS.labels("finished").inc()
        seconds = summary.get("seconds")
        if isinstance(seconds, int | float):
            SWEEP_SECONDS.observe(seconds)
        for kind in WORK_KINDS:
            n = summary.get(kind)
            if isinstance(n, int) and n:
                SWEEP_WORK.labels(kind).inc(n)


def sweep_failed() -> None:
    if _enabled:
        SWEEPS.labels("failed").inc()


def quota_taken(app: str, endpoint: str, permits: int) -> None:
    if _enabled:
        QUOTA_PERMITS.labels(app, endpoint).inc(permits)


def quota_waited(app: str, endpoint: str, seconds: float) -> None:
    if _enabled:
        QUOTA_WAIT.labels(app, endpoint).inc(seconds)


def quota_exhausted(app: str, endpoint: str) -> None:
    if _enabled:
        QUOTA_EXHAUSTED.labels(app, endpoint).inc()


def leases_lost(n: int) -> None:
    if _enabled and n:
        LEASES_LOST.inc(n)


#: The label children of each (method, route, status), as :data:`_calls` (a request each).
_requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def api_request(method: str, route: str, status: int, seconds: float) -> None:
    if _enabled:
        key = (method, route, status)
        children = _requests.get(key)
        if children is None:  # a race here makes the same children twice: harmless
            children = _requests[key] = (API_REQUESTS.labels(method, route, str(status)),
                                         API_SECONDS.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)
