"""``keeper run``'s ``/metrics`` listener on ``metrics_listen``: the process's metrics and the
database's gauges, served by a thread of its own."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from keeper.config import Config
from keeper.metrics import process
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import MetricsServer, registry_for
from keeper.store.grants import Store

log = structlog.get_logger("keeper.metrics")


def start_metrics(config: Config, *, store: Callable[[], Store],
                  current: Callable[[], Config]) -> MetricsServer | None:
    """Serve ``/metrics`` when ``metrics_listen`` is set (and record process metrics only
    then). An address that cannot be bound (in use, not this host's) is one error line and
    no listener: the sweeps matter more than their metrics, and a second keeper on the host
    (``keeper@2``) must not fail for want of the first's port."""
    process.enable(bool(config.metrics_listen))
    if config.metrics_host is None or config.metrics_port is None:
        return None
    collector = DatabaseCollector(store=store, config=current)
    try:
        server = MetricsServer(config.metrics_host, config.metrics_port,
                               registry_for(collector), on_close=collector.close).start()
    except OSError as e:
        log.error("metrics.listen_failed", listen=config.metrics_listen,
                  error=e.strerror or type(e).__name__)
        return None
    log.info("metrics.listening", listen=config.metrics_listen, port=server.port)
    return server


def stop_metrics(server: MetricsServer | None) -> None:
    """The shutdown step after the sweep's results are written (a last scrape sees them) and
    before the database is closed (the collector reads it)."""
    if server is not None:
        log.info("keeper.stopping", step="metrics")
        server.close()
