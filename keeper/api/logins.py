"""A login: exchange the code a user's browser brought back for a grant, and store it.

Shared by ``keeper grant`` and ``POST /v1/grants``. A code is single-use, so the exchange is
never retried: when WeChat does not answer, the user logs in again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import structlog

from keeper.clock import utcnow
from keeper.config import AppConfig, Config
from keeper.core.models import ACTIVE, Grant
from keeper.core.policy import schedule
from keeper.errors import (
    AppConfigRejected,
    BadCode,
    ConfigError,
    DatabaseUnavailable,
    KeeperError,
    QuotaExceeded,
    TransientApiError,
)
from keeper.limiter import QuotaGate, QuotaWait
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from keeper.wechat.client import WeChatClient

log = structlog.get_logger("keeper.logins")


class CodeRejected(KeeperError):
    """WeChat refused the code (invalid, expired or used): the user must log in again."""

    def __init__(self, message: str, errcode: int | None) -> None:
        super().__init__(message)
        self.errcode = errcode


class AppSecretMissing(ConfigError):
    """keeper has no AppSecret for the app (its configuration, not an outage): no login code of
    the app can be exchanged until an operator sets it. The message names the app and where
    the secret is read from, never a value."""

    def __init__(self, app: AppConfig) -> None:
        super().__init__(f"app {app.appid} has no AppSecret, so its login codes cannot be "
                         f"exchanged: {app.secret_problem or app.secret_source}")


class ExchangeFailed(KeeperError):
    """WeChat could not exchange the code now (no answer, quota used up)."""

    def __init__(self, message: str, *, retry_after_s: float = 5) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s + 0.999))


@dataclass(frozen=True)
class Login:
    appid: str
    openid: str
    unionid: str | None
    scope: str
    is_snapshotuser: bool


def exchange(
    *, config: Config, app: AppConfig, code: str, store: Store, client: WeChatClient,
    gate: QuotaGate, max_wait_s: float = 30,
) -> Login:
    """Exchange ``code`` for ``app`` and store the grant (clearing any re-authorization record).

    Raises :class:`CodeRejected`, :class:`ExchangeFailed`, :class:`AppSecretMissing` (before
    asking WeChat anything), ``ConfigError`` (WeChat refuses the app) and ``StoreError``.
    """
    if not app.secret:
        raise AppSecretMissing(app)
    try:
        gate.acquire(app.appid, "code", max_wait_s=max_wait_s)
    except QuotaWait as e:
        raise ExchangeFailed(f"WeChat's code quota is used up: {e}",
                             retry_after_s=gate.seconds_until(e.until)) from None
    try:
        answer = client.exchange_code(app.appid, app.secret, code)
    except QuotaExceeded as e:
        until = gate.pause(app.appid, "code", e.errcode or 45011)
        raise ExchangeFailed(f"WeChat's code quota is used up: {e}",
                             retry_after_s=gate.seconds_until(until)) from None
    except BadCode as e:
        raise CodeRejected(f"the code was refused ({e}): the user must log in again",
                           e.errcode) from None
    except AppConfigRejected as e:
        raise ConfigError(f"WeChat refused app {app.appid} ({e}): check its AppSecret, appid "
                          "and IP whitelist") from None
    except TransientApiError as e:
        # Never retried: a code is single-use, and a retry would answer 40163.
        raise ExchangeFailed(f"WeChat could not exchange the code ({e}); ask the user to log "
                             "in again") from None
    now = utcnow()
    grant = Grant(
        id=0, appid=app.appid, openid=answer.openid, unionid=answer.unionid,
        scope=answer.scope, access_token=answer.access_token,
        refresh_token=answer.refresh_token,
        access_expires_at=now + timedelta(seconds=answer.expires_in_s),
        refresh_issued_at=now, state=ACTIVE,
        profile_stop=48001 if answer.is_snapshotuser else None,
    )
    _store(store, GrantWrite(grant, schedule(grant, config.lifetime(app))))
    log.info("grant.stored", appid=app.appid, openid=answer.openid,
             snapshot=answer.is_snapshotuser)
    return Login(app.appid, answer.openid, answer.unionid, answer.scope, answer.is_snapshotuser)


#: Pauses between attempts to store a new grant while the database blips: the code is spent,
#: so these tokens exist nowhere else, and a short outage should not cost the user a login.
STORE_RETRIES_S = (0.2, 0.5, 1.0)


def _store(store: Store, write: GrantWrite) -> None:
    for pause in (*STORE_RETRIES_S, None):
        try:
            store.upsert_grants([write], utcnow())
            return
        except DatabaseUnavailable:
            if pause is None:
                raise
            log.warning("grant.store_retry", appid=write.grant.appid,
                        openid=write.grant.openid, in_s=pause)
            time.sleep(pause)
