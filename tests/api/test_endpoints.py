"""Every endpoint of the application API end to end: a real ``keeper serve`` over HTTP, the
WeChat simulator behind it, on SQLite and on PostgreSQL (docs/reference/http-api.md)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from keeper.store import db
from keeper.wechat.simulator import Simulator
from tests.api.server import Served, serving, stop
from tests.conftest import APPID, Keeper, wait_for
from tests.e2e.helpers import endpoint, make_grant


def login(served: Served, sim: Simulator, openid: str, **kw: object) -> dict[str, object]:
    code = sim.issue_code(appid=APPID, openid=openid, **kw)  # type: ignore[arg-type]
    r = served.call("POST", "/v1/grants", json={"appid": APPID, "code": code})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_login_becomes_a_grant_whose_token_profile_and_avatar_are_served(
    served: Served, sim: Simulator
) -> None:
    answer = login(served, sim, "o-web", unionid="u-web")
    assert answer == {"appid": APPID, "openid": "o-web", "unionid": "u-web",
                      "scope": "snsapi_login", "is_snapshotuser": False}

    r = served.call("GET", served.user(APPID, "o-web", "/token"))
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["access_token"] == sim.current_tokens()["o-web"][0]
    assert (body["openid"], body["scope"]) == ("o-web", "snsapi_login")
    assert endpoint(sim, "refresh")["calls"] == 0  # fresh: no refresh

    # The sweep reads the profile and keeps the avatar; the API then serves both.
    assert served.keeper.run("sweep").code == 0
    doc = served.call("GET", served.user(APPID, "o-web")).json()
    assert doc["nickname"] and doc["avatar_sha256"] and doc["state"] == "active"
    assert "access_token" not in json.dumps(doc) and body["access_token"] not in json.dumps(doc)
    r = served.call("GET", served.user(APPID, "o-web", "/avatar"))
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("image/")
    assert hashlib.sha256(r.content).hexdigest() == doc["avatar_sha256"]
    assert r.headers["ETag"] == f'"{doc["avatar_sha256"]}"'
    again = served.call("GET", served.user(APPID, "o-web", "/avatar"),
                        headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert served.call("GET", served.user(APPID, "o-web", "/avatar"),
                       headers={"If-None-Match": '"other"'}).status_code == 200

    r = served.call("GET", "/v1/unionids/u-web")
    assert r.json() == {"grants": [{"appid": APPID, "openid": "o-web", "state": "active"}]}
    assert served.call("GET", "/v1/unionids/u-nobody").json() == {"grants": []}


def test_codes_wechat_refuses_or_cannot_take_are_answered_and_never_retried(
    served: Served, sim: Simulator
) -> None:
    code = sim.issue_code(appid=APPID, openid="o-code")
    assert served.call("POST", "/v1/grants", json={"appid": APPID, "code": code}).status_code \
        == 201
    used = served.call("POST", "/v1/grants", json={"appid": APPID, "code": code})
    assert used.status_code == 400
    assert used.json()["error"] == "code_rejected" and used.json()["errcode"] == 40163
    made_up = served.call("POST", "/v1/grants", json={"appid": APPID, "code": "not-a-code"})
    assert (made_up.status_code, made_up.json()["error"]) == (400, "code_rejected")
    unknown = served.call("POST", "/v1/grants", json={"appid": "wxunknown", "code": "c"})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_app")

    before = endpoint(sim, "code")["calls"]
    sim.force("code", "timeout")
    down = served.call("POST", "/v1/grants",
                       json={"appid": APPID, "code": sim.issue_code(appid=APPID, openid="o-2")})
    assert down.status_code == 503 and down.json()["error"] == "wechat_unavailable"
    assert int(down.headers["Retry-After"]) >= 1
    assert endpoint(sim, "code")["calls"] == before + 1  # a code is single-use: one call
    sim.force("code", 45011)
    quota = served.call("POST", "/v1/grants",
                        json={"appid": APPID, "code": sim.issue_code(appid=APPID, openid="o-3")})
    assert quota.status_code == 503 and int(quota.headers["Retry-After"]) >= 1


def test_an_app_without_its_appsecret_is_a_server_configuration_error(
    keeper: Keeper, sim: Simulator, tmp_path: Path,
) -> None:
    """Given `keeper serve` without one app's AppSecret (its secret_env unset) and another app
    whose AppSecret WeChat refuses, a login for the first is answered 500 `app_secret_missing`,
    saying which app and where its secret is read from, without Retry-After and without
    asking WeChat, and `keeper serve` said so once, at start; a login for the second is still
    503 `app_rejected` with Retry-After; the first app's other endpoints work; `keeper grant`
    reports the missing secret in the same words."""
    unset = "wx00000000000000b2"
    wrong = "not-the-apps-secret-0123456789"
    keeper.env["KEEPER_TEST_SECRET"] = wrong  # APPID: WeChat answers 40125
    keeper.env.pop("KEEPER_B_SECRET", None)
    extra = f'[[apps]]\nappid = "{unset}"\nsecret_env = "KEEPER_B_SECRET"\n'
    with serving(keeper, db_url=f"sqlite:///{tmp_path / 'keeper.db'}", api_base=sim.url,
                 extra=extra) as served:
        asked = endpoint(sim, "code")["calls"]
        answers = [served.call("POST", "/v1/grants", json={
            "appid": unset, "code": sim.issue_code(appid=unset, openid=f"o-{i}")})
            for i in range(2)]
        for r in answers:
            assert r.status_code == 500 and r.json()["error"] == "app_secret_missing", r.text
            assert "Retry-After" not in r.headers
        detail = answers[0].json()["detail"]
        assert unset in detail and "secret_env" in detail and "KEEPER_B_SECRET" in detail
        assert endpoint(sim, "code")["calls"] == asked  # WeChat was not asked
        refused = served.call("POST", "/v1/grants", json={
            "appid": APPID, "code": sim.issue_code(appid=APPID, openid="o-wrong")})
        assert refused.status_code == 503 and refused.json()["error"] == "app_rejected"
        assert refused.headers["Retry-After"] == "60"
        now = int(time.time())
        put = served.call("PUT", served.user(unset, "o-put"), json={
            "access_token": "AT-o-put-e2e-secret", "refresh_token": "RT-o-put-e2e-secret",
            "scope": "snsapi_base", "access_expires_at": now + 7200,
            "refresh_issued_at": now - 86400})
        assert put.status_code == 201, put.text
        got = served.call("GET", served.user(unset, "o-put", "/token"))
        assert got.status_code == 200 and got.json()["access_token"] == "AT-o-put-e2e-secret"
        doc = served.call("GET", "/openapi.json").json()
        documented = doc["paths"]["/v1/grants"]["post"]["responses"]["500"]["description"]
        assert "app_secret_missing" in documented
        cli = keeper.run("grant", "--app", unset, sim.issue_code(appid=unset, openid="o-cli"))
        assert cli.code == 2 and [e["error"] for e in cli.logs()
                                  if e["event"] == "command.refused"] == [detail], cli.err
        _, log = stop(served.proc)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    missing = [e for e in lines if e["event"] == "app.secret_missing"]
    assert len(missing) == 1, missing
    assert missing[0]["appid"] == unset and missing[0]["level"] == "warning"
    assert missing[0]["secret_source"] == "env KEEPER_B_SECRET"
    assert not [e for e in lines if e["event"] == "api.app_rejected" and unset in e["error"]]
    assert wrong not in log + detail + refused.text + cli.err


def test_put_upserts_a_grant_field_by_field_and_clears_its_reauth_record(
    served: Served, sim: Simulator
) -> None:
    g = make_grant("o-put", access_in_s=-60, state="revoked")
    sim.add_grants([g])
    body = {k: g[k] for k in ("access_token", "refresh_token", "scope", "access_expires_at",
                              "refresh_issued_at")}
    path = served.user(APPID, "o-put")
    assert served.call("PUT", path, json=body).status_code == 201
    assert served.call("PUT", path, json=body).status_code == 200

    # WeChat says the grant is dead: the token request answers 409 and the record is kept.
    r = served.call("GET", path + "/token")
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "reauth_required"
    assert r.json()["reason"] == "authorization_revoked" and r.json()["since"]
    assert served.call("GET", path + "/token").status_code == 409  # no second call to WeChat
    feed = served.call("GET", "/v1/reauth").json()
    assert [u["openid"] for u in feed["users"]] == ["o-put"]
    assert feed["users"][0]["reason"] == "authorization_revoked"

    # The application got a new grant itself (the user logged in again): PUT clears it.
    fresh = make_grant("o-put", access_in_s=3600)
    sim.add_grants([fresh])
    new_body = {k: fresh[k] for k in body} | {"unionid": "u-put", "openid": "o-put"}
    r = served.call("PUT", path, json=new_body)
    assert r.status_code == 200 and r.json()["state"] == "active"
    assert r.json()["unionid"] == "u-put"
    assert served.call("GET", path + "/token").json()["access_token"] == fresh["access_token"]
    assert served.call("GET", "/v1/reauth", params={"after": feed["next"]}).json()["users"] \
        == []


def test_bad_requests_name_the_field_and_change_nothing(served: Served, sim: Simulator) -> None:
    path = served.user(APPID, "o-bad")
    good = {k: v for k, v in make_grant("o-bad").items()
            if k in ("access_token", "refresh_token", "scope", "access_expires_at",
                     "refresh_issued_at")}
    cases = [
        (good | {"access_expires_at": "yesterday"}, 400, "access_expires_at"),
        (good | {"scope": "SNSAPI LOGIN"}, 400, "scope"),
        (good | {"access_token": "x" * 600}, 400, "access_token"),
        (good | {"access_token": 5}, 400, "access_token"),
        ({k: v for k, v in good.items() if k != "refresh_token"}, 400, "refresh_token"),
        (good | {"appid": "wxother"}, 400, "appid"),
        (good | {"openid": "o-else"}, 400, "openid"),
        (good | {"state": "active"}, 400, "state"),
    ]
    for body, status, field in cases:
        r = served.call("PUT", path, json=body)
        assert (r.status_code, r.json().get("field")) == (status, field), (field, r.text)
        assert "x" * 100 not in r.text
    raw = [
        (b"not json", 400), (b"[1, 2]", 400), (b'{"a": NaN}', 400), (b"\xff\xfe", 400),
        (b"[" * 100_000, 413), (b'{"pad": "' + b"x" * 70_000 + b'"}', 413),
    ]
    for data, status in raw:
        r = served.call("PUT", path, data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (data[:20], r.text)
        assert r.json()["error"] in ("bad_request", "payload_too_large")
    r = served.call("PUT", path, data=json.dumps(good), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = served.call("POST", "/v1/grants", json={"appid": APPID, "code": "a b"})
    assert (r.status_code, r.json()["field"]) == (400, "code")
    r = served.call("POST", "/v1/grants", json={"appid": APPID})
    assert (r.status_code, r.json()["field"]) == (400, "code")
    r = served.call("POST", "/v1/grants", json={"appid": APPID, "code": "c", "extra": 1})
    assert (r.status_code, r.json()["field"]) == (400, "extra")
    for query in ("min_valid=-1", "min_valid=7200", "min_valid=abc", "min_valid=1e3"):
        r = served.call("GET", f"{path}/token?{query}")
        assert (r.status_code, r.json()["field"]) == (400, "min_valid"), query
    for query in ("after=-1", "limit=0", "limit=1001", "after=x"):
        assert served.call("GET", f"/v1/reauth?{query}").status_code == 400, query
    long_id = "o" * 129
    r = served.call("GET", served.user(APPID, long_id))
    assert (r.status_code, r.json()["field"]) == (400, "openid")
    assert served.call("GET", served.user("wx-nope", "o1")).json()["error"] == "unknown_app"
    r = served.call("PATCH", path)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert served.call("GET", "/v2/nothing").json()["error"] == "not_found"
    # Nothing of it was stored.
    assert served.call("GET", path).status_code == 404
    assert served.proc.poll() is None


def test_delete_forgets_the_user_and_their_avatar_file_once_unused(
    served: Served, sim: Simulator
) -> None:
    for openid in ("o-a", "o-b", "o-c"):
        login(served, sim, openid)
    sim.set_avatar("o-a", "shared")
    sim.set_avatar("o-b", "shared")  # the same picture: one file for both
    assert served.keeper.run("sweep").code == 0
    docs = {o: served.call("GET", served.user(APPID, o)).json() for o in ("o-a", "o-b", "o-c")}
    assert docs["o-a"]["avatar_path"] == docs["o-b"]["avatar_path"] != docs["o-c"]["avatar_path"]
    avatars = served.keeper.workdir / "var" / "avatars"
    shared, own = avatars / docs["o-a"]["avatar_path"], avatars / docs["o-c"]["avatar_path"]
    assert shared.is_file() and own.is_file()

    assert served.call("DELETE", served.user(APPID, "o-a")).status_code == 204
    assert shared.is_file()  # o-b still uses it
    assert served.call("DELETE", served.user(APPID, "o-b")).status_code == 204
    assert not shared.exists()
    assert served.call("DELETE", served.user(APPID, "o-c"), key="grants").status_code == 204
    assert not own.exists()
    for openid in ("o-a", "o-b", "o-c"):
        for tail in ("", "/token", "/avatar"):
            r = served.call("GET", served.user(APPID, openid, tail))
            assert (r.status_code, r.json()["error"]) == (404, "no_grant")
        assert served.call("DELETE", served.user(APPID, openid)).status_code == 404
    assert served.keeper.run("status", "--json").out.count('"grants": 0') == 1


def test_keys_and_scopes(served: Served, sim: Simulator) -> None:
    login(served, sim, "o-k")
    user = served.user(APPID, "o-k")
    assert served.call("GET", "/healthz", key=None).json() == {"status": "ok"}
    assert served.call("GET", "/openapi.json", key=None).json()["openapi"].startswith("3.")
    r = served.call("GET", user + "/token", key=None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer", "Bearer wrong-key", "Basic abc", "Bearer " + "k" * 5000):
        assert served.session.get(served.base + user, headers={"Authorization": header},
                                  timeout=10).status_code == 401
    allowed = {
        ("GET", user + "/token"): "tokens",
        ("GET", user): "read",
        ("GET", user + "/avatar"): "read",
        ("GET", "/v1/reauth"): "read",
        ("GET", "/v1/unionids/u1"): "read",
        ("DELETE", served.user(APPID, "o-nobody")): "grants",
        ("POST", "/v1/grants"): "grants",
    }
    for (method, path), scope in allowed.items():
        for key in ("tokens", "read", "grants"):
            r = served.call(method, path, key=key, json={} if method == "POST" else None)
            if key == scope:
                assert r.status_code not in (401, 403), (method, path, key, r.text)
            else:
                assert (r.status_code, r.json()["error"]) == (403, "forbidden"), (path, key)

    # A key is revoked by removing its line: refused within a second or two, no restart.
    keys_file = served.keeper.workdir / "api-keys"
    lines = keys_file.read_text().splitlines()
    keys_file.write_text("\n".join(x for x in lines if not x.startswith("read ")) + "\n")
    wait_for(lambda: served.call("GET", user, key="read").status_code == 401, timeout=10)
    # A keys file that turns bad keeps the keys read before (and says so in the log).
    keys_file.write_text("this is not a keys line\n")
    time.sleep(1.2)  # the file is looked at again after a second; nothing else to wait on
    assert served.call("GET", user, key="all").status_code == 200


def test_a_body_without_content_type_is_refused_and_never_reaches_wechat(
    served: Served, sim: Simulator
) -> None:
    code = sim.issue_code(appid=APPID, openid="o-ctype")
    login_body = json.dumps({"appid": APPID, "code": code}).encode()
    r = served.call("POST", "/v1/grants", data=login_body)
    assert "Content-Type" not in r.request.headers  # bytes: requests names no type
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"
    assert endpoint(sim, "code")["calls"] == 0  # nothing reached WeChat

    path = served.user(APPID, "o-ctype-put")
    g = make_grant("o-ctype-put")
    grant_body = json.dumps({k: g[k] for k in ("access_token", "refresh_token", "scope",
                                                "access_expires_at", "refresh_issued_at")})
    r = served.call("PUT", path, data=grant_body.encode())
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"
    assert served.call("GET", path).status_code == 404  # nothing stored

    # With the header, the same code (never spent) and the same grant are taken.
    typed = {"Content-Type": "application/json; charset=utf-8"}
    assert served.call("POST", "/v1/grants", data=login_body, headers=typed).status_code == 201
    assert endpoint(sim, "code")["calls"] == 1
    assert served.call("PUT", path, data=grant_body.encode(), headers=typed).status_code == 201
    # No body at all is no JSON object: 400, whatever the headers.
    r = served.call("POST", "/v1/grants")
    assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text


def _event_bodies(db_url: str, kind: str) -> list[dict[str, Any]]:
    """The bodies of the events of ``kind`` keeper recorded, as each delivery sends them."""
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT body FROM events WHERE type = :t ORDER BY seq"),
                                {"t": kind}).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(body) for body in rows]


def test_sex_is_wechats_integer_in_the_api_the_command_and_events(
    keeper: Keeper, sim: Simulator, db_url: str
) -> None:
    with serving(keeper, db_url=db_url, api_base=sim.url,
                 extra="profile_interval = 0") as served:  # every sweep reads the profile
        login(served, sim, "o-sex")  # today's common profile: sex 0
        assert served.keeper.run("sweep").code == 0
        doc = served.call("GET", served.user(APPID, "o-sex")).json()
        assert doc["sex"] == 0 and type(doc["sex"]) is int, doc  # 0, not "0"
        shown = served.keeper.run("profile", "--app", APPID, "o-sex", "--json")
        assert shown.code == 0 and json.loads(shown.out)["sex"] == 0, shown.out
        assert '"sex": 0' in shown.out

        # WeChat has sent sex as a string: keeper still keeps and tells WeChat's integer.
        sim.script("o-sex", "userinfo", "profile_sex_as_string")
        assert served.keeper.run("sweep").code == 0
        doc = served.call("GET", served.user(APPID, "o-sex")).json()
        assert doc["sex"] == 1 and type(doc["sex"]) is int, doc
        [changed] = _event_bodies(db_url, "profile.changed")
        assert changed["data"]["changed"]["sex"] == 1, changed
        assert '"sex":1' in json.dumps(changed, separators=(",", ":"))


#: The one time format of the API, events and JSON outputs: RFC 3339, UTC, whole seconds.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_one_record_shows_one_since_in_the_api_the_event_and_the_command(
    served: Served, sim: Simulator, db_url: str
) -> None:
    g = make_grant("o-when", access_in_s=-60, state="revoked")
    sim.add_grants([g])
    path = served.user(APPID, "o-when")
    put = served.call("PUT", path, json={k: g[k] for k in (
        "access_token", "refresh_token", "scope", "access_expires_at", "refresh_issued_at")})
    assert put.status_code == 201, put.text
    refused = served.call("GET", path + "/token")  # WeChat: 42007, the grant is dead
    assert refused.status_code == 409, refused.text
    since = refused.json()["since"]
    assert TIMESTAMP.match(since), since
    [feed] = served.call("GET", "/v1/reauth").json()["users"]
    doc = served.call("GET", path).json()
    [event] = _event_bodies(db_url, "reauth.recorded")
    ran = served.keeper.run("reauth", "--json")
    [line] = [json.loads(line) for line in ran.out.splitlines()]
    assert {"409": since, "feed": feed["since"], "profile": doc["reauth"]["since"],
            "event": event["data"]["since"], "command": line["since"]} == dict.fromkeys(
        ("409", "feed", "profile", "event", "command"), since)

    # Every other time the API, events and JSON outputs show has the same form.
    times = [put.json()["access_expires_at"], put.json()["refresh_issued_at"],
             doc["access_expires_at"], doc["refresh_issued_at"], event["created_at"]]
    live = make_grant("o-live")
    sim.add_grants([live])
    live_path = served.user(APPID, "o-live")
    assert served.call("PUT", live_path, json={k: live[k] for k in (
        "access_token", "refresh_token", "scope", "access_expires_at",
        "refresh_issued_at")}).status_code == 201
    times.append(served.call("GET", live_path + "/token").json()["expires_at"])
    assert served.keeper.run("sweep").code == 0
    times += [served.call("GET", live_path).json()["fetched_at"]]
    checked = served.keeper.run("check", "--app", APPID, "o-live", "--json")
    times.append(json.loads(checked.out)["access_expires_at"])
    status = json.loads(served.keeper.run("status", "--json").out)
    times += [status["last_sweep"]["started_at"], status["last_sweep"]["finished_at"]]
    listed = [json.loads(line) for line in served.keeper.run("events", "--json").out.splitlines()]
    times += [e["created_at"] for e in listed]
    bad = [t for t in times if not (isinstance(t, str) and TIMESTAMP.match(t))]
    assert bad == [], bad


def test_the_token_route_answers_as_every_route_does(served: Served, sim: Simulator) -> None:
    """The token route is matched before Starlette's router (keeper.api.http.Edge): its
    answers, errors, methods and access log are those of any other route."""
    login(served, sim, "o-edge")
    path = served.user(APPID, "o-edge", "/token")
    r = served.call("GET", path)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    assert r.headers["Content-Type"] == "application/json"
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert set(r.json()) == {"access_token", "expires_at", "openid", "scope"}
    head = served.call("HEAD", path)
    assert (head.status_code, head.content) == (200, b"")
    for method in ("POST", "PUT", "DELETE"):
        r = served.call(method, path)
        assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed"), method
        assert r.headers["Allow"] == "GET, HEAD"
    r = served.call("GET", path, key=None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert served.call("GET", path, key="read").status_code == 403
    r = served.call("GET", served.user(APPID, "o-nobody", "/token"))
    assert (r.status_code, r.json()["error"]) == (404, "no_grant")
    assert served.call("GET", f"{path}?min_valid=x").json()["field"] == "min_valid"

    code, log = stop(served.proc)
    assert code == 0
    lines = [json.loads(x) for x in log.splitlines() if '"api.request"' in x]
    token = "/v1/apps/{appid}/users/{openid}/token"
    mine = [(x["method"], x["route"] == token, x["status"], x["key_name"], x["openid"])
            for x in lines if x["appid"] == APPID and x["openid"] in ("o-edge", "o-nobody")]
    # A 405 is Starlette's router's answer, which names no route, as for every route.
    assert mine == [("GET", True, 200, "all", "o-edge"), ("HEAD", True, 200, "all", "o-edge"),
                    ("POST", False, 405, None, "o-edge"), ("PUT", False, 405, None, "o-edge"),
                    ("DELETE", False, 405, None, "o-edge"), ("GET", True, 401, None, "o-edge"),
                    ("GET", True, 403, "read", "o-edge"), ("GET", True, 404, "all", "o-nobody"),
                    ("GET", True, 400, "all", "o-edge")]
