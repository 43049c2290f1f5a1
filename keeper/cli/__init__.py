"""The command line: ``main`` (every command), ``importer`` (``keeper import`` lines), ``demo``
and ``bench``."""
