"""``GET /metrics`` on ``keeper serve``: the database's gauges agree with ``keeper status``, the
process's counters count what happened, no label holds an openid or a token, and only a key
with the ``read`` scope reads them; with several server processes a scrape sums them all."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from keeper.wechat.simulator import Simulator
from tests.api.server import Served, serving
from tests.conftest import APPID, Keeper
from tests.e2e.helpers import make_grant, seed

TOKEN_ROUTE = "/v1/apps/{appid}/users/{openid}/token"


def scrape(served: Served) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The scrape's samples by name: (labels, value)."""
    got = served.call("GET", "/metrics", key="read")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(got.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(v for got, v in samples.get(name, [])
               if all(got.get(k) == want for k, want in labels.items()))


def population(sim: Simulator, keeper: Keeper) -> None:
    """Grants in every state after one sweep: refreshed, dead three ways, expiring."""
    seed(sim, keeper, [
        make_grant("fresh", scope="snsapi_base"),
        make_grant("access-expired", access_in_s=-60, scope="snsapi_base"),
        make_grant("day29", issued_days_ago=29.1, scope="snsapi_base"),
        make_grant("revoked", access_in_s=-60, state="revoked"),
        make_grant("invalid", issued_days_ago=29.5, state="invalid"),
        make_grant("profiled", unionid="u-profiled"),
    ])
    ran = keeper.run("sweep", "--json")
    assert ran.code == 0, ran.err


def status(keeper: Keeper) -> dict[str, object]:
    ran = keeper.run("status", "--json")
    assert ran.code == 0, ran.err
    data: dict[str, object] = json.loads(ran.out)
    del data["last_sweep_age_s"]  # grows by itself
    return data


WEBHOOK = """
[[webhooks]]
url = "http://127.0.0.1:9/nobody-listens"
secret_env = "KEEPER_HOOK_SECRET"
"""


@pytest.fixture
def served(keeper: Keeper, sim: Simulator, db_url: str) -> Iterator[Served]:
    """``keeper serve`` (both databases) with a webhook nobody answers: events wait."""
    keeper.env["KEEPER_HOOK_SECRET"] = "webhook-secret"
    with serving(keeper, db_url=db_url, api_base=sim.url, extra=WEBHOOK) as s:
        yield s


def test_the_database_gauges_agree_with_keeper_status(served: Served, sim: Simulator) -> None:
    assert served.keeper.run("events", "deliver").code == 0  # the webhook is known from now
    population(sim, served.keeper)
    assert served.keeper.run("events", "deliver").code in (0, 1)  # refused: retried later
    before = status(served.keeper)
    samples = scrape(served)  # the server's first scrape: nothing cached yet
    assert status(served.keeper) == before  # nothing changed while it was read
    assert total(samples, "keeper_grants") == before["grants"] == 6
    assert total(samples, "keeper_grants", app=APPID, state="reauth") == 2
    assert total(samples, "keeper_grants", app=APPID, state="expiring") == 1
    assert total(samples, "keeper_reauth_records") == before["reauth_required"] == 3
    assert total(samples, "keeper_reauth_records", reason="refresh_token_expiring") == 1
    assert total(samples, "keeper_database_up") == 1
    assert samples["keeper_events_pending"] == [({}, before["events_pending"])]
    assert isinstance(before["events_pending"], int) and before["events_pending"] >= 3
    assert samples["keeper_events_failed"] == [({}, before["events_failed"])]
    last = before["last_sweep"]
    assert isinstance(last, dict)
    assert total(samples, "keeper_last_sweep_finished_timestamp_seconds") == pytest.approx(
        datetime.fromisoformat(last["finished_at"]).timestamp())
    assert total(samples, "keeper_work_due", kind="refresh") == 0  # the sweep did it all


def test_requests_are_counted_by_route_template_and_status(served: Served,
                                                           sim: Simulator) -> None:
    seed(sim, served.keeper, [make_grant("t1", scope="snsapi_base")])
    for _ in range(3):
        assert served.call("GET", served.user(APPID, "t1", "/token"),
                           key="tokens").status_code == 200
    assert served.call("GET", served.user(APPID, "nobody", "/token"),
                       key="tokens").status_code == 404
    samples = scrape(served)
    assert total(samples, "keeper_api_requests_total", route=TOKEN_ROUTE, status="200") == 3
    assert total(samples, "keeper_api_requests_total", route=TOKEN_ROUTE, status="404") == 1
    assert total(samples, "keeper_api_request_duration_seconds_count", route=TOKEN_ROUTE) == 4


def test_metrics_need_a_key_with_the_read_scope(served: Served) -> None:
    assert served.call("GET", "/metrics", key=None).status_code == 401
    assert served.call("GET", "/metrics", key="tokens").status_code == 403
    assert served.call("GET", "/metrics", key="read").status_code == 200


def test_no_label_or_value_holds_an_openid_or_a_token(served: Served, sim: Simulator) -> None:
    """Given users in every state after a sweep and token requests (openids that no word of
    the exposition could contain by chance), the scrape holds none of their openids,
    unionids or tokens, the stored ones or the ones WeChat issued since."""
    ids = {state: f"o{secrets.token_hex(8)}" for state in ("ok", "revoked", "invalid")}
    seed(sim, served.keeper, [
        make_grant(ids["ok"], access_in_s=-60, unionid=f"u{ids['ok']}"),
        make_grant(ids["revoked"], access_in_s=-60, state="revoked"),
        make_grant(ids["invalid"], issued_days_ago=29.5, state="invalid")])
    assert served.keeper.run("sweep").code == 0
    answer = served.call("GET", served.user(APPID, ids["ok"], "/token"), key="tokens").json()
    text = served.call("GET", "/metrics", key="read").text
    assert "keeper_grants{" in text
    found = {*ids.values(), f"u{ids['ok']}", answer["access_token"],
             *(f"{kind}-{o}-e2e-secret" for kind in ("AT", "RT") for o in ids.values())}
    assert {s for s in found if s in text} == set()


def test_several_server_processes_answer_with_every_process_counted(
    keeper: Keeper, sim: Simulator, db_url: str
) -> None:
    """Each scrape reaches one of two processes; in prometheus_client's multiprocess mode
    every scrape shows all the requests, whichever process answered them."""
    with serving(keeper, db_url=db_url, api_base=sim.url, api_extra="processes = 2") as s:

        def fetch(_: int) -> int:
            return requests.get(s.base + "/openapi.json", timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:  # at once, so both processes answer some
            assert set(pool.map(fetch, range(200))) == {200}
        for _ in range(8):
            s.session.close()  # a new connection: any process may answer the scrape
            assert total(scrape(s), "keeper_api_requests_total", route="/openapi.json") == 200
