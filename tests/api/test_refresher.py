"""Stale tokens refreshed on the server's event loop: the flights that came in together are
leased by one statement, their calls made at once, one call per grant however many ask; what
this path cannot settle (a grant held elsewhere) answers None for the threaded path; WeChat's
transient answers give the lease back and say try again; a refusal says log in again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keeper.api.refresher import Refresher
from keeper.api.tokens import MustReauthorize, TokenDesk, Unavailable
from keeper.clock import utcnow
from keeper.core.models import REAUTH
from keeper.service.runtime import Runtime
from keeper.store.rows import new_lease_id
from keeper.sweep.worker import Worker
from keeper.wechat.aio import AsyncWeChatClient
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID
from tests.e2e.helpers import endpoint, make_grant
from tests.sweep.test_engine import build_runtime, put


@pytest.fixture
def rt(migrated_url: str, sim: Simulator, tmp_path: Path) -> Iterator[Runtime]:
    runtime = build_runtime(migrated_url, sim, tmp_path, read_timeout=5)
    try:
        yield runtime
    finally:
        runtime.close()


def ask(rt: Runtime, sim: Simulator, requests: list[tuple[str, int]]) -> list[Any]:
    """Each (openid, min_valid) asked at once on a fresh event loop, as a server's requests
    that found their tokens stale; what each got (a token, None, or the exception)."""

    async def main() -> list[Any]:
        client = AsyncWeChatClient(api_base=sim.url, connect_timeout_s=2, read_timeout_s=5)
        worker = Worker(config=rt.config, client=client, gate=rt.gate, stop=rt.stop,
                        clock=utcnow, loop=rt.loop)
        desk = TokenDesk(store=rt.store, worker=worker, lease_s=rt.config.lease_s,
                         wait_s=3, journal=rt.journal(), clock=utcnow)
        refresher = Refresher(store=rt.store, desk=desk, worker=worker,
                              lease_s=rt.config.lease_s, clock=utcnow)
        ids = {openid: grant_id(rt, openid) for openid, _ in requests}
        try:
            return await asyncio.gather(
                *(refresher.token(ids[openid], margin) for openid, margin in requests),
                return_exceptions=True)
        finally:
            refresher.close()
            await client.close()

    return asyncio.run(main())


def grant_id(rt: Runtime, openid: str) -> int:
    g = rt.store.get_grant(APPID, openid)
    assert g is not None
    return g.id


def test_stale_tokens_asked_together_are_leased_together_and_refreshed_once_each(
        rt: Runtime, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    users = [f"o-{i}" for i in range(20)]
    put(rt, sim, *(make_grant(u, access_in_s=-10) for u in users))
    sim.configure(latency_s=1.0, rotate_refresh_tokens=True)
    claims: list[list[int]] = []
    claim_stale = rt.store.claim_stale

    def spy(ids: list[int], **kw: Any) -> Any:
        claims.append(list(ids))
        return claim_stale(ids, **kw)

    monkeypatch.setattr(rt.store, "claim_stale", spy)
    answers = ask(rt, sim, [(u, 300) for u in users for _ in range(3)])
    now = sim.current_tokens()
    assert [a.access_token for a in answers] == [now[u][0] for u in users for _ in range(3)]
    assert all(a.refreshed for a in answers)
    # One statement leased all twenty (the requests came in before it ran)...
    assert [sorted(c) for c in claims] == [sorted(grant_id(rt, u) for u in users)]
    # ...one call per grant, made at once: one after another they would span 19 latencies.
    assert endpoint(sim, "refresh")["calls"] == 20
    arrivals = sim.stats(detail=True)["arrivals"]["refresh"]  # type: ignore[index]
    assert max(arrivals) - min(arrivals) < 1.0
    for u in users:  # committed, leases ended
        g = rt.store.get_grant(APPID, u)
        assert g is not None and g.access_token == now[u][0] and g.refresh_token == now[u][1]
        assert g.lease_id is None


def test_a_grant_held_elsewhere_or_refreshed_meanwhile_is_left_to_the_threaded_path(
        rt: Runtime, sim: Simulator) -> None:
    put(rt, sim, make_grant("o-held", access_in_s=-10), make_grant("o-fresh", access_in_s=7000))
    other = new_lease_id()
    assert rt.store.claim_one(APPID, "o-held", lease_id=other, lease_s=60,
                              now=datetime.now(UTC)) is not None
    # o-fresh: its token is valid for 7,000 s, more than the 300 s asked (refreshed by
    # another process since the request read it stale).
    assert ask(rt, sim, [("o-held", 300), ("o-fresh", 300)]) == [None, None]
    assert endpoint(sim, "refresh")["calls"] == 0
    g = rt.store.get_grant(APPID, "o-held")
    assert g is not None and g.lease_id == other  # untouched


@pytest.mark.parametrize("answer", [-1, "502", "html", "truncated"])
def test_an_answer_that_changes_nothing_gives_the_lease_back_and_says_try_again(
        rt: Runtime, sim: Simulator, answer: int | str) -> None:
    put(rt, sim, make_grant("o-down", access_in_s=-10))
    sim.force("refresh", answer)
    [got] = ask(rt, sim, [("o-down", 300)])
    assert isinstance(got, Unavailable) and got.code == "wechat_unavailable", got
    g = rt.store.get_grant(APPID, "o-down")
    assert g is not None and g.lease_id is None and g.state != REAUTH
    assert rt.store.reauth_record(g.id) is None
    # Nothing else changed: the next request refreshes it.
    [again] = ask(rt, sim, [("o-down", 300)])
    assert again.access_token == sim.current_tokens()["o-down"][0]


def test_a_refusal_tells_every_caller_to_log_in_again(rt: Runtime, sim: Simulator) -> None:
    put(rt, sim, make_grant("o-gone", access_in_s=-10))
    sim.force("refresh", 40030)
    answers = ask(rt, sim, [("o-gone", 300)] * 3)
    assert all(isinstance(a, MustReauthorize) for a in answers), answers
    assert endpoint(sim, "refresh")["calls"] == 1
    g = rt.store.get_grant(APPID, "o-gone")
    assert g is not None and g.state == REAUTH
    record = rt.store.reauth_record(g.id)
    assert record is not None and record.errcode == 40030
