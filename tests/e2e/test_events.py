"""Events end to end: `keeper run` delivers to a receiver of the test's own over loopback,
survives kill -9 at random moments of sweeps that record re-authorizations without losing or
inventing an event, shares a webhook between two processes one attempt at a time, and the
`keeper events` commands and configuration errors behave as docs/reference/events.md says."""

from __future__ import annotations

import json
import random
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, select, update

from keeper.config.webhooks import webhook_key
from keeper.store.schema import deliveries, events, grants, reauth
from keeper.sweep.engine import MIN_PAGE
from keeper.wechat.simulator import Simulator
from tests.api.server import serving
from tests.conftest import (
    APPID,
    Keeper,
    config_text,
    require_postgres,
    reset_postgres,
    wait_for,
)
from tests.e2e.helpers import endpoint, make_grant, seed
from tests.events.receiver import Receiver
from tests.service.test_service import start_service, stop

HOOK_SECRET = "whsec-e2e-7f3a9c1d5e"  # the webhook's secret (from the environment)
#: kill -9 per database; the suite runs both, so 2 x KILLS in all (at least 20).
KILLS = 10


def configure(keeper: Keeper, sim: Simulator, url: str, receiver_url: str,
              extra: str = "", webhook: str = "") -> None:
    keeper.env["KEEPER_HOOK_SECRET"] = HOOK_SECRET
    keeper.write_config(config_text(db_url=url, api_base=sim.url, extra=f"""
workers = 4
{extra}
[[webhooks]]
url = "{receiver_url}"
secret_env = "KEEPER_HOOK_SECRET"
timeout = 2
{webhook}
""").replace("workers = 8\n", ""))
    if not url.startswith("sqlite"):
        assert keeper.run("db", "upgrade").code == 0


def db_url(kind: str, keeper: Keeper) -> str:
    if kind == "sqlite":
        return f"sqlite:///{keeper.workdir / 'keeper.db'}"
    url = require_postgres()
    reset_postgres()
    return url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret=HOOK_SECRET, delay_s=0.01)
    yield r
    r.stop()


def outbox(url: str) -> tuple[list[dict[str, object]], dict[str, str], Counter[str]]:
    """(every event as stored, openid → reason of every re-authorization record, deliveries
    by state)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            evts = [json.loads(b) for b in conn.execute(select(events.c.body)).scalars()]
            records = dict(conn.execute(select(grants.c.openid, reauth.c.reason)
                                        .join(reauth, reauth.c.grant_id == grants.c.id)).all())
            states = Counter(conn.execute(select(deliveries.c.state)).scalars())
    finally:
        engine.dispose()
    return evts, records, states


def left_to_sweep(url: str) -> int:
    """Live grants still due whose lease is free (a killed process's grants are leased)."""
    engine = create_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(grants).where(
                grants.c.state != "reauth", grants.c.access_due_at <= now,
                grants.c.lease_id.is_(None) | (grants.c.lease_until <= now))).scalar_one())
    finally:
        engine.dispose()


