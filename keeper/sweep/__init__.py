"""Sweeps: the engine (the ``Sweeper`` that holds results until committed, and one sweep's
run), the worker of one leased grant and the journal of results an exit could not write."""
