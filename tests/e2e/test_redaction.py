"""No token, code or AppSecret in anything keeper prints, whatever goes wrong.

Runs every command — with failures forced, bad input, debug logging — and searches all that
was printed for every token, code and secret string the test used or keeper stored.
"""

from __future__ import annotations

import json
import signal
import sqlite3

from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET, Keeper, wait_for
from tests.e2e.helpers import endpoint, make_grant, seed
from tests.events.receiver import Receiver


def test_no_secret_reaches_any_output(sim: Simulator, keeper: Keeper) -> None:
    printed: list[str] = []

    def run(*args: str, stdin: str | None = None, keep_stdout: bool = True) -> None:
        ran = keeper.run(*args, stdin=stdin)
        printed.append(ran.err)
        if keep_stdout:
            printed.append(ran.out)

    # A webhook that refuses every other request, its secret from the environment and its url
    # carrying a secret of the receiver's in the query string: neither may be printed, and
    # no event body may hold a token.
    receiver = Receiver(answer=lambda n, _: 500 if n % 2 else 200)
    hook_secret, query_secret = "whsec-redaction-4e1f0a9b2c", "receiver-query-token-77d1"
    keeper.env["KEEPER_HOOK_SECRET"] = hook_secret
    keeper.write_config(keeper.config.read_text().replace("[[apps]]", f"""[[webhooks]]
url = "{receiver.url}?token={query_secret}"
secret_env = "KEEPER_HOOK_SECRET"

[[apps]]"""))
    sim.configure(rotate_refresh_tokens=True)
    grants = [make_grant(f"o{i}", access_in_s=-60, issued_days_ago=29.5 if i % 2 else 2)
              for i in range(12)] + [make_grant(f"revoked{i}", access_in_s=-60, state="revoked")
                                     for i in ("", "2")]
    seed(sim, keeper, grants)
    run("events", "deliver")  # the webhook is known from now on: it gets the events below
    secrets = {SECRET, hook_secret, query_secret} | {g["access_token"] for g in grants}
    secrets |= {g["refresh_token"] for g in grants}
    for answer in ("timeout", "502", "truncated", "html", -1, 45011, 40125, 41002, 99999):
        sim.force("refresh", answer)  # type: ignore[arg-type]
    sim.force("userinfo", 42001)
    sim.force("userinfo", "truncated")
    run("sweep", "--json")
    run("sweep")

    good, used = sim.issue_code(appid=APPID, openid="new"), sim.issue_code(appid=APPID, openid="x")
    secrets |= {good, used, "made-up-code-value"}
    run("grant", "--app", APPID, good)
    run("grant", "--app", APPID, good)
    sim.force("code", -1)
    run("grant", "--app", APPID, used)
    run("grant", "--app", APPID, "made-up-code-value")
    leaked_line = json.dumps({"appid": APPID, "access_token": "line-token-secret-1",
                              "refresh_token": "line-token-secret-2"})
    secrets |= {"line-token-secret-1", "line-token-secret-2", "line-token-secret-3"}
    run("import", "-", stdin=f'{leaked_line}\n{{"refresh_token": "line-token-secret-3"\n')
    run("token", "--app", APPID, "o0", keep_stdout=False)
    run("token", "--app", APPID, "revoked")
    run("check", "--app", APPID, "o1", "--json")
    run("profile", "--app", APPID, "o1", "--json")
    run("status", "--json")
    run("reauth", "--json")
    run("db", "upgrade")

    service = keeper.start("run")
    wait_for(lambda: endpoint(sim, "refresh")["calls"] > 0)
    # One delivered, one refused (a revoked user the forced answers hit backs off first).
    receiver.wait_for(lambda r: len(r.seen) >= 2, timeout=60)
    service.send_signal(signal.SIGTERM)
    out, err = service.communicate(timeout=15)
    printed += [out, err]
    run("events", "--json")
    run("events", "deliver")
    receiver.stop()
    assert "event.delivered" in err and "event.retry" in err

    db = sqlite3.connect(keeper.workdir / "keeper.db")
    for access, refresh in db.execute("select access_token, refresh_token from grants"):
        secrets |= {access, refresh}
    db.close()
    secrets |= {line.strip() for line in (keeper.workdir / "keeper.key").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert len(secrets) > 30
    text = "\n".join(printed)
    assert "sweep.finished" in text and "import.bad_line" in text
    leaks = sorted(s for s in secrets if s in text)
    assert leaks == []
    sent = b"".join(seen.body for seen in receiver.seen).decode()
    assert sorted(s for s in secrets if s in sent) == []  # an event never carries a token
