"""The command line: ``main`` (every command, ``keeper import`` lines included), ``events``
(``keeper events``) and ``demo``. The benchmarks live outside the package, in ``bench/``."""
