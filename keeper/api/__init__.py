"""The application API (``keeper serve``): tokens on demand, logins, users, the feed.

:mod:`~keeper.api.tokens` and :mod:`~keeper.api.logins` are what ``keeper token`` and
``keeper grant`` use too; :mod:`~keeper.api.app` is the HTTP side (Starlette, served by uvicorn
from :mod:`~keeper.api.server`).
"""
