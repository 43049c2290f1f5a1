"""Prometheus metrics of this process (:mod:`~keeper.metrics.process`): counters and histograms
the WeChat client, the quota gate, the sweep and the API record into. What the metrics say
about the database is read at scrape time by :mod:`keeper.observe.collector`.

A layer low enough for the WeChat client to import; it imports only ``prometheus_client``.
"""
