"""A host cut off from the network while it holds leases and has calls in flight, for longer
than the lease, then back: the others take its grants over, what it writes late is refused
(the lease and the tokens the work began with are the fence), no older token overwrites a
newer one, nothing is lost, and the host carries on.

The cut is ``ip link set DEV down`` inside the host's namespace (bench/netns.py): its
connections to PostgreSQL (through the forwarder) and to the simulator are neither closed nor
reset, they just stop carrying anything, as when a cable or a switch port goes.
"""

from __future__ import annotations

import signal
import time

from sqlalchemy import func, select

from keeper.crypto import Cipher, load_keys
from keeper.store.db import make_engine
from keeper.store.schema import grants, reauth
from tests.conftest import wait_for
from tests.e2e.helpers import make_grant, seed
from tests.hosts.conftest import Cluster, seed_due, set_config, start_mid_sweep
from tests.hosts.test_hosts import _db_counts, _fresh, _held

#: The shortest lease keeper accepts with read_timeout 0.5 s (twice read_timeout, plus 30 s).
LEASE_S = 31


def _stored(c: Cluster) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
    """What keeper has stored: openid -> (access token, refresh token), decrypted, and
    openid -> when its access token expires (epoch seconds)."""
    cipher = Cipher(load_keys([c.workdir / "keeper.key"]))
    engine = make_engine(c.url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(grants.c.openid, grants.c.access_token,
                                       grants.c.refresh_token,
                                       grants.c.access_expires_at)).all()
    finally:
        engine.dispose()
    return ({r.openid: (cipher.decrypt(r.access_token), cipher.decrypt(r.refresh_token))
             for r in rows}, {r.openid: r.access_expires_at.timestamp() for r in rows})


def _assert_newest_stored(c: Cluster) -> None:
    """Every grant's stored tokens are the newest WeChat issued for it, and so is their
    expiry. (WeChat hands a live access token back with a later expiry instead of a new
    one: an older answer written over a newer one shows as an expiry that many seconds
    earlier, the time between the two calls, at least the lease here.)"""
    tokens, expiries = _stored(c)
    assert tokens == c.sim.current_tokens()
    issued = c.sim.access_expiries()
    assert expiries.keys() == issued.keys()
    older = {o: issued[o] - e for o, e in expiries.items() if e < issued[o] - 5}
    assert not older, f"stored expiries older than WeChat's newest (seconds): {older}"


def _lines(log_text: str, event: str) -> list[str]:
    """The log's lines (JSON, one a line) of this event."""
    return [line for line in log_text.splitlines() if f'"event": "{event}"' in line]


def test_a_host_cut_off_longer_than_its_lease_is_fenced_and_carries_on(cluster: Cluster) -> None:
    """Given one host in mid-sweep (leases held, calls in flight to a slow WeChat), when its
    link goes down for longer than the lease and two other hosts run, then they refresh its
    grants once its leases lapse; when the link comes back, what the cut host still held is
    refused as superseded, every grant's stored tokens are the newest WeChat issued for it,
    nobody is recorded as must-re-authorize, and the cut host goes on to do new work."""
    c = cluster
    set_config(c, lease=f"{LEASE_S}s")
    c.sim.configure(latency_s=0.15)  # calls in flight at the cut (8 workers, 0.15 s each)
    n = 400
    seed_due(c, n)
    cut_host, *others = c.net.hosts
    cut = start_mid_sweep(c, cut_host, 40, 150)
    c.net.cut(cut_host)
    cut_at = time.monotonic()
    held = _held(c.url)  # only the cut host has run: every live lease is its own
    assert held, "the cut host held no lease: the cut did not land mid-sweep"

    procs = [c.start(h, "run") for h in others]
    # The others do everything they can at once, and the cut host's grants once its leases
    # lapse (by the database's clock): not before.
    wait_for(lambda: _fresh(c.url, set(held)), timeout=LEASE_S + 30)
    took = time.monotonic() - cut_at
    assert took >= LEASE_S - 2, f"a leased grant was taken over after {took:.1f} s"
    wait_for(lambda: _db_counts(c.url)[0] == 0, timeout=30)
    assert cut.poll() is None, "the cut host exited: " + c.log_of(cut_host)[-3000:]

    c.net.heal(cut_host)
    # Back on the network it reports the database again, and what it held while cut off
    # (answers it could not write, failures of the calls cut short) meets the fence.
    wait_for(lambda: _lines(c.log_of(cut_host), "database.recovered"), timeout=30)
    wait_for(lambda: _lines(c.log_of(cut_host), "results.superseded"), timeout=30)
    log_text = c.log_of(cut_host)
    assert _lines(log_text, "database.unavailable"), log_text[-3000:]
    _assert_newest_stored(c)

    # The other hosts stop; the cut host alone refreshes grants that fall due now.
    for h, p in zip(others, procs, strict=True):
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0, c.log_of(h)[-3000:]
    late = 50
    seed(c.sim, c.local, [make_grant(f"late{i:03d}", access_in_s=-60, scope="snsapi_base")
                          for i in range(late)])
    wait_for(lambda: _db_counts(c.url)[0] == 0, timeout=30)
    cut.send_signal(signal.SIGTERM)
    assert cut.wait(timeout=20) == 0, c.log_of(cut_host)[-3000:]

    # Nothing older overwrote anything newer: every stored token is the newest WeChat issued.
    assert len(c.sim.current_tokens()) == n + late
    _assert_newest_stored(c)
    assert _db_counts(c.url) == (0, 0)
    per_user = c.sim.stats(detail=True)["refreshes_by_openid"]
    assert isinstance(per_user, dict) and len(per_user) == n + late
    # Refreshed twice: only grants the cut host held (a call cut short, or an answer it could
    # not write), each at most twice; the late grants once each, by the cut host.
    twice = {openid for openid, count in per_user.items() if count > 1}
    assert twice <= set(held.values()) and max(per_user.values()) <= 2, (twice, held)
    assert all(per_user[f"late{i:03d}"] == 1 for i in range(late))
    engine = make_engine(c.url, pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(reauth)).scalar_one() == 0
    finally:
        engine.dispose()
