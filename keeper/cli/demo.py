"""``make demo``: the keeper's main job against its simulator, on the embedded SQLite default.

Starts the simulator, seeds a few hundred grants in every state, imports them with
``keeper import``, runs ``keeper sweep`` (the real program), and prints what happened.
The main case is a website's users, who log in with WeChat's QR code (scope ``snsapi_login``):
their tokens are kept alive and their profiles read and avatars kept, as WeChat answers today
(sex 0 and no region for most; a few with the odd bytes other clients have met).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from keeper.wechat.simulator import Simulator

APPID = "wxdemo00000000001"
SECRET = "demo-secret-kept-in-the-environment"  # noqa: S105 - the simulator's
DAY = 86400.0
# (label, how many, access token expires in (s), refresh token issued days ago, scope, sim state)
KINDS: list[tuple[str, int, float, float, str, str]] = [
    ("website login", 120, 3600, 5, "snsapi_login", "ok"),
    ("website login, on refresh day", 40, 3600, 29.2, "snsapi_login", "ok"),
    ("website login, access expired", 80, -600, 12, "snsapi_login", "ok"),
    ("website login, revoked", 15, -600, 8, "snsapi_login", "revoked"),
    ("website login, refresh token expired", 15, -600, 30.5, "snsapi_login", "ok"),
    ("website login, refresh token invalid", 10, -600, 14, "snsapi_login", "invalid"),
    ("official account page, snsapi_userinfo", 20, 3600, 5, "snsapi_userinfo", "ok"),
    ("official account page, snapshot user", 10, 3600, 2, "snsapi_userinfo", "snapshot"),
    ("official account page, snsapi_base", 30, 3600, 3, "snsapi_base", "ok"),
]
# Website users whose profile comes as other clients have met it (keeper.wechat.simulator.answers).
ODD_PROFILES = ("profile_control_chars", "profile_gbk_nickname", "profile_lone_surrogate",
                "profile_nul", "profile_private_use", "profile_sex_as_string")


def _openid(label: str, i: int) -> str:
    return "o-" + label.replace(",", "").replace(" ", "-") + f"-{i:03d}"


def _grants(now: float) -> list[dict[str, Any]]:
    rng = random.Random(29)
    out = []
    for label, count, access_in, issued_ago, scope, state in KINDS:
        for i in range(count):
            openid = _openid(label, i)
            out.append({
                "appid": APPID, "openid": openid, "scope": scope, "state": state,
                "access_token": f"demo-at-{rng.getrandbits(64):016x}",
                "refresh_token": f"demo-rt-{rng.getrandbits(64):016x}",
                "access_expires_at": now + access_in,
                "refresh_issued_at": now - issued_ago * DAY,
                "unionid": None if scope == "snsapi_base" else f"u-{openid}",
            })
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    workdir = Path("var/demo")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sim = Simulator(latency_s=0.02, seed=29, failure_rates={"-1": 0.02, "timeout": 0.005},
                    timeout_sleep_s=1.0)
    sim.add_app(APPID, SECRET)
    sim.start()
    try:
        config = workdir / "keeper.toml"
        config.write_text(
            f'database_url = "sqlite:///{workdir}/keeper.db"\napi_base = "{sim.url}"\n'
            f'avatar_dir = "{workdir}/avatars"\navatar_hosts = ["127.0.0.1"]\n'
            'workers = 16\nread_timeout = 0.5\nlog_level = "warning"\n\n'
            f'[[apps]]\nappid = "{APPID}"\nsecret_env = "KEEPER_DEMO_SECRET"\n'
        )
        env = {**os.environ, "KEEPER_DEMO_SECRET": SECRET}
        keeper = [sys.executable, "-m", "keeper", "--config", str(config)]

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*keeper, *args], input=stdin, capture_output=True,
                                  text=True, env=env, check=False)

        grants = _grants(time.time())
        sim.add_grants(grants)
        odd_users = {name: _openid("website login", i) for i, name in enumerate(ODD_PROFILES)}
        for name, openid in odd_users.items():
            sim.script(openid, "userinfo", name)
        lines = "\n".join(json.dumps({k: v for k, v in g.items() if k != "state"})
                          for g in grants)
        print(f"keeper demo: simulator at {sim.url}; {len(grants)} grants:")
        for label, count, *_ in KINDS:
            print(f"  {count:4d}  {label}")
        print(f"  ({len(odd_users)} website users' profiles come with raw control characters, GBK"
              " bytes, a cut emoji, NUL, old private-use emoji, sex as a string)")
        print(f"$ keeper import  -> {run('import', '-', stdin=lines).stdout.strip()}")
        code = sim.issue_code(appid=APPID, openid="o-new-login", unionid="u-new-login")
        print(f"$ keeper grant --app {APPID} <code of a new website QR login>  -> openid "
              f"{run('grant', '--app', APPID, code).stdout.strip()}")
        again = _openid("website login", 119)
        code = sim.issue_code(appid=APPID, openid=again, unionid=f"u-{again}")
        print(f"$ keeper grant --app {APPID} <code of {again}, who logs in again>  -> openid "
              f"{run('grant', '--app', APPID, code).stdout.strip()} (WeChat killed the older"
              " refresh token; keeper holds the new one)")
        print("$ keeper sweep  (2 % of WeChat's answers are 'system busy', some time out)")
        sweep = subprocess.run([*keeper, "sweep", "--json"], stdout=subprocess.PIPE,
                               text=True, env=env, check=False)
        summary = json.loads(sweep.stdout)
        for key in ("refresh_tokens_refreshed", "access_tokens_refreshed", "profiles_fetched",
                    "avatars_saved", "reauth_recorded", "transient_failures", "grants_worked",
                    "seconds"):
            print(f"  {key:26} {summary.get(key, 0)}")
        print("$ keeper sweep  (again: the transient failures are retried after their backoff;"
              " nothing else is due)")
        again = json.loads(run("sweep", "--json").stdout)
        print(f"  grants_worked {again.get('grants_worked', 0)}, "
              f"transient_failures {again['transient_failures']}")
        status = json.loads(run("status", "--json").stdout)
        print("$ keeper status")
        for key in ("grants", "active", "reauth_required", "refresh_due_24h", "access_expired",
                    "retrying", "avatars_saved"):
            print(f"  {key:18} {status[key]}")
        reauth = [json.loads(line) for line in run("reauth", "--json").stdout.splitlines()]
        by_reason: dict[str, list[str]] = {}
        for r in reauth:
            by_reason.setdefault(r["reason"], []).append(r["openid"])
        print(f"$ keeper reauth  -> {len(reauth)} users must (soon) log in again:")
        for reason, openids in sorted(by_reason.items()):
            print(f"  {len(openids):4d}  {reason:24} e.g. {openids[0]}")
        expired = _openid("website login, access expired", 0)
        token = run("token", "--app", APPID, expired)
        print(f"$ keeper token --app {APPID} {expired}  -> exit {token.returncode},"
              f" a token of {len(token.stdout.strip())} characters")
        print("$ keeper profile --json  (website users: as WeChat answers today, and odd ones)")
        for openid in (_openid("website login", 10), *odd_users.values()):
            shown = run("profile", "--app", APPID, openid, "--json")
            try:
                p = json.loads(shown.stdout)
            except ValueError:
                print(f"  {openid}: exit {shown.returncode}")
                continue
            print(f"  {openid}: nickname {p.get('nickname')!r}, sex {p.get('sex')!r}, "
                  f"province {p.get('province')!r}, avatar "
                  f"{'kept' if p.get('avatar_path') else 'none'}")
        endpoints = sim.stats()["endpoints"]
        assert isinstance(endpoints, dict)
        print("WeChat (the simulator) saw: " + ", ".join(
            f"{name} {e['calls']}" for name, e in endpoints.items()))
        print(f"demo finished in {time.monotonic() - started:.1f} s; the database is "
              f"{workdir}/keeper.db (try: .venv/bin/keeper --config {config} status)")
        # Not a demo of anything if keeper did not do its job.
        ok = (summary["refresh_tokens_refreshed"] > 0 and summary["access_tokens_refreshed"] > 0
              and len(reauth) > 0 and token.returncode == 0)
        return 0 if ok else 1
    finally:
        sim.stop()


if __name__ == "__main__":
    raise SystemExit(main())
