"""``keeper run``'s signal handlers take no lock. A handler runs in the main thread between two
of its bytecodes, possibly while that thread holds an Event's lock (inside ``Event.wait`` or
``clear``, which the main loop calls all the time): a handler that set an Event there would
wait for that lock for ever, and the process would hang, deaf to SIGTERM too. Seen under load:
SIGHUP, SIGHUP and SIGUSR1 in quick succession left a `keeper run` that neither swept nor
stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# A child process: on the code this guards against, the handler blocks for ever.
pytestmark = [pytest.mark.e2e]

CHILD = """
import signal, sys, threading
from keeper.config import build_config
from keeper.service.scheduler import Service

config = build_config({"database_url": sys.argv[1],
                       "apps": [{"appid": "wx00000000000000a1", "secret_env": "UNSET"}]},
                      env={}, source="test")
service = Service(config=config, load=lambda: config)
# Every Event the service holds, locked by this (the main) thread, as when a signal lands
# inside Event.wait or Event.clear.
for event in [v for v in vars(service).values() if isinstance(v, threading.Event)]:
    event._cond.acquire()
service._on_reload(signal.SIGHUP, None)
service._on_sweep(signal.SIGUSR1, None)
service._on_stop(signal.SIGTERM, None)
print("handled", flush=True)
"""


def test_a_signal_landing_while_the_main_thread_holds_an_events_lock_is_still_handled(
        tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", CHILD, f"sqlite:///{tmp_path / 'keeper.db'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=20, check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1] == "handled"


def test_the_main_thread_wakes_on_a_signal_and_sets_the_stop_flag_itself(
        tmp_path: Path) -> None:
    from keeper.config import build_config
    from keeper.service.scheduler import Service

    config = build_config({"database_url": f"sqlite:///{tmp_path / 'keeper.db'}",
                           "apps": [{"appid": "wx00000000000000a1", "secret_env": "UNSET"}]},
                          env={}, source="test")
    service = Service(config=config, load=lambda: config)
    try:
        service._on_stop(signal.SIGTERM, None)
        assert not service.stop.is_set()  # the handler only asked
        assert service.wakeup.wait(5)  # the main thread is woken at once
        service._tick(5)
        assert service.stop.is_set()  # and it sets the flag the other threads read
        assert not service.wakeup.wait(0)  # the wake-up was consumed
    finally:
        service.runtime.close()
