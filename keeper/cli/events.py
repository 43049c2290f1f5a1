"""``keeper events``: list what was recorded for webhooks and how its delivery went, make
deliveries pending again (``replay``), or deliver what is due now (``deliver``)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

from keeper.clock import utcnow
from keeper.config import Config
from keeper.config.webhooks import require_secrets
from keeper.core.timestamps import json_default
from keeper.errors import UsageError
from keeper.events.deliverer import Deliverer
from keeper.log import register_secret
from keeper.service.runtime import open_store


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json(obj: Any) -> None:
    _out(json.dumps(obj, default=json_default, ensure_ascii=False))  # times: one form


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("events", cmd_events, "events for webhooks: list them, replay, deliver now",
                 json_flag=True)
    sp.add_argument("action", nargs="?", choices=["replay", "deliver"],
                    help="replay ID|--failed: deliver again; deliver: what is due now, then "
                         "exit")
    sp.add_argument("id", nargs="?", metavar="ID", help="with replay: the event's id")
    sp.add_argument("--failed", action="store_true",
                    help="only events whose delivery failed (with replay: all of those)")


def cmd_events(config: Config, args: argparse.Namespace) -> int:
    if args.action == "deliver":
        return _deliver(config, args)
    if args.action == "replay":
        if bool(args.id) == bool(args.failed):
            raise UsageError("keeper events replay: give an event ID or --failed (one of them)")
    elif args.id:
        raise UsageError(f"keeper events: unexpected argument {args.id!r}")
    store = open_store(config)
    try:
        if args.action == "replay":
            if args.id and not store.event_exists(args.id):
                raise UsageError(f"no event {args.id!r} (unknown, or pruned)")
            n = store.replay(utcnow(), event_id=args.id)
            if args.json:
                _json({"replayed": n})
            else:
                _out(f"{n} deliveries pending again, due now")
            return 0
        for event in store.iter_events(failed_only=args.failed):
            if args.json:
                _json({k: v for k, v in event.items() if k != "seq"})
            else:
                sent = "; ".join(
                    f"{d['webhook']} {d['state']} after {d['attempts']} attempt(s)"
                    + (f", last {d['last_status'] or d['last_error']}"
                       if d["state"] != "delivered" and d["attempts"] else "")
                    for d in event["deliveries"]) or "no webhook"
                _out(f"{event['id']}  {event['type']:16} {event['appid']} {event['openid']}  "
                     f"{event['created_at'].isoformat()}  {sent}")
    finally:
        store.close()
    return 0


def _deliver(config: Config, args: argparse.Namespace) -> int:
    if args.id or args.failed:
        raise UsageError("keeper events deliver takes no ID or --failed")
    require_secrets(config.webhooks)  # the one `keeper events` action that signs
    for hook in config.webhooks:
        register_secret(hook.secret)
    deliverer = Deliverer(store=open_store(config, pool_size=2), webhooks=config.webhooks,
                          stop=threading.Event(), retention_s=config.events_retention_s)
    try:
        counts = deliverer.deliver_all()
    finally:
        deliverer.close()
    summary = {k: counts.get(k, 0) for k in ("delivered", "retry", "failed", "busy")}
    if args.json:
        _json(summary)
    else:
        _out(f"delivered {summary['delivered']}, to retry {summary['retry']}, failed "
             f"{summary['failed']}; webhooks held by another process: {summary['busy']}")
    return 0
