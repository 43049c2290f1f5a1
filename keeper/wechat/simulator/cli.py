"""``keeper simulate``: the simulator in its own process, set up from the command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
import threading
from types import FrameType

from keeper.wechat.simulator.answers import ODD_ANSWERS, describe
from keeper.wechat.simulator.records import DEFAULT_QUOTAS, ENDPOINTS, check_endpoint, parse_quota
from keeper.wechat.simulator.server import Simulator


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The options of ``keeper simulate`` (apart, so the documentation's list can be checked
    against them)."""
    parser = argparse.ArgumentParser(prog="keeper simulate",
                                     description="Run the WeChat OAuth2 simulator (a test tool).")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rotate", action="store_true", help="new refresh token on each refresh")
    parser.add_argument("--refresh-token-days", type=float, default=30.0)
    parser.add_argument("--quota", action="append", default=[], metavar="ENDPOINT=COUNT/PERIOD")
    parser.add_argument("--fail", action="append", default=[], metavar="KIND=RATE",
                        help="KIND: -1 (write --fail=-1=RATE), 502, truncated, timeout, html")
    parser.add_argument("--app", action="append", default=[], metavar="APPID=SECRET")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--avatar-change-every", type=int, default=0, metavar="N",
                        help="a user changes avatar before every Nth profile read (0: never)")
    parser.add_argument("--legacy-profiles", action="store_true",
                        help="answer the full pre-2021 profile (sex, province, city, country)")
    parser.add_argument("--script", action="append", default=[],
                        metavar="OPENID:ENDPOINT:ANSWER[:COUNT]",
                        help="serve that user an odd answer (a name from --list-answers), an "
                             "errcode or a failure kind on ENDPOINT, COUNT times (default 1)")
    parser.add_argument("--list-answers", action="store_true",
                        help="print the corpus of odd answers as JSON lines and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``keeper simulate``: print ``{"url": ...}`` on one line, serve until SIGTERM/SIGINT."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_answers:
        for entry in ODD_ANSWERS:
            print(json.dumps(describe(entry), ensure_ascii=False))
        return 0
    if not _is_loopback(args.host):
        parser.error(f"--host {args.host} is not a loopback address: the simulator is a test tool")
    try:
        pairs = {option: [_pair(value) for value in getattr(args, option)]
                 for option in ("quota", "fail", "app")}
        quotas = {**DEFAULT_QUOTAS, **{check_endpoint(endpoint): parse_quota(text)
                                       for endpoint, text in pairs["quota"]}}
        sim = Simulator(host=args.host, port=args.port, latency_s=args.latency_ms / 1000.0,
                        rotate_refresh_tokens=args.rotate,
                        refresh_token_days=args.refresh_token_days, quotas=quotas,
                        failure_rates={kind: float(rate) for kind, rate in pairs["fail"]},
                        seed=args.seed, avatar_change_every=args.avatar_change_every,
                        legacy_profiles=args.legacy_profiles)
        for text in args.script:
            openid, endpoint, answer, count = _script_option(text)
            sim.script(openid, endpoint, answer, count=count)
    except ValueError as exc:
        parser.error(str(exc))
    for appid, secret in pairs["app"]:
        sim.add_app(appid, secret)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only a flag: the main thread does the shutting down

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        print(json.dumps({"url": sim.url}), flush=True)
        stop.wait()
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _script_option(value: str) -> tuple[str, str, str, int]:
    """``OPENID:ENDPOINT:ANSWER[:COUNT]``, split from the right (an openid may hold colons;
    an answer such as ``-1`` or ``errcode_40030`` holds none)."""
    parts = value.rsplit(":", 3)
    if len(parts) == 4 and parts[3].isdigit() and parts[1] in ENDPOINTS:
        openid, endpoint, answer, count = parts[0], parts[1], parts[2], int(parts[3])
    else:
        parts = value.rsplit(":", 2)
        if len(parts) != 3 or parts[1] not in ENDPOINTS or not parts[0] or not parts[2]:
            raise ValueError(f"--script {value!r}: expected OPENID:ENDPOINT:ANSWER[:COUNT] with "
                             f"ENDPOINT one of {ENDPOINTS}")
        openid, endpoint, answer, count = parts[0], parts[1], parts[2], 1
    return openid, endpoint, answer, count


def _pair(value: str) -> tuple[str, str]:
    name, _, rest = value.partition("=")
    if not name or not rest:
        raise ValueError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


if __name__ == "__main__":
    sys.exit(main())
