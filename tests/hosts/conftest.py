"""Three test hosts sharing one PostgreSQL: the fixtures of the multi-host tests.

The hosts (bench/netns.py) reach PostgreSQL through a forwarder on the bridge's address
(to 127.0.0.1:5432) and the simulator, which listens on the bridge's address too. Each host
has a directory of its own (its config, journal and logs: hosts share no disk) and runs the
real program through ``ip netns exec``. Skipped with a visible reason where namespaces cannot be
made; a failure when CI is set.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import make_url

from bench.netns import Host, NetnsUnavailable, TestNet
from keeper.wechat.simulator import SimQuota, Simulator
from tests.conftest import (
    APPID,
    SECRET,
    Keeper,
    clock_offset_env,
    config_text,
    require_postgres,
    reset_postgres,
    unavailable,
    wait_for,
)
from tests.e2e.helpers import endpoint, make_grant, seed
from tests.pgbouncer import PgBouncer
from tests.service.test_service import Proxy


@pytest.fixture
def testnet() -> Iterator[TestNet]:
    """Three hosts on a bridge of this test's own, removed afterwards (even on failure)."""
    net = TestNet(hosts=3)
    try:
        net.up()
    except NetnsUnavailable as e:
        message = f"test hosts (network namespaces) cannot be made here: {e}"
        unavailable(message)
    try:
        yield net
    finally:
        net.down()


@dataclass
class Cluster:
    """The hosts, the simulator they call and keeper as each host runs it."""

    net: TestNet
    sim: Simulator
    local: Keeper  # keeper in the root namespace (import, checks), straight to PostgreSQL
    url: str  # this run's database, as the root namespace reaches it
    workdir: Path
    #: The hosts' ``database_pooler``: "pgbouncer" when they reach PostgreSQL through one.
    pooler: str = "none"
    bouncer: PgBouncer | None = None
    procs: list[tuple[Host, subprocess.Popen[bytes]]] = field(default_factory=list)

    def host_dir(self, host: Host) -> Path:
        return self.workdir / host.name

    def start(self, host: Host, *args: str, clock_offset_s: float = 0) -> subprocess.Popen[bytes]:
        """``keeper ARGS`` on ``host``, its output in the host's directory (``keeper.err``);
        ``clock_offset_s``: the host's clock runs that far ahead (negative: behind), by
        libfaketime, monotonic clocks left alone (a faked one hangs timed waits)."""
        env = dict(self.local.env)
        if clock_offset_s:
            env.update(clock_offset_env(clock_offset_s))
        d = self.host_dir(host)
        with open(d / "keeper.out", "ab") as out, open(d / "keeper.err", "ab") as err:
            proc = subprocess.Popen(
                host.argv([sys.executable, "-m", "keeper", "--config", str(d / "keeper.toml"),
                           *args]),
                stdout=out, stderr=err, cwd=d, env=env,
            )
        self.procs.append((host, proc))
        return proc

    def log_of(self, host: Host) -> str:
        return (self.host_dir(host) / "keeper.err").read_text(errors="replace")

    def stop_all(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, testnet: TestNet, tmp_path: Path,
            keeper: Keeper) -> Iterator[Cluster]:
    """PostgreSQL, a forwarder to it and the simulator on the bridge; keeper configured on
    every host (one key, one database; a directory each). Processes the test started are
    killed at the end. Parametrized (indirect) with "pgbouncer": the hosts reach PostgreSQL
    through a PgBouncer in transaction pooling mode on the bridge instead of the forwarder,
    with ``database_pooler = "pgbouncer"``."""
    url = require_postgres()
    reset_postgres()
    pooler = getattr(request, "param", "none")
    bouncer: PgBouncer | None = None
    forwarder: Proxy | PgBouncer
    if pooler == "pgbouncer":
        bouncer = PgBouncer(host=testnet.bridge_address)
        forwarder = bouncer
    else:
        forwarder = Proxy(("127.0.0.1", 5432), host=testnet.bridge_address)
    forwarder.up()
    sim = Simulator(host=testnet.bridge_address, timeout_sleep_s=1.0, seed=7,
                    quotas={"refresh": SimQuota(1_000_000, 60.0)})
    sim.add_app(APPID, SECRET)
    sim.start()
    host_url = make_url(url).set(host=testnet.bridge_address, port=forwarder.port)
    c = Cluster(testnet, sim, keeper, url, tmp_path, pooler=pooler, bouncer=bouncer)
    try:
        keeper.write_config(config_text(db_url=url, api_base=sim.url))
        ran = keeper.run("db", "upgrade")
        assert ran.code == 0, ran.err
        for host in testnet.hosts:
            d = c.host_dir(host)
            d.mkdir()
            shutil.copy(tmp_path / "keeper.key", d / "keeper.key")
            os.chmod(d / "keeper.key", 0o600)
            (d / "keeper.toml").write_text(config_text(
                db_url=host_url.render_as_string(hide_password=False), api_base=sim.url,
                extra=f'database_pooler = "{pooler}"'))
        assert all(testnet.reaches(h, testnet.bridge_address, forwarder.port)
                   for h in testnet.hosts), "a test host cannot reach the forwarder"
        yield c
    finally:
        c.stop_all()
        sim.stop()
        forwarder.down()


def set_config(c: Cluster, *, extra: str = "", app_extra: str = "", lease: str = "2m",
               workers: int = 8) -> None:
    """The same keeper.toml on the root namespace and every host (each with its own URL)."""
    for path in [c.local.config, *(c.host_dir(h) / "keeper.toml" for h in c.net.hosts)]:
        text = path.read_text()
        db_line = next(line for line in text.splitlines() if line.startswith("database_url"))
        api = c.sim.url
        body = config_text(db_url="X", api_base=api, extra=extra, app_extra=app_extra)
        if path != c.local.config and c.pooler != "none":  # the root namespace goes direct
            db_line += f'\ndatabase_pooler = "{c.pooler}"'
        body = body.replace('database_url = "X"', db_line)
        body = body.replace('lease = "2m"', f'lease = "{lease}"')
        body = body.replace("workers = 8", f"workers = {workers}")
        body = body.replace('log_level = "debug"', 'log_level = "info"')
        path.write_text(body)


def seed_due(c: Cluster, n: int, prefix: str = "o") -> None:
    """``n`` grants whose access tokens expired a minute ago (``PREFIX00000``...), stored and
    known to the simulator; its counts start afresh."""
    seed(c.sim, c.local, [make_grant(f"{prefix}{i:05d}", access_in_s=-60, scope="snsapi_base")
                          for i in range(n)])
    c.sim.reset_stats()


def start_mid_sweep(c: Cluster, host: Host, low: int, high: int) -> subprocess.Popen[bytes]:
    """``keeper run`` on ``host``, returned once WeChat has seen a random number (``low`` to
    ``high``) of its refresh calls: mid-sweep, leases held (not a fixed sleep)."""
    proc = c.start(host, "run")
    calls = random.randint(low, high)
    wait_for(lambda: endpoint(c.sim, "refresh")["calls"] >= calls, timeout=30)
    return proc
