"""The network of ``python -m bench hosts``: the simulator and a forwarder to PostgreSQL, each in a
process of its own listening where the hosts reach them, and the place the hosts run (test
hosts in network namespaces, :mod:`bench.netns`, or this namespace with ``--loopback``)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import psutil
import requests

from bench.env import Sim
from bench.netns import NetnsUnavailable, TestNet
from bench.seed import APPID, SECRET


def _serve_simulator(host: str, latency_s: float, conn: Connection) -> None:
    """The simulator on ``host`` (a test bridge's address) until the bench closes the pipe."""
    from keeper.wechat.simulator import SimQuota, Simulator

    sim = Simulator(host=host, latency_s=latency_s,
                    quotas={"refresh": SimQuota(100_000_000, 60.0)})
    sim.add_app(APPID, SECRET)
    sim.start()
    conn.send(sim.url)
    with contextlib.suppress(EOFError):
        conn.recv()
    sim.stop()


def serve_forwarder(host: str, target: tuple[str, int], conn: Connection) -> None:
    """A TCP forwarder from ``host`` (a free port) to ``target`` until the pipe closes."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        for s in (writer, up_writer):
            s.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main() -> None:
        server = await asyncio.start_server(client, host, 0, backlog=128)
        conn.send(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        closed = loop.create_future()


        def pipe_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        loop.add_reader(conn.fileno(), pipe_closed)
        await closed

    asyncio.run(main())


class ChildProcess:
    """A spawned child that sends one value (its URL or port) and runs until closed."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(30):
            raise SystemExit(f"{target.__name__} did not start")
        self.value = self.conn.recv()

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid) if self.proc.pid is not None else 0.0

    def close(self) -> None:
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class BridgeSim(Sim):
    """The simulator in a process of its own, listening on ``host`` (the bench's :class:`Sim`
    is ``keeper simulate``, which listens on loopback only)."""

    def __init__(self, host: str, latency_ms: float) -> None:
        self.child = ChildProcess(_serve_simulator, host, latency_ms / 1000.0)
        self.url = self.child.value
        self.http = requests.Session()

    def post(self, route: str, body: dict[str, Any]) -> None:
        self.http.post(f"{self.url}/_sim/{route}", json=body, timeout=30).raise_for_status()

    def detail(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_sim/stats", params={"detail": "1"},  # type: ignore[no-any-return]
                             timeout=60).json()

    def close(self) -> None:
        self.child.close()


# --- the hosts ------------------------------------------------------------------------------

@dataclass
class Place:
    """Where the hosts run: namespaces on a bridge, or (``--loopback``) this namespace."""

    net: TestNet | None
    address: str  # where the simulator and the forwarder listen

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return self.net.hosts[i].argv(argv) if self.net else argv

    @property
    def describe(self) -> str:
        if self.net is None:
            return "processes in this network namespace, on loopback (--loopback)"
        return (f"network namespaces on a bridge of their own ({self.net.subnet}); PostgreSQL "
                "and the simulator reached over it")


@contextlib.contextmanager
def place(hosts: int, loopback: bool) -> Iterator[Place]:
    if loopback:
        yield Place(None, "127.0.0.1")
        return
    net = TestNet(hosts=hosts)
    try:
        net.up()
    except NetnsUnavailable as e:
        raise SystemExit(f"test hosts cannot be made here: {e}; --loopback runs the hosts as "
                         "processes in this namespace") from None
    try:
        yield Place(net, net.bridge_address)
    finally:
        net.down()


def cpu_s(pid: int) -> float:
    """The CPU seconds (user and system) a process has used; 0 once it is gone."""
    with contextlib.suppress(psutil.Error):
        return float(sum(psutil.Process(pid).cpu_times()[:2]))
    return 0.0
