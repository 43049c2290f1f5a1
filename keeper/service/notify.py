"""systemd's sd_notify protocol, spoken directly (one datagram per message, no library).

``NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket (a leading ``@`` means the abstract
namespace). Without it every call does nothing, so keeper behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import structlog

from keeper.clock import utcnow

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.notify")


class Notifier:
    """Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``RELOADING=1`` and ``STOPPING=1``."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self._sock: socket.socket | None = None
        self._warned = False

    def send(self, *fields: str) -> None:
        """One message of ``KEY=value`` lines; failures are logged once and otherwise ignored."""
        if self.address is None:
            return
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("notify.failed", error=f"{type(e).__name__}: {e.strerror}")

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        # systemd 253+ (Type=notify-reload) wants the monotonic time with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def sweep_status(summary: dict[str, Any]) -> str:
    """The one-line summary systemd shows (``STATUS=``)."""
    return (
        f"last sweep {utcnow():%Y-%m-%d %H:%M:%S}Z: "
        f"{summary.get('refresh_tokens_refreshed', 0)} refresh tokens, "
        f"{summary.get('access_tokens_refreshed', 0)} access tokens, "
        f"{summary.get('profiles_fetched', 0)} profiles, "
        f"{summary.get('reauth_recorded', 0)} re-authorizations, "
        f"{summary.get('transient_failures', 0)} transient failures "
        f"in {summary.get('seconds', 0)} s"
    )
