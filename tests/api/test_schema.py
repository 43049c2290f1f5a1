"""``/openapi.json`` describes the API exactly: a valid OpenAPI 3.1 document listing every route
the server has and nothing else, and every answer of a running ``keeper serve`` to requests
schemathesis derives from it (valid and invalid ones, undocumented methods, missing keys)
matches it — status, content type, body, headers — with no 5xx but the documented 503.

The run is schemathesis's engine (the CLI's phases: coverage, then fuzzing), not its pytest
plugin: the plugin's fixture-fed schema needs a pytest internal (``Node._nodeid``) that pytest
9.2 no longer has. Generation is seeded and derandomized and learns nothing from answers, and
the hook that aims requests at seeded users chooses from what was drawn: every run sends the
same requests in the same order (~500 on each database, about 10 s).
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections import Counter
from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.engine import events

from keeper.api.app import ROUTES
from keeper.api.openapi import document
from keeper.clock import utcnow
from keeper.config import build_config
from keeper.wechat.simulator import Simulator
from tests.api.server import Served
from tests.conftest import APPID

#: Users the database holds before the run: two logged in through the API (one unionid), one
#: upserted. Valid requests for APPID's users are pointed at them two times in three.
LOGINS = ("o-seed-login-1", "o-seed-login-2")
UPSERTED = "o-seed-put"
SEEDED = (*LOGINS, UPSERTED)
UNIONID = "u-seed-1"
#: Examples per operation in the fuzzing phase; the coverage phase adds its own cases.
MAX_EXAMPLES = 30
#: What each operation must have answered at least once, so a run that never reached a real
#: user (and so never checked those answers against the document) fails.
MUST_ANSWER = {
    "POST /v1/grants": {201, 400},
    "PUT /v1/apps/{appid}/users/{openid}": {200, 400},
    "DELETE /v1/apps/{appid}/users/{openid}": {204, 404},
    "GET /v1/apps/{appid}/users/{openid}": {200, 404},
    "GET /v1/apps/{appid}/users/{openid}/token": {200, 404},
    # 304 is not required: whether the run sends a matching If-None-Match depends on the
    # examples drawn (a fresh clone drew none); test_endpoints checks the 304 itself.
    "GET /v1/apps/{appid}/users/{openid}/avatar": {200, 404},
    "GET /v1/reauth": {200, 400},
    "GET /v1/unionids/{unionid}": {200},
}
#: Refusals of requests the schemas allow, for reasons the document states in words: WeChat
#: refused the code, a time outside the window, a body appid or openid other than the path's.
#: (error, field, words in the detail)
STATED_REFUSALS = (
    ("code_rejected", None, ""),
    ("bad_request", "access_expires_at", "out of range"),
    ("bad_request", "refresh_issued_at", "out of range"),
    ("bad_request", "appid", "differs from the path"),
    ("bad_request", "openid", "differs from the path"),
)


def test_the_document_is_openapi_3_1_and_lists_exactly_the_routes() -> None:
    config = build_config({"apps": [{"appid": APPID, "secret_env": "S"}]}, env={"S": "s"},
                          source="test.toml")
    doc: dict[str, Any] = json.loads(document(config, utcnow()))
    assert doc["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    # HEAD is Starlette's own for every GET route (RFC 9110), not an operation of its own.
    served = {(r.path, m) for r in ROUTES for m in r.methods or () if m != "HEAD"}
    assert documented == served


def seed(served: Served, sim: Simulator) -> dict[str, str]:
    """Users to find; the ETags of their avatars, by openid."""
    for openid in LOGINS:
        code = sim.issue_code(appid=APPID, openid=openid, unionid=UNIONID,
                              scope="snsapi_userinfo")
        got = served.call("POST", "/v1/grants", json={"appid": APPID, "code": code})
        assert got.status_code == 201, got.text
    got = served.call("PUT", served.user(APPID, UPSERTED), json=valid_times() | {
        "access_token": "seed-access", "refresh_token": "seed-refresh", "scope": "snsapi_base"})
    assert got.status_code == 201, got.text
    # A sweep reads the logins' profiles and keeps their avatars: the avatar route then has
    # images to answer with, and ETags to match.
    ran = served.keeper.run("sweep", "--json")
    assert ran.code == 0, ran.err
    etags = {}
    for openid in LOGINS:
        got = served.call("GET", served.user(APPID, openid, "/avatar"))
        assert got.status_code == 200, got.text
        etags[openid] = got.headers["ETag"]
    return etags


def valid_times() -> dict[str, int]:
    now = int(time.time())
    return {"access_expires_at": now + 7200, "refresh_issued_at": now - 86400}


def aimer(sim: Simulator, etags: dict[str, str]) -> Any:
    """A ``map_case`` hook that points two valid requests in three at something real: a seeded
    user or unionid, a login code the simulator issued, times inside the window, the ETag of
    the avatar asked for. Random ids, codes and times would almost never name one, and the
    answers to them would go unchecked. The choice is taken from what was drawn, so the run
    stays deterministic."""

    def aim(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return case
        body = case.body if isinstance(case.body, dict) else None  # not NotSet's address
        drawn = zlib.crc32(repr((case.path_parameters, body)).encode())
        if drawn % 3 == 0:
            return case
        pick = drawn // 3
        # New containers, never edits: cases of one operation may share what was drawn.
        params = dict(case.path_parameters or {})
        if params.get("appid", APPID) == APPID:
            if "openid" in params:
                params["openid"] = SEEDED[pick % len(SEEDED)]
            if "unionid" in params:
                params["unionid"] = UNIONID
            if case.path.endswith("/avatar") and params.get("openid") in etags \
                    and (pick // 5) % 2:
                case.headers = {**(case.headers or {}),
                                "If-None-Match": etags[params["openid"]]}
        case.path_parameters = params
        if case.method == "POST" and isinstance(body, dict) and body.get("appid") == APPID:
            case.body = {**body, "code": sim.issue_code(
                appid=APPID, openid=f"o-login-{pick % 5}", unionid=UNIONID)}
        if case.method == "PUT" and isinstance(body, dict):
            case.body = {**body, **valid_times(),
                         **{k: params[k] for k in ("appid", "openid") if k in body}}
        return case

    return aim


@schemathesis.check
def refusals_of_valid_data_are_stated(ctx: schemathesis.CheckContext,
                                      response: schemathesis.Response,
                                      case: schemathesis.Case) -> bool | None:
    """A valid request is answered 400 only for a reason the document states (the built-in
    positive_data_acceptance is told 400 is fine; this check says when)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    error = response.json()
    for code, field, words in STATED_REFUSALS:
        if (error.get("error"), error.get("field")) == (code, field) \
                and words in error.get("detail", ""):
            return None
    raise AssertionError(f"a valid request was refused: {error}")


