"""Delivery over real loopback HTTP to a receiver of the test's own, on SQLite and PostgreSQL,
with the clock driven by the test (retries come due by moving ``now``, not by waiting)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keeper.config.webhooks import WebhookConfig
from keeper.core.events import TYPES
from keeper.events.deliverer import Deliverer, attempt_bound, lease_for
from keeper.events.sender import Outcome, Sender
from keeper.events.signing import sign, verify
from keeper.store.grants import Store
from tests.events.receiver import Receiver, Trickler, signature_ok, tls_files
from tests.store.test_grants import NOW, grant, put
from tests.store.test_users import record

SECRET = "whsec-test-0123456789"


def hook(url: str, *, events: frozenset[str] = frozenset(TYPES), timeout_s: float = 2.0
         ) -> WebhookConfig:
    return WebhookConfig(url, SECRET, "test", events, timeout_s)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def deliverer(store: Store, *hooks: WebhookConfig, clock: Clock) -> Deliverer:
    d = Deliverer(store=store, webhooks=hooks, stop=threading.Event(), retention_s=7 * 86400,
                  clock=clock)
    for h in hooks:  # start where the events begin (a new webhook starts at the newest)
        assert store.take_webhook(h.key, d.holder, now=clock.now, lease_s=60)
    return d


def drive(d: Deliverer, clock: Clock, receiver: Receiver, want: int, *, rounds: int = 60) -> int:
    """Deliver, then move the clock an hour on (every retry is due by then), until the
    receiver has taken ``want`` distinct events; the rounds it took."""
    for n in range(rounds):
        d.deliver_all()
        if len(receiver.delivered()) >= want:
            return n
        clock.now += timedelta(hours=1)
        for h in d.webhooks:  # hold on across the jump, as a running loop renews
            d.store.take_webhook(h.key, d.holder, now=clock.now, lease_s=60)
    raise AssertionError(f"only {len(receiver.delivered())} of {want} delivered")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_signature_verifies_with_code_written_from_the_contract(store: Store) -> None:
    put(store, *(grant(f"o{i}", unionid=f"u{i}") for i in range(3)))
    receiver = Receiver(secret=SECRET)
    clock = Clock()
    d = deliverer(store, hook(receiver.url), clock=clock)
    try:
        record(store, "o0", "o1", "o2")
        assert d.deliver_all()["delivered"] == 3
    finally:
        d.close()
        receiver.stop()
    assert receiver.bad_signatures == 0 and len(receiver.seen) == 3
    for seen in receiver.seen:
        assert signature_ok(SECRET, seen.body, seen.signature, now=time.time())
        assert not signature_ok("another-secret", seen.body, seen.signature, now=time.time())
        assert not signature_ok(SECRET, seen.body + b" ", seen.signature, now=time.time())
        assert seen.event["id"] == seen.event_id and seen.event["type"] == "reauth.recorded"
        assert verify(SECRET, seen.body, seen.signature, now=time.time())
    assert [s.event["data"]["openid"] for s in receiver.seen] == ["o0", "o1", "o2"]


def test_keepers_verify_refuses_old_forged_and_tampered_signatures() -> None:
    body, t = b'{"id":"evt_x"}', 1_800_000_000
    header = sign(SECRET, body, t)
    assert verify(SECRET, body, header, now=t + 299)
    assert not verify(SECRET, body, header, now=t + 301)  # too old: a replay
    assert not verify(SECRET, body + b"x", header, now=t)
    assert not verify("other", body, header, now=t)
    assert verify(SECRET, body, f"{header},v1={'0' * 64}", now=t)  # any v1 may match
    assert not verify(SECRET, body, "v1=" + header.split("v1=")[1], now=t)  # no t


def test_a_receiver_failing_half_its_requests_gets_every_event_in_the_end(store: Store) -> None:
    put(store, *(grant(f"o{i}") for i in range(12)))
    receiver = Receiver(answer=lambda n, _: 200 if n % 2 else 503, secret=SECRET)
    clock = Clock()
    d = deliverer(store, hook(receiver.url), clock=clock)
    try:
        record(store, *(f"o{i}" for i in range(12)))
        with capture_logs() as logs:
            drive(d, clock, receiver, 12)
    finally:
        d.close()
        receiver.stop()
    assert len(receiver.delivered()) == 12 and receiver.bad_signatures == 0
    kinds = {e["event"] for e in logs}
    assert {"event.delivered", "event.retry"} <= kinds and "event.failed" not in kinds
    retry = next(e for e in logs if e["event"] == "event.retry")
    assert retry["status"] == 503 and 30 <= retry["retry_in_s"] <= 60  # first retry: < 60 s
    assert store.delivery_counts() == {"events_pending": 0, "events_failed": 0}
    # Every attempt of one event sent the same bytes.
    by_id: dict[str, set[bytes]] = {}
    for s in receiver.seen:
        by_id.setdefault(s.event_id, set()).add(s.body)
    assert all(len(b) == 1 for b in by_id.values())


def test_a_receiver_down_for_a_while_gets_every_event_once_it_is_back(store: Store) -> None:
    put(store, *(grant(f"o{i}") for i in range(6)))
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/keeper?token=receiver-query-secret"
    clock = Clock()
    d = deliverer(store, hook(url), clock=clock)
    receiver = None
    try:
        record(store, *(f"o{i}" for i in range(6)))
        with capture_logs() as logs:
            for _ in range(5):  # refused connections, five hours of them
                assert d.deliver_all()["delivered"] == 0
                clock.now += timedelta(hours=1)
                d.store.take_webhook(d.webhooks[0].key, d.holder, now=clock.now, lease_s=60)
        receiver = Receiver(port=port, secret=SECRET)
        drive(d, clock, receiver, 6)
    finally:
        d.close()
        if receiver is not None:
            receiver.stop()
    assert receiver is not None and len(receiver.delivered()) == 6
    retries = [e for e in logs if e["event"] == "event.retry"]
    assert retries and all(e["error"] == "connection failed" and e["status"] is None
                            for e in retries)
    assert all(e["host"] == "127.0.0.1" for e in retries)
    assert "receiver-query-secret" not in json.dumps(logs)  # never the url's query string


def test_a_receiver_that_never_answers_is_failed_after_72_hours(store: Store) -> None:
    put(store, grant("o1"))
    clock = Clock()
    d = deliverer(store, hook(f"http://127.0.0.1:{free_port()}/"), clock=clock)
    try:
        record(store, "o1")
        with capture_logs() as logs:
            for _ in range(40):
                d.deliver_all()
                clock.now += timedelta(hours=2)
                d.store.take_webhook(d.webhooks[0].key, d.holder, now=clock.now, lease_s=60)
    finally:
        d.close()
    failed = [e for e in logs if e["event"] == "event.failed"]
    assert len(failed) == 1 and failed[0]["error"] == "connection failed"
    assert store.delivery_counts() == {"events_pending": 0, "events_failed": 1}


@pytest.mark.parametrize("kind", ["redirect", "endless", "slow"])
def test_redirects_are_not_followed_bodies_are_capped_and_attempts_time_out(kind: str) -> None:
    receiver = Receiver(answer=lambda n, _: 302 if kind == "redirect" else 200,
                        endless=kind == "endless", delay_s=1.0 if kind == "slow" else 0.0)
    sender = Sender(hook(receiver.url, timeout_s=0.3))
    try:
        began = time.monotonic()
        outcome = sender.send("evt_1", '{"id":"evt_1"}', t=int(time.time()))
        took = time.monotonic() - began
    finally:
        sender.close()
        receiver.stop()
    if kind == "redirect":
        assert not outcome.delivered and outcome.status == 302 and len(receiver.seen) == 1
    elif kind == "endless":  # a 2xx whose body never ends: delivered, the rest unread
        assert outcome.delivered and took < 2
    else:
        assert not outcome.delivered and outcome.error == "read timeout" and took < 1


def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_trickles() -> None:
    """The receiver sends its answer's status line and headers a byte a second, for ever: no
    read waits even half the timeout, so only a deadline over the whole attempt ends it:
    within timeout + 1 s, with the connection closed, a failure to try again later."""
    timeout_s = 2.0
    trickler = Trickler(interval_s=1.0)
    sender = Sender(hook(trickler.url, timeout_s=timeout_s))
    ended: list[tuple[Outcome, float]] = []

    def attempt() -> None:
        began = time.monotonic()
        outcome = sender.send("evt_1", '{"id":"evt_1"}', t=int(time.time()))
        ended.append((outcome, time.monotonic() - began))

    thread = threading.Thread(target=attempt, daemon=True)
    began = time.monotonic()
    thread.start()
    try:
        thread.join(timeout_s + 1)
        assert ended, (f"the attempt was still running {time.monotonic() - began:.1f} s after "
                       f"it began (timeout {timeout_s:g} s; {trickler.sent} bytes trickled)")
        # The receiver sees the connection end with the attempt, not when the test ends.
        assert trickler.closed.wait(1.0), "the attempt ended with its connection left open"
    finally:
        trickler.stop()  # (the end, for an attempt without a deadline)
        thread.join(5)
        sender.close()
    outcome, took = ended[0]
    assert took <= timeout_s + 1, f"the attempt took {took:.2f} s"
    assert outcome == Outcome(None, "read timeout") and not outcome.delivered


def test_a_2xx_whose_body_trickles_is_delivered_and_its_connection_closed() -> None:
    """The status decides; the body is read, to 4 KiB, only to reuse the connection, and not
    past the deadline."""
    trickler = Trickler(at_once=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    sender = Sender(hook(trickler.url, timeout_s=0.5))
    try:
        began = time.monotonic()
        outcome = sender.send("evt_1", "{}", t=int(time.time()))
        took = time.monotonic() - began
        closed = trickler.closed.wait(1.0)
    finally:
        trickler.stop()
        sender.close()
    assert outcome == Outcome(200, None) and took <= 0.5 + 1 and closed


def test_a_trickled_answer_is_an_attempt_to_retry(store: Store) -> None:
    put(store, grant("o1"))
    trickler = Trickler()
    clock = Clock()
    d = deliverer(store, hook(trickler.url, timeout_s=0.5), clock=clock)
    try:
        record(store, "o1")
        with capture_logs() as logs:
            counts = d.deliver_all()
        closed = trickler.closed.wait(1.0)
    finally:
        d.close()
        trickler.stop()
    assert counts == Counter(retry=1) and closed
    (retry,) = (e for e in logs if e["event"] == "event.retry")
    assert retry["error"] == "read timeout" and retry["status"] is None
    assert 30 <= retry["retry_in_s"] <= 60
    assert store.delivery_counts() == {"events_pending": 1, "events_failed": 0}


def test_the_kept_alive_connection_carries_the_next_attempts() -> None:
    receiver = Receiver()
    sender = Sender(hook(receiver.url))
    try:
        for n in range(3):
            assert sender.send(f"evt_{n}", "{}", t=int(time.time())).delivered
    finally:
        sender.close()
        receiver.stop()
    assert len({s.peer for s in receiver.seen}) == 1 and len(receiver.seen) == 3


def test_https_is_verified_and_its_handshake_is_within_the_deadline(tmp_path: Path) -> None:
    """A certificate is taken only from a trusted CA and for the url's host name; a receiver
    that never answers the handshake is given up at the deadline."""
    server, cafile = tls_files(tmp_path)  # a certificate for "localhost" only
    receiver = Receiver(tls=server)
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    silent = socket.create_server(("127.0.0.1", 0))  # connects (the backlog), never answers
    outcomes: dict[str, Outcome] = {}
    try:
        sender = Sender(hook(by_name), cafile=cafile)
        outcomes["trusted"] = sender.send("evt_1", "{}", t=int(time.time()))
        sender.close()
        for name, url, ca in (("by address", receiver.url, cafile),
                              ("another CA", by_name, None)):
            sender = Sender(hook(url), cafile=ca)
            outcomes[name] = sender.send("evt_1", "{}", t=int(time.time()))
            sender.close()
        sender = Sender(hook(f"https://127.0.0.1:{silent.getsockname()[1]}/", timeout_s=0.5),
                        cafile=cafile)
        began = time.monotonic()
        outcomes["silent"] = sender.send("evt_1", "{}", t=int(time.time()))
        took = time.monotonic() - began
        sender.close()
    finally:
        silent.close()
        receiver.stop()
    assert outcomes == {"trusted": Outcome(200, None),
                        "by address": Outcome(None, "TLS error"),
                        "another CA": Outcome(None, "TLS error"),
                        "silent": Outcome(None, "connect timeout")}
    assert len(receiver.seen) == 1 and took <= 0.5 + 1


def test_a_lease_is_renewed_before_it_has_less_left_than_an_attempt_lasts() -> None:
    for timeout_s in (0.1, 1.0, 7.5, 10.0, 14.0, 30.0, 60.0):  # the range webhooks allow
        h = hook("http://127.0.0.1:9/", timeout_s=timeout_s)
        assert lease_for(h) >= 30 and lease_for(h) / 2 > attempt_bound(h) > timeout_s


def test_an_attempt_starts_only_with_more_lease_left_than_it_lasts(store: Store) -> None:
    """The test moves the deliverer's clock: each attempt lasts as long as it may (timeout
    + 1 s), and in the first round the database takes 35 s to renew a lease of 40 s. No
    attempt starts with its bound or less of the lease left: in that round none starts at all;
    in the next, with a quick database, every event goes."""
    put(store, *(grant(f"o{i}") for i in range(6)))
    clock = Clock()
    lease_until: list[datetime] = []  # the lease as the database keeps it
    db_latency = [timedelta(seconds=35)]
    left_at_start: list[float] = []
    bound = 10.0 + 1  # a 10 s timeout: an attempt may last 11 s

    def answer(n: int, event_id: str) -> int:
        left_at_start.append((lease_until[-1] - clock.now).total_seconds())
        clock.now += timedelta(seconds=bound)  # this attempt takes all it may
        return 200

    receiver = Receiver(answer=answer)
    h = hook(receiver.url, timeout_s=10.0)
    assert lease_for(h) == 40
    d = deliverer(store, h, clock=clock)
    take_webhook = store.take_webhook

    def slow_take(key: str, holder: str, *, now: datetime, lease_s: float,
                  takeover: str | None = None) -> bool:
        held = take_webhook(key, holder, now=now, lease_s=lease_s, takeover=takeover)
        if held:  # SQLite's lease_until; PostgreSQL's runs from its clock, no sooner
            lease_until.append(now + timedelta(seconds=lease_s))
        clock.now += db_latency[0]
        return held

    store.take_webhook = slow_take  # type: ignore[method-assign]
    try:
        record(store, *(f"o{i}" for i in range(6)))
        first = d.deliver_all()
        starts_in_first = list(left_at_start)
        db_latency[0] = timedelta(0)
        second = d.deliver_all()
    finally:
        d.close()
        receiver.stop()
    assert lease_until, "the deliverer never took the lease"
    assert starts_in_first == [], (f"attempts started with {starts_in_first} s of the lease "
                                   f"left; each may last {bound:g} s")
    assert first["delivered"] == 0 and second["delivered"] == 6
    assert len(left_at_start) == 6 and min(left_at_start) > bound, left_at_start


def test_one_failing_event_does_not_hold_the_others_back(store: Store) -> None:
    put(store, *(grant(f"o{i}") for i in range(4)))
    bad: set[str] = set()

    def answer(n: int, event_id: str) -> int:
        if n == 0:
            bad.add(event_id)
        return 500 if event_id in bad else 200

    receiver = Receiver(answer=answer)
    clock = Clock()
    d = deliverer(store, hook(receiver.url), clock=clock)
    try:
        record(store, "o0")
        d.deliver_all()
        record(store, "o1", "o2", "o3")
        d.store.take_webhook(d.webhooks[0].key, d.holder, now=clock.now, lease_s=60)
        d.deliver_all()
    finally:
        d.close()
        receiver.stop()
    # o0 failed once (a first attempt 500: not due again for 30 s); o1..o3 went through.
    assert [s.event["data"]["openid"] for s in receiver.seen] == ["o0", "o1", "o2", "o3"]
    assert len(receiver.delivered()) == 3
