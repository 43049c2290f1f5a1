"""Sweeps: the ``Sweeper`` (``engine``) that holds results until committed, one sweep's run,
the worker of one leased grant, the quota gate (``limiter``) and the journal."""
