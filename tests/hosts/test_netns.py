"""The test hosts themselves: they reach the bridge and each other, nothing beyond, and leave
nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys

from bench.netns import IP, TestNet


def _listening(address: str) -> socket.socket:
    s = socket.socket()
    s.bind((address, 0))
    s.listen(4)
    return s


def test_hosts_reach_the_bridge_and_each_other_and_nothing_else(testnet: TestNet) -> None:
    a, b, _ = testnet.hosts
    with _listening(testnet.bridge_address) as on_bridge, _listening("127.0.0.1") as on_lo:
        assert testnet.reaches(a, testnet.bridge_address, on_bridge.getsockname()[1])
        # The root namespace's loopback is not the host's: PostgreSQL's 127.0.0.1:5432 and
        # anything else there is only reachable through the forwarder on the bridge.
        assert not testnet.reaches(a, "127.0.0.1", on_lo.getsockname()[1])
    routes = subprocess.run(a.argv([IP, "-4", "route"]), capture_output=True, text=True,
                            check=True).stdout
    assert "default" not in routes and str(testnet.subnet) in routes
    listen = (f"import socket; s = socket.socket(); s.bind(({b.address!r}, 0)); s.listen(1); "
              "print(s.getsockname()[1], flush=True); s.accept()")
    on_b = subprocess.Popen(b.argv([sys.executable, "-c", listen]), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert on_b.stdout is not None
        assert testnet.reaches(a, b.address, int(on_b.stdout.readline()))
    finally:
        on_b.kill()
        on_b.wait(timeout=10)
    assert not testnet.reaches(a, "192.0.2.1", 80)  # no route beyond the test's own /24


def test_down_removes_every_namespace_and_link() -> None:
    net = TestNet(hosts=2)
    try:
        net.up()
    except Exception:
        net.down()
        raise
    net.down()
    names = subprocess.run([IP, "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    links = subprocess.run([IP, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert all(h.name not in names for h in net.hosts)
    assert net.bridge not in links and all(h.device[:-1] not in links for h in net.hosts)
