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


def test_no_secret_reaches_any_output(sim: Simulator, keeper: Keeper) -> None:
    printed: list[str] = []

    def run(*args: str, stdin: str | None = None, keep_stdout: bool = True) -> None:
        ran = keeper.run(*args, stdin=stdin)
        printed.append(ran.err)
        if keep_stdout:
            printed.append(ran.out)

    sim.configure(rotate_refresh_tokens=True)
    grants = [make_grant(f"o{i}", access_in_s=-60, issued_days_ago=29.5 if i % 2 else 2)
              for i in range(12)] + [make_grant("revoked", access_in_s=-60, state="revoked")]
    seed(sim, keeper, grants)
    secrets = {SECRET} | {g["access_token"] for g in grants} | {g["refresh_token"] for g in grants}
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
    service.send_signal(signal.SIGTERM)
    out, err = service.communicate(timeout=15)
    printed += [out, err]

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