def load(served: Served, sim: Simulator, etags: dict[str, str]) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict({
        "seed": 20260101,
        "base-url": served.base,
        "headers": {"Authorization": f"Bearer {served.keys['all']}"},
        "request-timeout": 10,
        "cache": {"enabled": False},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        # Nothing learnt from answers (tokens and times differ run to run) steers generation:
        # every run sends the same requests.
        "phases": {
            "examples": {"extra-data-sources": {"responses": False}},
            "coverage": {"extra-data-sources": {"responses": False}},
            "fuzzing": {"extra-data-sources": {"responses": False},
                        "error-feedback": {"enabled": False}},
        },
        "checks": {
            # 503 is the document's "try again after Retry-After" (WeChat, the database).
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
            "positive_data_acceptance": {"expected-statuses": [
                "2xx", "3xx", "400", "401", "403", "404", "409", "429", "503"]},
        },
    })
    schema = schemathesis.openapi.from_url(served.base + "/openapi.json", config=config)
    schema.validate()
    schema.hook("map_case")(aimer(sim, etags))
    return schema


def failures(event: events.EngineEvent) -> list[str]:
    """The failures an engine event reports, one text each (with a curl line to replay)."""
    if isinstance(event, events.ScenarioFinished):
        return [f"{event.recorder.label}: {check.name}: {check.failure_info.failure}\n"
                f"{check.failure_info.code_sample}"
                for checks in event.recorder.checks.values() for check in checks
                if check.failure_info is not None]
    if isinstance(event, events.NonFatalError):
        return [f"{event.label}: {event.info.format()}"]
    if isinstance(event, events.FatalError):
        return [f"schemathesis stopped: {event.exception!r}"]
    return []


def test_every_answer_matches_the_document(served: Served, sim: Simulator) -> None:
    etags = seed(served, sim)
    found: list[str] = []
    answered: dict[str, Counter[int]] = {}
    for event in schemathesis.engine.from_schema(load(served, sim, etags)).execute():
        found.extend(failures(event))
        if isinstance(event, events.ScenarioFinished):
            answered.setdefault(event.recorder.label, Counter()).update(
                i.response.status_code for i in event.recorder.interactions.values()
                if i.response is not None
                and event.recorder.label.startswith(f"{i.request.method} "))
    assert not found, "\n\n".join(found)
    for label, statuses in MUST_ANSWER.items():
        assert statuses <= set(answered.get(label, ())), (label, answered.get(label))


def test_the_document_states_the_head_cap_the_media_type_sex_and_the_time_form() -> None:
    config = build_config({"apps": [{"appid": APPID, "secret_env": "S"}]}, env={"S": "s"},
                          source="test.toml")
    doc: dict[str, Any] = json.loads(document(config, utcnow()))
    for path, ops in doc["paths"].items():
        for method, operation in ops.items():
            answers = operation["responses"]
            assert "headers_too_large" in answers["431"]["description"], (path, method)
            if "requestBody" in operation:
                assert "no" in answers["415"]["description"], (path, method)
    schemas = doc["components"]["schemas"]
    assert schemas["Profile"]["properties"]["sex"] == {
        "type": ["integer", "null"], "enum": [0, 1, 2, None],
        "description": schemas["Profile"]["properties"]["sex"]["description"]}
    pattern = re.compile(schemas["Token"]["properties"]["expires_at"]["pattern"])
    assert pattern.match("2026-11-30T08:00:00Z")
    assert not pattern.match("2026-11-30T08:00:00.105415+00:00")
