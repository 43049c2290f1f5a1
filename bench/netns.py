"""Test hosts on one machine: network namespaces joined by a bridge of the test's own.

Each :class:`Host` is a network namespace with a veth pair to the bridge and one address in a
private /24 that exists only on these links (the bridge holds ``.1``, the hosts ``.11``,
``.12``, ...). The namespaces have no default route: a host reaches the bridge's address (where
the test's forwarder to PostgreSQL and the simulator listen) and the other hosts, nothing
else. Names carry this process's id and a random tag, so runs side by side never meet, and
:meth:`TestNet.down` removes everything even after a half-finished :meth:`TestNet.up`.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN): ``ip netns`` and ``ip link``. Namespaces,
because they give the hosts real addresses, and ``ip link set DEV down`` inside one is a clean
cut.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

IP = shutil.which("ip") or "/usr/sbin/ip"


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here (not root, no ``ip``, a kernel without them)."""


@dataclass(frozen=True)
class Host:
    """One test host: its namespace, its end of the veth pair and its address."""

    name: str  # the network namespace
    device: str  # the veth end inside the namespace
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: the child's
        pid is the command's own)."""
        return [IP, "netns", "exec", self.name, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no route or address of this machine touches yet."""
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.0/24")
        if f"10.{net.network_address.packed[1]}.{net.network_address.packed[2]}." not in used:
            return net
    raise NetnsUnavailable("no free 10.x.y.0/24 for the test hosts")


class TestNet:
    """``hosts`` namespaces on a bridge; :meth:`up` builds them, :meth:`down` removes them."""

    __test__ = False  # a harness, not a test class

    def __init__(self, hosts: int = 3) -> None:
        rng = random.Random()
        tag = f"{os.getpid() % 100000:05d}{rng.randrange(16 ** 3):03x}"  # 8 characters
        self.subnet = _free_subnet(rng)
        addresses = list(self.subnet.hosts())
        self.bridge = f"khb{tag}"  # interface names: 15 characters at most
        self.bridge_address = str(addresses[0])
        self.hosts = [
            Host(f"keeper-test-{tag}-{i}", f"khv{tag}{i}", str(addresses[10 + i]))
            for i in range(1, hosts + 1)
        ]
        self._made: list[tuple[str, ...]] = []  # what down() removes, newest first

    def up(self) -> TestNet:
        """Build the bridge and the hosts; raises :class:`NetnsUnavailable` (after removing
        whatever it made) when this machine cannot."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (CI runs as root)")
        if not os.path.exists(IP):
            raise NetnsUnavailable("no `ip` command (iproute2)")
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts, start=1):
            outside = f"{host.device[:-1]}p{i}"[-15:]
            _ip("netns", "add", host.name)
            self._made.append(("netns", "del", host.name))
            _ip("link", "add", outside, "type", "veth", "peer", "name", host.device)
            self._made.append(("link", "del", outside))
            _ip("link", "set", host.device, "netns", host.name)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            inside = ("netns", "exec", host.name, IP)
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "addr", "add", f"{host.address}/{prefix}", "dev", host.device)
            _ip(*inside, "link", "set", host.device, "up")

    def down(self) -> None:
        """Remove the hosts and the bridge (each step tried, whatever failed before)."""
        while self._made:
            _ip(*self._made.pop(), check=False)

    def cut(self, host: Host) -> None:
        """Take ``host``'s link down inside its namespace: a clean cut (its route goes, the
        bridge's end loses its carrier; nothing is closed or reset on either side)."""
        _ip("netns", "exec", host.name, IP, "link", "set", host.device, "down")

    def heal(self, host: Host) -> None:
        """Bring ``host``'s link back up (its address and route come back with it)."""
        _ip("netns", "exec", host.name, IP, "link", "set", host.device, "up")

    def reaches(self, host: Host, address: str, port: int) -> bool:
        """Whether ``host`` can open a TCP connection to ``address:port`` (bash's /dev/tcp)."""
        probe = f"exec 3<>/dev/tcp/{address}/{port}"
        done = subprocess.run(host.argv(["timeout", "3", "bash", "-c", probe]),
                              capture_output=True, timeout=10, check=False)
        return done.returncode == 0