def refresh_calls(sim: Simulator) -> int:
    return int(endpoint(sim, "refresh")["calls"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_kill_9_at_random_moments_loses_no_event_and_invents_none(
    kind: str, sim: Simulator, keeper: Keeper, receiver: Receiver,
) -> None:
    """Given 300 users due beyond those the killed processes will hold leased (each claims
    up to MIN_PAGE ahead), every other one refused by WeChat (40030),
    when `keeper run` is killed with SIGKILL KILLS times, each time after a random number of
    refresh calls (so mid-sweep), and then runs until nothing is left to send, then every
    re-authorization record has its reauth.recorded event delivered at least once, every
    event in the outbox is about a record that was committed, and the receiver saw no event
    the outbox does not hold."""
    url = db_url(kind, keeper)
    configure(keeper, sim, url, receiver.url)
    sim.configure(latency_s=0.03)
    rng = random.Random(f"kill-{kind}")
    users = [make_grant(f"k{i:03d}", access_in_s=-60, scope="snsapi_base")
             for i in range(300 + KILLS * MIN_PAGE)]
    seed(sim, keeper, users)
    for i in range(0, len(users), 2):
        sim.script(f"k{i:03d}", "refresh", 40030)
    killed = 0
    while killed < KILLS:
        proc, _ = start_service(keeper)
        try:
            target = refresh_calls(sim) + rng.randint(1, 6)
            wait_for(lambda t=target: refresh_calls(sim) >= t, timeout=60)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed += 1
        finally:
            if proc.poll() is None:
                proc.kill()
    # The last run sweeps what the killed ones left (but the grants their leases still hold)
    # and sends everything.
    proc, log = start_service(keeper)
    try:
        def settled() -> bool:
            if left_to_sweep(url):
                return False
            evts, records, states = outbox(url)
            recorded = {e["data"]["openid"] for e in evts  # type: ignore[index]
                        if e["type"] == "reauth.recorded"}
            sent = {json.loads(s.body)["data"]["openid"] for s in list(receiver.seen)
                    if 200 <= s.status < 300}
            return bool(records) and set(records) <= recorded and recorded <= sent and \
                states["pending"] == 0
        wait_for(settled, timeout=90)
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]
    evts, records, states = outbox(url)
    recorded = Counter(e["data"]["openid"] for e in evts  # type: ignore[index]
                       if e["type"] == "reauth.recorded")
    print(f"{kind}: {killed} kills, {refresh_calls(sim)} refresh calls, {len(records)} records,"
          f" {len(evts)} events, {len(receiver.seen)} requests")
    assert states == Counter({"delivered": len(evts)})
    # Each record has exactly its one event; no event without its record.
    assert set(recorded) == set(records) and set(recorded.values()) == {1}
    for e in evts:
        assert e["type"] == "reauth.recorded"
        assert e["data"]["reason"] == records[e["data"]["openid"]]  # type: ignore[index]
    stored_ids = {e["id"] for e in evts}
    assert {s.event_id for s in receiver.seen} <= stored_ids  # nothing invented
    assert stored_ids <= receiver.delivered()  # everything delivered at least once
    assert receiver.bad_signatures == 0
    assert all(int(o[1:]) % 2 == 0 for o in records)  # only users WeChat refused


@pytest.mark.timeout(120)
def test_two_keeper_run_processes_never_send_one_event_at_the_same_moment(
    sim: Simulator, keeper: Keeper,
) -> None:
    """On PostgreSQL, with two `keeper run` sharing one webhook, no request of the receiver
    overlaps another (one attempt at a time per webhook), and when the process sending
    stops, the other takes over and every event is delivered."""
    url = db_url("postgresql", keeper)
    receiver = Receiver(secret=HOOK_SECRET, delay_s=0.03)
    try:
        configure(keeper, sim, url, receiver.url)
        users = [make_grant(f"p{i:02d}", access_in_s=-60, scope="snsapi_base")
                 for i in range(40)]
        seed(sim, keeper, users)
        sim.force("refresh", 40030, count=40)
        first, log1 = start_service(keeper)
        second, _ = start_service(keeper)
        try:
            receiver.wait_for(lambda r: len(r.delivered()) >= 10, timeout=60)
            assert stop(first) == 0, log1.read_text()[-2000:]
            receiver.wait_for(lambda r: len(r.delivered()) >= 40, timeout=120)
        finally:
            for p in (first, second):
                if p.poll() is None:
                    stop(p)
    finally:
        receiver.stop()
    assert receiver.overlaps == [] and receiver.most_at_once == 1
    assert receiver.bad_signatures == 0
    evts, _, _ = outbox(url)
    assert {e["id"] for e in evts} == receiver.delivered()


def test_the_events_commands(sim: Simulator, keeper: Keeper) -> None:
    down = f"http://127.0.0.1:{_free_port()}/hook"
    url = db_url("sqlite", keeper)
    configure(keeper, sim, url, down, webhook='events = ["reauth.recorded"]')
    seed(sim, keeper, [make_grant(f"c{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(3)])
    ran = keeper.run("events", "deliver", "--json")  # first sight: from the newest event on
    assert ran.code == 0 and json.loads(ran.out)["delivered"] == 0, ran.err
    sim.force("refresh", 40030, count=3)
    assert keeper.run("sweep").code == 0
    ran = keeper.run("events", "deliver", "--json")
    assert ran.code == 0 and json.loads(ran.out) == {"delivered": 0, "retry": 3, "failed": 0,
                                                     "busy": 0}, ran.err
    listed = [json.loads(line) for line in keeper.run("events", "--json").out.splitlines()]
    assert [e["type"] for e in listed] == ["reauth.recorded"] * 3
    assert all(e["deliveries"][0]["state"] == "pending" and e["deliveries"][0]["attempts"] == 1
               and e["deliveries"][0]["last_error"] == "connection failed" for e in listed)
    status = json.loads(keeper.run("status", "--json").out)
    assert status["events_pending"] == 3 and status["events_failed"] == 0
    assert "events_pending" in keeper.run("status").out
    assert keeper.run("events", "--failed", "--json").out == ""
    assert keeper.run("events", "replay", "--failed").out.startswith("0 deliveries")
    ran = keeper.run("events", "replay", listed[0]["id"], "--json")
    assert ran.code == 0 and json.loads(ran.out) == {"replayed": 1}
    assert keeper.run("events", "replay", "evt_nosuchevent").code == 2
    assert keeper.run("events", "replay").code == 2
    assert keeper.run("events", "replay", listed[0]["id"], "--failed").code == 2
    text = keeper.run("events").out
    assert listed[0]["id"] in text and "pending" in text
    # The other two retry 30-60 s after their first attempt; on a loaded machine this test can
    # take that long, so their retries are put an hour out: only the replayed one is due.
    later = datetime.now(UTC) + timedelta(hours=1)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(update(deliveries).where(deliveries.c.event_id != listed[0]["id"])
                         .values(next_attempt_at=later))
    finally:
        engine.dispose()
    r = Receiver(secret=HOOK_SECRET, port=int(down.split(":")[2].split("/")[0]))
    try:
        ran = keeper.run("events", "deliver")  # only the replayed one is due now
    finally:
        r.stop()
    assert ran.code == 0 and ran.out.startswith("delivered 1,"), ran.err
    assert len(r.delivered()) == 1 and r.bad_signatures == 0
    assert "event.delivered" in ran.err and HOOK_SECRET not in ran.err + ran.out
    keeper.write_config(keeper.config.read_text().replace(
        f"sqlite:///{keeper.workdir / 'keeper.db'}", "postgresql+psycopg://nobody@127.0.0.1:1/x"))
    ran = keeper.run("events", "deliver")
    assert ran.code == 1 and "database.unavailable" in ran.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("webhook", "error"), [
    ('url = "ftp://x/"\nsecret_env = "KEEPER_HOOK_SECRET"', "webhooks[0].url: expected"),
    ('url = "https://x/?token=QSECRET"', "webhooks[0].secret_env: give secret_env or"),
    ('url = "https://x/"\nsecret_env = "KEEPER_HOOK_SECRET"\nsecret_file = "f"',
     "webhooks[0].secret_env: give secret_env or"),
    ('url = "https://x/"\nsecret_env = "KEEPER_HOOK_SECRET"\nevents = ["reauth.lost"]',
     "webhooks[0].events: unknown event type 'reauth.lost'"),
    ('url = "https://x/"\nsecret_env = "KEEPER_HOOK_SECRET"\ntimeout = 0',
     "webhooks[0].timeout: expected"),
    ('url = "https://x/"\nsecret_env = "KEEPER_HOOK_SECRET"\ncolour = "red"',
     "unknown configuration key: webhooks[0].colour"),
])
def test_a_bad_webhook_is_refused_in_one_line_naming_the_key(
    keeper: Keeper, sim: Simulator, webhook: str, error: str,
) -> None:
    keeper.env["KEEPER_HOOK_SECRET"] = HOOK_SECRET
    keeper.write_config(keeper.config.read_text().replace(
        "[[apps]]", f"[[webhooks]]\n{webhook}\n\n[[apps]]"))
    ran = keeper.run("status")
    refused = [e for e in ran.logs() if e["event"] == "command.refused"]
    assert ran.code == 2 and len(refused) == 1 and error in refused[0]["error"], ran.err
    assert "QSECRET" not in ran.err


#: A webhook whose secret_env the tests below leave unset; its url's query string holds a
#: value no line may show.
UNSIGNED_URL = "https://hooks.example.com/keeper-in?token=QSECRET"
UNSIGNED = f'url = "{UNSIGNED_URL}"\nsecret_env = "KEEPER_HOOK_SECRET"'


def _add_webhook_without_its_secret(keeper: Keeper, webhook: str) -> None:
    keeper.env.pop("KEEPER_HOOK_SECRET", None)
    keeper.write_config(keeper.config.read_text().replace(
        "[[apps]]", f"[[webhooks]]\n{webhook}\n\n[[apps]]"))


def _refused_by_the_senders(keeper: Keeper) -> list[str]:
    """The one `command.refused` error of each process that sends events, which must exit 2
    at start, before anything else (no sweep, no delivery)."""
    errors = []
    for argv in (("run",), ("events", "deliver")):
        ran = keeper.run(*argv, timeout=30)
        refused = [e for e in ran.logs() if e["event"] == "command.refused"]
        assert ran.code == 2 and len(refused) == 1, (argv, ran.code, ran.err)
        assert not {"keeper.started", "sweep.started", "event.retry"} & set(ran.events())
        assert "QSECRET" not in ran.err + ran.out and "keeper-in" not in ran.err
        errors.append(refused[0]["error"])
    return errors


def test_a_missing_webhook_secret_stops_only_the_processes_that_send(
    sim: Simulator, keeper: Keeper,
) -> None:
    """Given a [[webhooks]] table whose secret_env is not set, every command that sends no
    event runs: `keeper sweep` records events (it never delivers them), `keeper events replay`
    only makes deliveries pending again, `keeper serve` serves. `keeper run` and `keeper
    events deliver` exit 2 at start, in one line naming the webhook (by key and host, not
    its url) and where its secret is read from."""
    _add_webhook_without_its_secret(keeper, UNSIGNED)
    seed(sim, keeper, [make_grant("o-live"),  # `keeper import`
                       make_grant("o-dead", access_in_s=-60, scope="snsapi_base")])
    sim.script("o-dead", "refresh", 40030)
    for argv in (
        ("status",), ("sweep", "--json"), ("reauth", "--json"), ("events", "--json"),
        ("events", "--failed"), ("events", "replay", "--failed"),
        ("token", "--app", APPID, "o-live"), ("profile", "--app", APPID, "o-live"),
        ("check", "--app", APPID, "o-live"),
        ("grant", "--app", APPID, sim.issue_code(appid=APPID, openid="o-new")),
        ("forecast", "--days", "3"), ("cleanup-avatars",), ("db", "upgrade"), ("rotate-key",),
    ):
        ran = keeper.run(*argv)
        assert ran.code == 0, (argv, ran.err)
        assert "QSECRET" not in ran.err + ran.out
    recorded = [json.loads(line) for line in keeper.run("events", "--json").out.splitlines()]
    assert [(e["type"], e["openid"]) for e in recorded] == [("reauth.recorded", "o-dead")]
    assert "o-dead" in keeper.run("reauth").out
    with serving(keeper, db_url=f"sqlite:///{keeper.workdir / 'keeper.db'}", api_base=sim.url,
                 extra=f"[[webhooks]]\n{UNSIGNED}\n") as served:
        got = served.call("GET", served.user(APPID, "o-live", "/token"))
        assert got.status_code == 200 and got.json()["access_token"] == "AT-o-live-e2e-secret"
    expected = ("webhooks[0].secret_env: the environment variable KEEPER_HOOK_SECRET is not set "
                "or empty")
    for error in _refused_by_the_senders(keeper):
        assert error.startswith(expected), error
        assert f"webhook {webhook_key(UNSIGNED_URL)}" in error and "hooks.example.com" in error


@pytest.mark.parametrize(("content", "reason"), [
    (None, "cannot be read: No such file or directory"), ("\n", "is empty")])
def test_a_webhook_secret_file_that_cannot_be_read_stops_only_the_senders(
    keeper: Keeper, content: str | None, reason: str,
) -> None:
    if content is not None:
        (keeper.workdir / "hook.secret").write_text(content)
    _add_webhook_without_its_secret(
        keeper, f'url = "{UNSIGNED_URL}"\nsecret_file = "hook.secret"')
    ran = keeper.run("status")
    assert ran.code == 0, ran.err
    for error in _refused_by_the_senders(keeper):
        assert error.startswith(
            f"webhooks[0].secret_file: {keeper.workdir.resolve() / 'hook.secret'} {reason}"), \
            error


def test_events_retention_is_checked(keeper: Keeper) -> None:
    keeper.write_config('events_retention = "10m"\n' + keeper.config.read_text())
    ran = keeper.run("status")
    assert ran.code == 2 and "events_retention: must be at least 1 hour" in ran.err
