"""What the handlers share within one server process: :class:`Api`, built once by
:func:`~keeper.api.app.create_app` (one :class:`~keeper.service.runtime.Runtime` per process)
and handed to every handler.

Each server process has its own connection pool, quota gate and token desk; processes and
hosts coordinate through the database as sweeps do (leases, the shared quota rows). A thread
replays the local journal every few seconds, so a token WeChat renewed while the database was
down is written as soon as the database is back, not at the next restart.
"""

from __future__ import annotations

import threading

import structlog

from keeper.api.keys import KeyRing
from keeper.api.loopclient import LoopClient
from keeper.api.openapi import document
from keeper.api.refresher import Refresher
from keeper.api.tokens import TokenDesk
from keeper.clock import utcnow
from keeper.config import Config
from keeper.errors import StoreError
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import registry_for
from keeper.service.runtime import Runtime
from keeper.store.token_reader import TokenReader
from keeper.sweep.worker import Worker

log = structlog.get_logger("keeper.api")

JOURNAL_REPLAY_S = 3.0
#: Database connections each server process keeps (its handler threads share them).
POOL_SIZE = 8


class Api:
    """What the handlers share within one server process."""

    def __init__(self, config: Config, keys: KeyRing) -> None:
        self.config = config
        self.keys = keys
        self.appids = frozenset(a.appid for a in config.apps)
        # A fixed pool, no overflow: with the default (4, and 4 more opened and closed as
        # needed), requests at c=32 opened ~25 PostgreSQL sessions a second, a backend fork
        # each. Eight stay open (the same most as before); the handler threads take turns.
        self.rt = Runtime.build(config, open_store=False, pool_size=POOL_SIZE, max_overflow=0)
        self.store = self.rt.store
        self.journal = self.rt.journal()
        # WeChat's calls are made on the event loop (keeper.api.loopclient), for the token
        # desk's refreshes and for logins; a worker of the API's own uses it.
        self.client = LoopClient(api_base=config.api_base,
                                 connect_timeout_s=config.connect_timeout_s,
                                 read_timeout_s=config.read_timeout_s)
        # The token desk's refreshes from handler threads: a worker of the API's own, on the
        # runtime's event loop with its async client, as the sweep's.
        self.worker = Worker(config=config, client=self.rt.aio_client, gate=self.rt.gate,
                             stop=self.rt.stop, clock=utcnow, loop=self.rt.loop)
        # The refreshes made on the server's own event loop (keeper.api.refresher), with the
        # async client the loop client keeps there.
        self.loop_worker = Worker(config=config, client=self.client.aio, gate=self.rt.gate,
                                  stop=self.rt.stop, clock=utcnow, loop=self.rt.loop)
        # A request waits for a quota permit no longer than for a busy grant (a sweep waits
        # longer: it has nobody waiting on it).
        self.worker.quota_wait_s = self.loop_worker.quota_wait_s = min(
            config.api.token_wait_s, 5.0)
        self.desk = TokenDesk(store=self.store, worker=self.worker, lease_s=config.lease_s,
                              wait_s=config.api.token_wait_s, journal=self.journal,
                              clock=utcnow)
        self.refresher = Refresher(store=self.store, desk=self.desk, worker=self.loop_worker,
                                   lease_s=config.lease_s, clock=utcnow)
        # The token endpoint's fast path (a fresh token read on the event loop).
        self.reader = TokenReader(self.store.engine, self.store.cipher,
                                  pooler=self.store.pooler)
        self.openapi = document(config, utcnow()).encode("utf-8")
        # /metrics: this process's metrics (every server process's, in multiprocess mode)
        # and the database's gauges, read at most every few seconds.
        self.collector = DatabaseCollector(store=lambda: self.store, config=lambda: self.config)
        self.registry = registry_for(self.collector)
        self._replayer: threading.Thread | None = None

    def start(self) -> None:
        self.store.open()
        self._replayer = threading.Thread(target=self._replay, name="journal-replay",
                                          daemon=True)
        self._replayer.start()

    def close(self) -> None:
        self.refresher.close()
        self.client.close()
        self.collector.close()
        self.rt.stop.set()
        if self._replayer is not None:
            self._replayer.join(timeout=5)
        self.rt.close()

    def _replay(self) -> None:
        while not self.rt.stop.wait(JOURNAL_REPLAY_S):
            if not self.journal.files():
                continue
            try:
                counts = self.journal.replay(self.store, utcnow())
            except StoreError:
                continue  # still down: the files wait for the next round
            except Exception:
                log.exception("journal.replay_failed")
                continue
            if counts["files"]:
                log.info("journal.replayed", **counts)
