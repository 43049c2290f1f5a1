"""No token, code, API key or AppSecret in anything ``keeper serve`` prints or answers (but
the token endpoint's own answer), whatever goes wrong, at debug level."""

from __future__ import annotations

import json

from keeper.wechat.simulator import Simulator
from tests.api.server import Served, stop
from tests.conftest import APPID, SECRET
from tests.e2e.helpers import make_grant, seed


def test_no_secret_reaches_the_log_or_an_answer_other_than_the_token_itself(
    served: Served, sim: Simulator
) -> None:
    answers: list[str] = []  # every body and header but a token endpoint's 200
    handed_out: set[str] = set()

    def call(method: str, path: str, **kw: object) -> None:
        r = served.call(method, path, **kw)  # type: ignore[arg-type]
        if "/token" in path and r.status_code == 200:
            handed_out.add(r.json()["access_token"])
        else:
            answers.append(r.text + json.dumps(dict(r.headers)))

    sim.configure(rotate_refresh_tokens=True)
    grants = [make_grant(f"o{i}", access_in_s=-60) for i in range(6)]
    grants.append(make_grant("revoked", access_in_s=-60, state="revoked"))
    seed(sim, served.keeper, grants)
    secrets = {SECRET, *served.keys.values()}
    secrets |= {g["access_token"] for g in grants} | {g["refresh_token"] for g in grants}

    good = sim.issue_code(appid=APPID, openid="new")
    down = sim.issue_code(appid=APPID, openid="down")
    secrets |= {good, down, "made-up-code-value-1", "wrong-key-value-1"}
    call("POST", "/v1/grants", json={"appid": APPID, "code": good})
    call("POST", "/v1/grants", json={"appid": APPID, "code": good})
    call("POST", "/v1/grants", json={"appid": APPID, "code": "made-up-code-value-1"})
    sim.force("code", -1)
    call("POST", "/v1/grants", json={"appid": APPID, "code": down})
    call("POST", "/v1/grants", data=b'{"code": "made-up-code-value-1"',
         headers={"Content-Type": "application/json"})
    call("GET", served.user(APPID, "o0"), key=None,
         headers={"Authorization": "Bearer wrong-key-value-1"})
    call("GET", served.user(APPID, "o0"), key="tokens")

    for i, answer in enumerate(("timeout", "502", "truncated", "html", -1)):
        sim.force("refresh", answer)  # type: ignore[arg-type]
        call("GET", served.user(APPID, f"o{i}", "/token"))
    for i in range(5):
        call("GET", served.user(APPID, f"o{i}", "/token"))
        call("GET", served.user(APPID, f"o{i}", "/token?min_valid=6000"))
    sim.force("refresh", 45011)  # last: it pauses the app's refreshes for the minute
    call("GET", served.user(APPID, "o5", "/token"))
    call("GET", served.user(APPID, "revoked", "/token"))
    put_body = {k: v for k, v in make_grant("o-put").items()
                if k in ("access_token", "refresh_token", "scope", "access_expires_at",
                         "refresh_issued_at")}
    secrets |= {put_body["access_token"], put_body["refresh_token"]}
    call("PUT", served.user(APPID, "o-put"), json=put_body)
    call("PUT", served.user(APPID, "o-put"), json=put_body | {"access_expires_at": "never"})
    call("PUT", served.user(APPID, "o-put"), json=put_body | {"access_token": " bad token"})
    call("GET", served.user(APPID, "o-put"))
    call("GET", served.user(APPID, "o-put", "/avatar"))
    call("GET", "/v1/reauth")
    call("GET", "/v1/unionids/u1")
    call("DELETE", served.user(APPID, "o-put"))
    call("GET", "/openapi.json", key=None)
    code, log = stop(served.proc)
    assert code == 0

    secrets |= {a for a, _ in sim.current_tokens().values()}
    secrets |= {r for _, r in sim.current_tokens().values()}
    assert handed_out  # the token endpoint did answer tokens
    printed = "\n".join([log, *answers])
    assert "api.request" in printed
    leaked = sorted(s for s in secrets if s in printed)
    where = [line[:300] for line in printed.splitlines() if any(s in line for s in leaked)]
    assert leaked == [], where
