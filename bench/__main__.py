"""``python -m bench [api|events|hosts|metrics|quotas] [options]``: keeper's benchmarks, from the
repository with its venv (``make bench ARGS="..."``). With no subcommand: a sweep against the
simulator (:mod:`bench.sweep`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api"]:  # the HTTP API (bench/api.py)
        from bench.api import main as bench_api

        return bench_api(argv[1:])
    if argv[:1] == ["metrics"]:  # the cost of metrics
        from bench.metrics import main as bench_metrics

        return bench_metrics(argv[1:])
    if argv[:1] == ["hosts"]:  # throughput with hosts, a shared quota
        from bench.hosts import main as bench_hosts

        return bench_hosts(argv[1:])
    if argv[:1] == ["quotas"]:  # the share of a quota's rate used, by size and processes
        from bench.quotas import main as bench_quotas

        return bench_quotas(argv[1:])
    if argv[:1] == ["events"]:  # delivery to webhooks
        from bench.events import main as bench_events

        return bench_events(argv[1:])
    from bench.sweep import main as bench_sweep

    return bench_sweep(argv)


if __name__ == "__main__":
    raise SystemExit(main())
