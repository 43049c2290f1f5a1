"""The application API (``keeper serve``): tokens on demand, logins, users, the feed.

:mod:`~keeper.api.tokens` and :mod:`~keeper.api.logins` are what ``keeper token`` and
``keeper grant`` use too; :mod:`~keeper.api.app` is the HTTP side (Starlette, served by uvicorn
from :mod:`~keeper.api.server`). Its modules import one way only: :mod:`~keeper.api.context`
(what handlers share) below :mod:`~keeper.api.http` (the route table, errors, keys), below the
handlers (:mod:`~keeper.api.routes`, :mod:`~keeper.api.monitoring`), below
:mod:`~keeper.api.app`.
"""
