"""WeChat's four sns endpoints as the simulator answers them: quotas, forced and random
failures, scripted odd answers, then the real logic (codes, refreshes, auth, userinfo)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from keeper.wechat.simulator.answers import ODD_BY_NAME, OddAnswer, unionid_field
from keeper.wechat.simulator.errmsgs import make_rid, with_rid
from keeper.wechat.simulator.records import (
    _DAY_S,
    _UNKNOWN_APP,
    ACCESS_TOKEN_LIFETIME_S,
    _api_reply,
    _Counter,
    _error,
    _failure_reply,
    _first_error,
    _Grant,
    _Reply,
    _token,
    _token_payload,
)
from keeper.wechat.simulator.state import SimState


class Endpoints(SimState):
    """WeChat's four endpoints: the code exchange, the refresh, auth and userinfo."""

    def _api(self, endpoint: str, params: dict[str, str]) -> _Reply:
        now = self._clock()
        with self._lock:
            appid, openid = self._subject(endpoint, params)
            counter = self._counters.get((appid, endpoint))
            if counter is None:
                counter = self._counters[(appid, endpoint)] = _Counter()
            counter.calls += 1
            counter.arrivals.append(now)
            if endpoint == "refresh" and "secret" in params:
                counter.secret_sent += 1  # WeChat's refresh takes no secret: sending it leaks it
            if self._over_quota(appid, endpoint, now):
                counter.quota_rejected += 1
                return self._reply(_error(45011), now)
            failure = self._pick_failure(endpoint, openid)
            if isinstance(failure, str) and failure in ODD_BY_NAME:
                return self._odd(endpoint, ODD_BY_NAME[failure], params, now, counter)
            if failure is None:
                payload = self._perform(endpoint, params, now)
                self._count(endpoint, counter, payload)
                return self._reply(payload, now)
            counter.errors[str(failure)] = counter.errors.get(str(failure), 0) + 1
            if failure in ("truncated", "timeout"):
                # The server did the work and the answer got lost on the way back: a rotated
                # refresh token or a consumed code is gone for the client, as with WeChat.
                return _failure_reply(failure, self._logic(endpoint, params, now),
                                      self._timeout_sleep_s, "")
            if endpoint == "code" and isinstance(failure, str):
                self._consume_code(params)
            rid = make_rid(now, self._rid_rng)
        return _failure_reply(failure, {}, 0.0, rid)

    def _perform(self, endpoint: str, params: dict[str, str], now: float) -> dict[str, object]:
        """The real answer to a call that reaches the client (lock held)."""
        if endpoint == "userinfo":
            return self._userinfo(params, now, answered=True)
        return self._logic(endpoint, params, now)

    def _count(self, endpoint: str, counter: _Counter, payload: Mapping[str, object]) -> None:
        outcome = str(payload.get("errcode") or "")
        if outcome:
            counter.errors[outcome] = counter.errors.get(outcome, 0) + 1
            return
        by_openid = self._by_openid.get(endpoint)
        if by_openid is not None:
            user = str(payload["openid"])
            by_openid[user] = by_openid.get(user, 0) + 1
        counter.ok += 1

    def _reply(self, payload: dict[str, object], now: float) -> _Reply:
        """The API answer; an error's errmsg gets a rid, as WeChat's do today (lock held)."""
        if payload.get("errcode"):
            payload["errmsg"] = with_rid(str(payload.get("errmsg", "")),
                                         make_rid(now, self._rid_rng))
        return _api_reply(payload)

    def _consume_code(self, params: dict[str, str]) -> None:
        # WeChat consumes a code even when it answers -1 (a retry gets 40163): this is why a
        # code exchange must never be retried.
        code = self._codes.get(params.get("code", ""))
        if code is not None and code.appid == params.get("appid"):
            code.used = True

    def _odd(self, endpoint: str, odd: OddAnswer, params: dict[str, str], now: float,
             counter: _Counter) -> _Reply:
        """A scripted ODD_ANSWERS entry (lock held): performed first when it says so, then its
        body, placeholders filled from the result (or from the state as it stands)."""
        self._scripted[odd.name] = self._scripted.get(odd.name, 0) + 1
        values = {"rid": make_rid(now, self._rid_rng), "other_openid": "o" + secrets.token_hex(14),
                  "fake_access_token": _token("AT"), "fake_refresh_token": _token("RT"),
                  "expires_in": str(ACCESS_TOKEN_LIFETIME_S), "is_snapshotuser": "0"}
        if odd.perform:
            payload = self._perform(endpoint, params, now)
            self._count(endpoint, counter, payload)
            if payload.get("errcode"):
                return self._reply(payload, now)  # nothing to dress: the real error it is
            values.update({key: str(value) for key, value in payload.items()
                           if isinstance(value, str | int) and not isinstance(value, bool)})
            values["unionid_field"] = unionid_field(str(payload.get("unionid") or "") or None)
        else:
            key = odd.name if odd.errcode is None else str(odd.errcode)
            counter.errors[key] = counter.errors.get(key, 0) + 1
            values.update(self._as_it_stands(endpoint, params))
        return _Reply(200, odd.content_type, odd.render(values))

    def _as_it_stands(self, endpoint: str, params: dict[str, str]) -> dict[str, str]:
        """Placeholder values for an answer that changes nothing (lock held): the asker's
        tokens as they are (tokens never issued for a code, which is consumed)."""
        grant: _Grant | None = None
        if endpoint == "code":
            self._consume_code(params)
            code = self._codes.get(params.get("code", ""))
            return {"openid": code.openid if code else "", "scope": code.scope if code else "",
                    "unionid_field": unionid_field(code.unionid if code else None),
                    "access_token": _token("AT"), "refresh_token": _token("RT"),
                    "headimgurl": ""}
        if endpoint == "refresh":
            grant = self._by_refresh.get(params.get("refresh_token", ""))
        else:
            grant = self._by_access.get(params.get("access_token", ""))
        openid = grant.openid if grant else params.get("openid", "")
        return {"openid": openid, "scope": grant.scope if grant else "",
                "unionid_field": unionid_field(grant.unionid if grant else None),
                "access_token": grant.access_token if grant else params.get("access_token", ""),
                "refresh_token": (grant.refresh_token if grant
                                  else params.get("refresh_token", "")),
                "headimgurl": self._headimgurl(openid)}

    def _subject(self, endpoint: str, params: dict[str, str]) -> tuple[str, str | None]:
        """(the app the call counts against, the user a forced answer may be aimed at)."""
        if endpoint == "code":
            code = self._codes.get(params.get("code", ""))
            return params.get("appid") or _UNKNOWN_APP, code.openid if code else None
        if endpoint == "refresh":
            grant = self._by_refresh.get(params.get("refresh_token", ""))
            return params.get("appid") or _UNKNOWN_APP, grant.openid if grant else None
        # auth and userinfo carry no appid: the token tells whose quota they use.
        grant = self._by_access.get(params.get("access_token", ""))
        openid = params.get("openid") or (grant.openid if grant else None)
        return (grant.appid if grant else _UNKNOWN_APP), openid

    def _over_quota(self, appid: str, endpoint: str, now: float) -> bool:
        quota = self._quotas.get(endpoint)
        if quota is None:
            return False
        window = int(now // quota.period_s)
        previous = self._windows.get((appid, endpoint))
        seen = previous[1] if previous is not None and previous[0] == window else 0
        self._windows[(appid, endpoint)] = (window, seen + 1)
        return seen >= quota.count

    def _pick_failure(self, endpoint: str, openid: str | None) -> int | str | None:
        queue = self._forced.get(endpoint)
        if queue:
            for index, forced in enumerate(queue):
                if forced.openid is None or forced.openid == openid:
                    forced.remaining -= 1
                    if forced.remaining <= 0:
                        del queue[index]
                    return forced.answer
        if self._failure_rates:
            draw = self._rng.random()
            for kind, rate in self._failure_rates.items():
                if draw < rate:
                    return kind
                draw -= rate
        return None

    def _exchange_code(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid, secret = params.get("appid", ""), self._apps.get(params.get("appid", ""))
        code = self._codes.get(params.get("code") or "")
        errcode = _first_error(
            (not appid, 41002), (secret is None, 40013), (not params.get("secret"), 41004),
            (params.get("secret") != secret, 40125), (not params.get("code"), 41008),
            (params.get("grant_type") != "authorization_code", 40002),
            (code is None or code.appid != appid, 40029),
            (code is not None and code.used, 40163),
            (code is not None and now >= code.expires_at, 42003),
        )
        if errcode or code is None:
            return _error(errcode)
        code.used = True
        grant = self._by_user.get((appid, code.openid))
        if grant is None:
            grant = _Grant(appid, code.openid, "", "", 0.0, 0.0,
                           legacy_profile=code.legacy_profile)
        else:
            # A new authorization of a user WeChat knows: the older tokens die with it (the
            # older refresh token then answers 40030); the user's profile stays theirs.
            self._forget_tokens(grant)
            grant.legacy_profile = grant.legacy_profile or code.legacy_profile
        grant.access_token, grant.refresh_token = _token("AT"), _token("RT")
        grant.access_expires_at, grant.refresh_issued_at = now + ACCESS_TOKEN_LIFETIME_S, now
        grant.scope, grant.unionid = code.scope, code.unionid
        grant.profile = grant.profile if code.profile is None else code.profile
        grant.state = "snapshot" if code.snapshot else "ok"
        self._store_grant(grant)
        payload = _token_payload(grant)
        if grant.unionid:
            payload["unionid"] = grant.unionid
        if code.snapshot:
            payload["is_snapshotuser"] = 1
        return payload

    def _refresh(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid = params.get("appid", "")
        grant = self._by_refresh.get(params.get("refresh_token") or "")
        errcode = _first_error(
            (not appid, 41002), (appid not in self._apps, 40013),
            (not params.get("refresh_token"), 41003),
            (params.get("grant_type") != "refresh_token", 40002),
            (grant is None or grant.appid != appid or grant.state == "invalid", 40030),
            (grant is not None and grant.state == "revoked", 42007),
            (grant is not None
             and now >= grant.refresh_issued_at + self._refresh_token_days * _DAY_S, 42002),
        )
        if errcode or grant is None:
            return _error(errcode)
        # WeChat's doc: an expired access token is replaced; a live one keeps its value and
        # only has its expiry pushed out.
        if now >= grant.access_expires_at:
            if self._by_access.get(grant.access_token) is grant:
                del self._by_access[grant.access_token]
            grant.access_token = _token("AT")
            self._by_access[grant.access_token] = grant
        grant.access_expires_at = now + ACCESS_TOKEN_LIFETIME_S
        if self._rotate if grant.rotate is None else grant.rotate:
            if self._by_refresh.get(grant.refresh_token) is grant:
                del self._by_refresh[grant.refresh_token]
            grant.refresh_token, grant.refresh_issued_at = _token("RT"), now
            self._by_refresh[grant.refresh_token] = grant
        return _token_payload(grant)

    def _check_access(self, params: dict[str, str], now: float) -> tuple[_Grant | None, int]:
        """(the grant, 0) when the access token may be used, else (None, errcode)."""
        grant = self._by_access.get(params.get("access_token") or "")
        errcode = _first_error(
            (not params.get("access_token"), 41001), (not params.get("openid"), 41009),
            (grant is None, 40001),
            (grant is not None and grant.openid != params.get("openid"), 40003),
            (grant is not None and grant.state == "revoked", 42007),
            (grant is not None and now >= grant.access_expires_at, 42001),
        )
        return (None, errcode) if errcode else (grant, 0)

    def _auth(self, params: dict[str, str], now: float) -> dict[str, object]:
        errcode = self._check_access(params, now)[1]
        return _error(errcode, "ok" if errcode == 0 else None)

    def _userinfo(self, params: dict[str, str], now: float, *,
                  answered: bool = False) -> dict[str, object]:
        """The profile; ``answered``: it will reach the client (not lost to a failure)."""
        grant, errcode = self._check_access(params, now)
        if grant is None:
            return _error(errcode)
        # Website (QR) logins carry snsapi_login, which includes the profile.
        scopes = set(grant.scope.split(","))
        if grant.state == "snapshot" or not scopes & {"snsapi_userinfo", "snsapi_login"}:
            return _error(48001)
        if answered and self._avatar_change_every > 0:
            reads = self._profile_reads[grant.openid] = self._profile_reads.get(grant.openid, 0) + 1
            if reads % self._avatar_change_every == 0:
                self._change_avatar(grant.openid)
        payload: dict[str, object] = {
            "openid": grant.openid, "nickname": f"user-{grant.openid[-6:]}", "sex": 0,
            "province": "", "city": "", "country": "",
            "headimgurl": self._headimgurl(grant.openid), "privilege": [],
        }
        if grant.legacy_profile or self._legacy_profiles:
            # Before late 2021 WeChat gave sex and region; zh_CN (the default) and zh_TW in
            # Chinese.
            english = params.get("lang") == "en"
            payload.update({"sex": 1, "province": "Guangdong" if english else "广东",
                            "city": "Shenzhen" if english else "深圳",
                            "country": "CN" if english else "中国"})
        if grant.unionid:
            payload["unionid"] = grant.unionid
        payload.update(grant.profile or {})
        return payload

    def _logic(self, endpoint: str, params: dict[str, str], now: float) -> dict[str, object]:
        """The endpoint's work and its answer (lock held)."""
        if endpoint == "code":
            return self._exchange_code(params, now)
        if endpoint == "refresh":
            return self._refresh(params, now)
        if endpoint == "auth":
            return self._auth(params, now)
        return self._userinfo(params, now)
