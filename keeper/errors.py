"""One exception tree for keeper.

Messages never carry a token, code or secret: the WeChat client builds them from the endpoint
name and the errcode only, and raises them ``from None`` so no ``requests`` exception (whose text
holds the full URL) is chained underneath.
"""

from __future__ import annotations


class KeeperError(Exception):
    """Root of every error keeper raises on purpose."""


class ConfigError(KeeperError):
    """The configuration file or environment is invalid. Nothing runs."""


class UsageError(KeeperError):
    """A command was given bad arguments or bad input (exit 2)."""


class StoreError(KeeperError):
    """The database failed."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached."""


class SchemaOutdated(StoreError):
    """The database schema is older than this keeper; run ``keeper db upgrade``."""


class ApiError(KeeperError):
    """WeChat answered with an error, or could not be asked.

    ``endpoint`` is one of ``code``, ``refresh``, ``auth``, ``userinfo``; ``errcode`` is WeChat's
    code, or ``None`` for network and protocol failures.
    """

    def __init__(self, endpoint: str, errcode: int | None, detail: str) -> None:
        self.endpoint = endpoint
        self.errcode = errcode
        self.detail = detail
        code = f" errcode {errcode}" if errcode is not None else ""
        super().__init__(f"{endpoint}:{code} {detail}".replace(":  ", ": "))


class TransientApiError(ApiError):
    """Try again later: network error, timeout, HTTP 5xx, a garbled body, errcode -1 or one
    keeper does not know. Never a reason to ask the user to log in again."""


class MalformedAnswer(TransientApiError):
    """WeChat's body is not a JSON object, or lacks what the call must return (a token, a
    positive ``expires_in``, ``errcode`` 0 from ``/sns/auth``). Transient: tried again later."""


class AnswerMismatch(MalformedAnswer):
    """The answer is about another user (its ``openid`` is not the grant's): refused."""


class KeeperBugAnswer(TransientApiError):
    """WeChat says keeper sent a bad or missing parameter (40002, 40035, 40097, 41001-41009):
    a keeper bug. Backed off like a transient failure, never a re-authorization."""


class QuotaExceeded(TransientApiError):
    """45009 (daily quota) or 45011 (minute quota): the endpoint pauses until its window rolls."""


class ReauthRequired(ApiError):
    """WeChat's definitive answer that the grant is dead: the user must log in again.

    ``reason`` is one of the contract's reasons (``refresh_token_invalid``,
    ``refresh_token_expired``, ``authorization_revoked``, ``other``).
    """

    def __init__(self, endpoint: str, errcode: int | None, detail: str, *, reason: str) -> None:
        super().__init__(endpoint, errcode, detail)
        self.reason = reason


class AppConfigRejected(ApiError):
    """WeChat rejected the app itself (bad appid or AppSecret, IP not whitelisted, the API
    banned for the app): an operator's problem, never a user's."""


class BadCode(ApiError):
    """A login code that is invalid, expired or already used: the user must log in again."""


class StaleAccessToken(ApiError):
    """The access token is invalid or expired: refresh it, then retry once."""


class NoProfile(ApiError):
    """The profile cannot be read for this grant (48001, 50001, 50002)."""
