"""The database: engines and migrations (``db``, ``migrations/``), the schema, and the ``Store``
(``grants``) with its mixins (``leases``, ``reports``, ``quota_state``, ``avatar_state``)."""
