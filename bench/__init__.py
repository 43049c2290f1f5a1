"""keeper's benchmarks and the test-host network they (and ``tests/hosts``) use: run from the
repository with ``python -m bench`` (``make bench``). Not part of the ``keeper`` wheel; it
imports keeper, keeper never imports it."""
