"""`keeper run`'s ``/metrics`` listener (``metrics_listen``): on, its counters move as a sweep
calls the simulator and its gauges agree with `keeper status`; off; a bad value refused; an
address in use is one error line, and sweeping goes on."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from keeper.wechat.simulator import Simulator
from tests.api.server import free_port
from tests.conftest import APPID, Keeper, config_text, wait_for
from tests.e2e.helpers import endpoint, make_grant, seed
from tests.service.test_service import start_service, stop, sweeps_done

Samples = dict[str, list[tuple[dict[str, str], float]]]


def listen_on(keeper: Keeper, sim: Simulator, value: str) -> None:
    keeper.write_config(config_text(db_url=f"sqlite:///{keeper.workdir / 'keeper.db'}",
                                    api_base=sim.url, metrics_listen=value))


def scrape(port: int) -> Samples:
    got = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert got.status_code == 200, got.text
    samples: Samples = {}
    for family in text_string_to_metric_families(got.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, [])
               if all(got.get(k) == want for k, want in labels.items()))


def events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_counters_move_as_a_sweep_calls_wechat(sim: Simulator, keeper: Keeper) -> None:
    """Given five due grants and a listener on a free port, when `keeper run` has swept, its
    scrape counts the refresh calls the simulator answered, the sweep and its duration, the
    quota permits taken, and the database's gauges equal `keeper status`."""
    port = free_port()
    listen_on(keeper, sim, f"127.0.0.1:{port}")
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(4)] + [make_grant("gone", access_in_s=-60,
                                                        state="revoked")])
    proc, log = start_service(keeper)
    try:
        wait_for(lambda: sweeps_done(keeper) >= 1, timeout=30)
        samples = scrape(port)
        calls = endpoint(sim, "refresh")["calls"]
        assert calls >= 5
        assert total(samples, "keeper_wechat_calls_total", app=APPID,
                     endpoint="refresh") == calls
        assert total(samples, "keeper_wechat_calls_total", endpoint="refresh",
                     outcome="reauth_required") == 1
        assert total(samples, "keeper_wechat_call_duration_seconds_count",
                     endpoint="refresh") == calls
        assert total(samples, "keeper_sweeps_total", result="finished") >= 1
        assert total(samples, "keeper_sweep_duration_seconds_count") >= 1
        assert total(samples, "keeper_sweep_work_total", kind="access_tokens_refreshed") == 4
        assert total(samples, "keeper_quota_permits_total", app=APPID,
                     endpoint="refresh") >= 5
        status = json.loads(keeper.run("status", "--json").out)
        assert total(samples, "keeper_grants") == status["grants"] == 5
        assert total(samples, "keeper_reauth_records") == status["reauth_required"] == 1
        assert total(samples, "keeper_last_sweep_finished_timestamp_seconds") > 0
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 404
    finally:
        assert stop(proc) == 0
    steps = [e["step"] for e in events(log) if e["event"] == "keeper.stopping"]
    assert steps.index("metrics") < steps.index("database")
    assert any(e["event"] == "metrics.listening" and e["port"] == port for e in events(log))


def test_an_empty_metrics_listen_serves_nothing(sim: Simulator, keeper: Keeper) -> None:
    listen_on(keeper, sim, "")
    proc, log = start_service(keeper)
    try:
        wait_for(lambda: sweeps_done(keeper) >= 1, timeout=30)
        listening = [c for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert listening == []
    finally:
        assert stop(proc) == 0
    assert not any(str(e["event"]).startswith("metrics.") for e in events(log))


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:70000", "unix:/run/keeper.sock",
                                   "[::1:9790"])
def test_a_bad_metrics_listen_is_refused_with_one_line(sim: Simulator, keeper: Keeper,
                                                       value: str) -> None:
    listen_on(keeper, sim, value)
    ran = keeper.run("run", timeout=30)
    assert ran.code == 2
    [line] = [e for e in ran.logs() if e["level"] == "error"]
    assert line["event"] == "command.refused" and "metrics_listen" in line["error"]


def test_an_address_in_use_is_one_error_line_and_sweeping_goes_on(
    sim: Simulator, keeper: Keeper
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen_on(keeper, sim, f"127.0.0.1:{taken.getsockname()[1]}")
        proc, log = start_service(keeper)
        try:
            wait_for(lambda: sweeps_done(keeper) >= 1, timeout=30)
        finally:
            assert stop(proc) == 0
    failed = [e for e in events(log) if e["event"] == "metrics.listen_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error"
    assert "in use" in str(failed[0]["error"])


def test_config_default_is_loopback_9790(tmp_path: Path) -> None:
    from keeper.config import build_config

    config = build_config({}, env={}, source=str(tmp_path / "k.toml"))
    assert (config.metrics_listen, config.metrics_host, config.metrics_port) == (
        "127.0.0.1:9790", "127.0.0.1", 9790)
    off = build_config({"metrics_listen": ""}, env={}, source=str(tmp_path / "k.toml"))
    assert off.metrics_host is None and off.metrics_port is None
