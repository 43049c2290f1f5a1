"""Builds keeper's parts from a :class:`Config`: one place that wires them together."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from keeper.avatars.fetcher import Fetcher
from keeper.avatars.sweep_pass import AvatarKeeper
from keeper.clock import utcnow
from keeper.config import Config
from keeper.config.webhooks import require_secrets
from keeper.crypto import Cipher, create_key_file, load_keys
from keeper.errors import ConfigError
from keeper.events.deliverer import Deliverer
from keeper.limiter import QuotaGate
from keeper.log import register_secret
from keeper.loop import EventLoop
from keeper.service.statedir import guard_sqlite_file
from keeper.store.db import is_sqlite, sqlite_path
from keeper.store.grants import Store
from keeper.sweep.engine import Sweeper
from keeper.sweep.journal import Journal
from keeper.sweep.worker import Worker
from keeper.wechat.aio import AsyncWeChatClient
from keeper.wechat.client import WeChatClient

#: How long closing waits for the event loop's connections and thread.
CLOSE_TIMEOUT_S = 5.0


def cipher_for(config: Config) -> Cipher:
    """The token cipher: the configured key files, or on the embedded SQLite default a key
    file beside the database, created (mode 0600) on first use. A SQLite database this process
    must not open or create (:mod:`keeper.service.statedir`) is refused first."""
    db_file = sqlite_path(config.database_url) if is_sqlite(config.database_url) else None
    if db_file is not None:
        # Before anything is created beside it (the key, the database itself).
        guard_sqlite_file(db_file, config_source=config.source)
    paths = list(config.encryption_key_files)
    if not paths:
        if db_file is None:
            raise ConfigError(
                "encryption_key_file is required with this database_url: every keeper process "
                "sharing it must use the same key (generate one: keeper rotate-key --new)"
            )
        key = db_file.parent / "keeper.key"
        if not key.exists():
            create_key_file(key)
        paths = [key]
    return Cipher(load_keys(paths))


def open_store(config: Config, *, pool_size: int = 1) -> Store:
    """The store with its cipher, schema checked (or upgraded on SQLite) and keys verified."""
    return Store(config.database_url, cipher=cipher_for(config), pool_size=pool_size,
                 timeout_s=config.database_timeout_s, pooler=config.database_pooler).open()


@dataclass
class Runtime:
    """keeper's parts for one process, wired from one :class:`Config`. A context manager:
    ``with Runtime.build(config) as rt:`` closes the WeChat clients, the event loop and the
    store on the way out, however the block ends.

    ``client`` serves threads (a login's code exchange, ``keeper check``); the worker's calls
    are ``aio_client``'s, tasks on ``loop``, the process's one event loop (started on first
    use)."""

    config: Config
    store: Store
    client: WeChatClient
    gate: QuotaGate
    worker: Worker
    stop: threading.Event
    avatars: AvatarKeeper
    loop: EventLoop
    aio_client: AsyncWeChatClient

    @classmethod
    def build(
        cls, config: Config, *, open_store: bool = True, stop: threading.Event | None = None,
        pool_size: int = 4, max_overflow: int | None = None,
    ) -> Runtime:
        """Every part, wired. ``open_store=False`` leaves checking the database to the caller
        (the service waits for it instead of failing). ``pool_size``, ``max_overflow``: the
        store's connection pool (see :func:`keeper.store.db.make_engine`)."""
        for app in config.apps:
            register_secret(app.secret)
        stop = stop or threading.Event()
        store = Store(config.database_url, cipher=cipher_for(config), pool_size=pool_size,
                      max_overflow=max_overflow, timeout_s=config.database_timeout_s,
                      pooler=config.database_pooler)
        if open_store:
            store.open()
        client = WeChatClient(
            api_base=config.api_base, connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
        )
        aio_client = AsyncWeChatClient(
            api_base=config.api_base, connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s, max_connections=max(100, config.workers),
        )
        gate = QuotaGate(
            store=store, apps={a.appid: a for a in config.apps}, stop=stop, batch=config.workers
        )
        loop = EventLoop()
        worker = Worker(config=config, client=aio_client, gate=gate, stop=stop, clock=utcnow,
                        loop=loop)
        fetcher = Fetcher(
            hosts=config.avatar_hosts, avatar_dir=config.avatar_dir,
            connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.avatar_timeout_s,
            max_bytes=config.avatar_max_bytes, concurrency=config.avatar_workers,
        )
        avatars = AvatarKeeper(store=store, fetcher=fetcher, clock=utcnow,
                               workers=config.avatar_workers,
                               keep_when_removed=config.avatar_keep_when_removed)
        return cls(config, store, client, gate, worker, stop, avatars, loop, aio_client)

    def journal(self) -> Journal:
        return Journal(self.config.journal_dir, self.store.cipher)

    def sweeper(self) -> Sweeper:
        return Sweeper(config=self.config, store=self.store, worker=self.worker, stop=self.stop,
                       avatars=self.avatars, journal=self.journal())

    def deliverer(self) -> Deliverer:
        """The events' delivery loop, on a store (and connection pool) of its own: a slow
        receiver never holds a connection a sweep needs. ``ConfigError`` when a webhook's
        secret could not be read: nothing could be signed for it."""
        require_secrets(self.config.webhooks)
        for hook in self.config.webhooks:
            register_secret(hook.secret)
        store = Store(self.config.database_url, cipher=self.store.cipher,
                      pool_size=len(self.config.webhooks) + 1, max_overflow=1,
                      timeout_s=self.config.database_timeout_s,
                      pooler=self.config.database_pooler)
        return Deliverer(store=store, webhooks=self.config.webhooks, stop=self.stop,
                         retention_s=self.config.events_retention_s)

    def close(self) -> None:
        if self.loop.running:
            # Calls still in flight (a sweep's grace ended) end with the connection pool.
            with contextlib.suppress(Exception):
                self.loop.submit(self.aio_client.close()).result(CLOSE_TIMEOUT_S)
            self.loop.close(CLOSE_TIMEOUT_S)
        self.client.close()
        self.store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
