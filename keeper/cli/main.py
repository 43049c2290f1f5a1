"""The ``keeper`` command line (docs/reference/commands.md): exit 0 ok, 1 run failure, 2 bad
input."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import structlog

from keeper import __version__
from keeper.clock import utcnow
from keeper.config import Config, load_config
from keeper.config.webhooks import require_secrets
from keeper.core.forecast import MAX_DAYS
from keeper.core.grant_lines import MAX_LINE_BYTES, parse_lines
from keeper.core.models import Grant
from keeper.core.policy import schedule
from keeper.core.timestamps import json_default, timestamp
from keeper.errors import (
    ApiError,
    ConfigError,
    DatabaseUnavailable,
    KeeperError,
    StoreError,
    TransientApiError,
    UsageError,
)
from keeper.limiter import QuotaWait
from keeper.log import configure
from keeper.service.runtime import Runtime, cipher_for, open_store
from keeper.store import db
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite, new_lease_id

log = structlog.get_logger("keeper.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
IMPORT_BATCH = 1000
ANALYZE_AFTER = 10000


class Failed(KeeperError):
    """A command failed for a reason of the run (exit 1)."""


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json(obj: Any) -> None:
    _out(json.dumps(obj, default=json_default, ensure_ascii=False))


# -- commands -----------------------------------------------------------------------------


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from keeper.service.scheduler import Service

    # It sends events: without a webhook's secret it must not start (the other commands,
    # which send none, run without it).
    require_secrets(config.webhooks)
    log.info("keeper.started", version=__version__, pid=os.getpid(), **config.redacted())
    service = Service(config=config, load=lambda: load_config(args.config))
    service.install_signals()
    return service.run()


def cmd_sweep(config: Config, args: argparse.Namespace) -> int:
    log.info("keeper.started", version=__version__, pid=os.getpid(), command="sweep",
             **config.redacted())
    with Runtime.build(config) as rt:
        sweeper = rt.sweeper()
        if sys.stderr.isatty() and not args.json:
            sweeper.progress = _progress_bar()
        # Either signal ends the sweep cleanly: calls in flight finish, results are written.
        signal.signal(signal.SIGTERM, lambda *_: rt.stop.set())
        signal.signal(signal.SIGINT, lambda *_: rt.stop.set())
        try:
            summary = sweeper.run_once()
        finally:
            # Results the database did not take (it failed) wait in the journal for the next
            # keeper process, which writes them before it claims anything.
            sweeper.save_held()
            sweeper.close()
    if sweeper.progress is not None:
        sys.stderr.write("\n")
    if args.json:
        _json(summary)
    else:
        _out(
            f"refreshed {summary['refresh_tokens_refreshed']} refresh tokens and "
            f"{summary['access_tokens_refreshed']} access tokens, read "
            f"{summary['profiles_fetched']} profiles, recorded {summary['reauth_recorded']} "
            f"re-authorizations, {summary['transient_failures']} transient failures, "
            f"in {summary['seconds']} s"
        )
    return EXIT_OK


def _progress_bar() -> Callable[[int, int], None]:
    last = [0.0]

    def show(done: int, in_flight: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            sys.stderr.write(f"\rsweeping: {done} grants done, {in_flight} in flight   ")
            sys.stderr.flush()

    return show


def cmd_grant(config: Config, args: argparse.Namespace) -> int:
    from keeper.api.logins import CodeRejected, ExchangeFailed, exchange

    app = config.app(args.app)
    with Runtime.build(config) as rt:
        try:
            login = exchange(config=config, app=app, code=args.code, store=rt.store,
                             client=rt.client, gate=rt.gate)
        except CodeRejected as e:
            raise UsageError(str(e)) from None
        except ExchangeFailed as e:
            raise Failed(str(e)) from None
    if args.json:
        _json({"appid": login.appid, "openid": login.openid, "unionid": login.unionid,
               "scope": login.scope, "is_snapshotuser": login.is_snapshotuser})
    else:
        _out(login.openid)
    return EXIT_OK


def _capped_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """Lines as bytes. A line longer than the importer takes is cut one byte past the limit
    (so the parser refuses it) and the rest of it skipped: memory stays bounded."""
    limit = MAX_LINE_BYTES + 1
    while line := stream.readline(limit):
        rest = line
        while len(rest) == limit and not rest.endswith(b"\n"):
            rest = stream.readline(limit)
        yield line


def _read_lines(source: str) -> Iterator[str | bytes]:
    """The lines of FILE, or of stdin for ``-``; a reading error is a :class:`UsageError`."""
    try:
        if source != "-":
            with open(source, "rb") as f:
                yield from _capped_lines(f)
        elif hasattr(sys.stdin, "buffer"):
            yield from _capped_lines(sys.stdin.buffer)
        else:  # a text stream put in place of stdin (tests, embedding)
            yield from sys.stdin
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror or type(e).__name__}") from None


def cmd_import(config: Config, args: argparse.Namespace) -> int:
    appids = [a.appid for a in config.apps]
    clocks = {a.appid: config.lifetime(a) for a in config.apps}
    store = open_store(config)
    imported = bad = 0
    unknown: set[str] = set()
    # Line numbers ride beside the writes, so a row the database refuses is reported by line.
    batch: dict[tuple[str, str], tuple[int, GrantWrite]] = {}
    read_error: UsageError | None = None

    def refuse(line: int, field: str | None, error: str) -> None:
        nonlocal bad
        bad += 1
        # Never the value: a line holds tokens.
        log.error("import.bad_line", line=line, field=field, error=error)

    def write(entries: list[tuple[int, GrantWrite]]) -> int:
        try:
            return store.upsert_grants([w for _, w in entries], utcnow())
        except DatabaseUnavailable:
            raise
        except StoreError:
            if len(entries) > 1:
                # One row the database refuses must not drop its neighbours: one by one.
                return sum(write([entry]) for entry in entries)
            refuse(entries[0][0], None, "the database refused this grant")
            return 0

    def flush() -> None:
        nonlocal imported
        if batch:
            entries = sorted(batch.values(), key=lambda e: e[0])
            batch.clear()
            imported += write(entries)

    try:
        try:
            lines = parse_lines(_read_lines(args.file), appids=appids, now=utcnow())
            for parsed in lines:
                if parsed.grant is None:
                    refuse(parsed.line, parsed.field, parsed.error or "bad line")
                    continue
                unknown.update(parsed.unknown_keys)
                g = parsed.grant
                # The same user twice in one file: the later line wins.
                batch[(g.appid, g.openid)] = (
                    parsed.line, GrantWrite(g, schedule(g, clocks[g.appid]))
                )
                if len(batch) >= IMPORT_BATCH:
                    flush()
        except UsageError as e:  # the input could not be read on: keep what was read
            read_error = e
        flush()
        if imported >= ANALYZE_AFTER:
            store.analyze()  # so the due queries keep their index plans on a grown table
    finally:
        store.close()
    if unknown:
        log.warning("import.unknown_keys", keys=sorted(unknown))
    log.info("import.finished", imported=imported, bad_lines=bad)
    if read_error is not None:
        raise read_error
    if args.json:
        _json({"imported": imported, "bad_lines": bad})
    else:
        _out(f"imported {imported} grants; {bad} bad lines")
    return EXIT_USAGE if bad else EXIT_OK


def _grant_or_fail(store: Store, appid: str, openid: str) -> Grant:
    grant = store.get_grant(appid, openid)
    if grant is None:
        raise Failed(f"no grant for openid {openid} of app {appid}: the user must log in")
    return grant


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    from keeper.api.tokens import MustReauthorize, NoGrant, TokenDesk, Unavailable

    app = config.app(args.app)
    with Runtime.build(config) as rt:
        desk = TokenDesk(store=rt.store, worker=rt.worker, lease_s=config.lease_s,
                         wait_s=2 * config.read_timeout_s + 5, journal=rt.journal(),
                         clock=utcnow)
        try:
            token = desk.token(app.appid, args.openid, min_valid_s=config.access_margin_s)
        except (NoGrant, MustReauthorize, Unavailable) as e:
            raise Failed(str(e)) from None
    sys.stdout.write(token.access_token + "\n")
    sys.stdout.flush()
    return EXIT_OK


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    app = config.app(args.app)
    with Runtime.build(config) as rt:
        grant = _grant_or_fail(rt.store, app.appid, args.openid)
        rt.gate.acquire(app.appid, "auth", max_wait_s=30)
        valid, detail = True, "ok"
        errcode: int | None = 0
        try:
            rt.client.check(grant.access_token, grant.openid, appid=grant.appid)
        except TransientApiError as e:
            raise Failed(f"WeChat could not be asked: {e}") from None
        except ApiError as e:  # WeChat's answer: the token is not valid
            valid, errcode, detail = False, e.errcode, str(e)
    if args.json:
        _json({"appid": app.appid, "openid": args.openid, "valid": valid, "errcode": errcode,
               "access_expires_at": timestamp(grant.access_expires_at)})
    else:
        _out("valid" if valid else f"not valid: {detail}")
    return EXIT_OK if valid else EXIT_FAILED


def cmd_profile(config: Config, args: argparse.Namespace) -> int:
    from keeper.api.documents import profile_document

    store = open_store(config)
    try:
        data = profile_document(store, _grant_or_fail(store, args.app, args.openid))
    finally:
        store.close()
    if args.json:
        _json(data)
    else:
        for key, value in data.items():
            _out(f"{key:18} {value if value is not None else '-'}")
    return EXIT_OK


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    store = open_store(config)
    try:
        now = utcnow()
        data = store.status(now)
        data["last_sweep"] = last = store.last_sweep()
        # For alerts: a service that stopped sweeping shows a growing age.
        data["last_sweep_age_s"] = (
            round((now - datetime.fromisoformat(last["finished_at"])).total_seconds(), 1)
            if last else None
        )
        # What needs an operator, from the last sweep: apps WeChat refuses (40013, 40125,
        # 40164, 48004) and answers saying keeper sent a bad parameter (a keeper bug).
        summary = last["summary"] if last else {}
        data["apps_rejected"] = summary.get("apps_rejected", [])
        data["keeper_bug_answers"] = summary.get("keeper_bug_answers", 0)
        data.update(store.delivery_counts())  # events_pending, events_failed
    finally:
        store.close()
    if args.json:
        _json(data)
        return EXIT_OK
    for key in ("grants", "active", "reauth_required", "refresh_due_24h", "access_expired",
                "retrying", "profiles_failing", "avatars_saved", "avatars_refused",
                "avatars_missing", "apps_rejected", "keeper_bug_answers", "events_pending",
                "events_failed"):
        _out(f"{key:18} {data[key]}")
    for reason, n in sorted(data["reauth_by_reason"].items()):
        _out(f"  {reason:16} {n}")
    last = data["last_sweep"]
    if last is None:
        _out("last sweep         never")
    else:
        s = last["summary"]
        _out(f"last sweep         {last['finished_at']} ({data['last_sweep_age_s']} s ago, "
             f"took {s.get('seconds')} s): "
             + ", ".join(f"{k}={s.get(k, 0)}" for k in (
                 "refresh_tokens_refreshed", "access_tokens_refreshed", "reauth_recorded",
                 "profiles_fetched", "transient_failures")))
    return EXIT_OK


def cmd_forecast(config: Config, args: argparse.Namespace) -> int:
    """``keeper forecast``: the status page's re-login forecast, on a terminal."""
    from keeper.observe.forecast import forecast, forecast_document

    if not 1 <= args.days <= MAX_DAYS:
        raise UsageError(f"--days: expected 1 to {MAX_DAYS}, got {args.days}")
    store = open_store(config)
    try:
        days = forecast(store, config, utcnow(), args.days)
    finally:
        store.close()
    if args.json:
        _json(forecast_document(days))
        return EXIT_OK
    widest = max((d.lapsing for d in days), default=0)
    _out("date        lapsing  not renewed  (live grants whose refresh token's lifetime ends "
         "that day, China time)")
    for d in days:
        bar = "#" * round(40 * d.lapsing / widest) if widest else ""
        _out(f"{d.date.isoformat()}  {d.lapsing:7d}  {d.expiring:11d}  {bar}")
    _out(f"total       {sum(d.lapsing for d in days):7d}  "
         f"{sum(d.expiring for d in days):11d}")
    return EXIT_OK


def cmd_reauth(config: Config, args: argparse.Namespace) -> int:
    from keeper.api.documents import reauth_row

    store = open_store(config)
    try:
        for record in store.iter_reauth():
            row = reauth_row(record)
            if args.json:
                _json(row)
            else:
                _out(f"{row['appid']}  {row['openid']}  {row['reason']}  "
                     f"errcode={row['errcode']}  since={row['since']}")
    finally:
        store.close()
    return EXIT_OK


def _create_private(path: Path, text: str) -> None:
    """Write a new file atomically with mode 0600; never replace one that exists.

    The text goes to a temporary file beside it first, which is then hard-linked into place:
    the link fails if the name exists, and a crash leaves no half-written file under it.
    """
    exists = UsageError(f"{path} exists; keeper never overwrites a key file")
    if os.path.lexists(path):
        raise exists
    tmp = path.with_name(f".{path.name}.{new_lease_id()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError:
        raise exists from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def cmd_new_key(args: argparse.Namespace) -> int:
    """``keeper rotate-key --new [--output FILE]``: needs no configuration, only makes a key."""
    from cryptography.fernet import Fernet

    from keeper.crypto import key_id

    # A new key for the operator to put first in encryption_key_file.
    key = Fernet.generate_key()
    if args.output:
        path = Path(args.output)
        _create_private(path, "# keeper's token encryption key: back it up apart from the "
                              f"database.\n{key.decode('ascii')}\n")
        log.info("encryption.key_written", path=str(path), key_id=key_id(key))
        if args.json:
            _json({"path": str(path), "key_id": key_id(key)})
        else:
            _out(f"wrote a new key (id {key_id(key)}) to {path}")
    elif args.json:
        _json({"key": key.decode("ascii"), "key_id": key_id(key)})
    else:
        _out(key.decode("ascii"))
    return EXIT_OK


def cmd_rotate_key(config: Config, args: argparse.Namespace) -> int:
    if args.new:
        return cmd_new_key(args)
    store = open_store(config)
    total = 0
    try:
        primary = store.cipher.primary_id
        while True:
            done, left = store.rotate_keys(batch=args.batch)
            total += done
            log.info("rotate.progress", rotated=total, left=left, key_id=primary)
            if not left:
                break
            if not done:
                raise Failed(f"{left} grants keep being written under another key: is a keeper "
                             "process still running with the old encryption_key_file first?")
    finally:
        store.close()
    if args.json:
        _json({"rotated": total, "key_id": primary})
    else:
        _out(f"re-encrypted {total} grants under key {primary}; every token is under it now, "
             "so older keys can be removed from encryption_key_file")
    return EXIT_OK


def cmd_cleanup_avatars(config: Config, args: argparse.Namespace) -> int:
    from keeper.avatars.sweep_pass import cleanup

    store = open_store(config)
    try:
        counts = cleanup(store, config.avatar_dir, min_age_s=args.min_age, now=time.time())
    finally:
        store.close()
    log.info("avatars.cleaned", removed=counts["removed"], kept=counts["kept"])
    if args.json:
        _json({"removed": counts["removed"], "kept": counts["kept"]})
    else:
        _out(f"removed {counts['removed']} avatar files no profile uses; kept {counts['kept']}")
    return EXIT_OK


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from keeper.api.server import serve

    return serve(config)


def cmd_api_key(args: argparse.Namespace) -> int:
    """``keeper api-key``: needs no configuration; prints a new key once, and its line."""
    from keeper.api.keys import new_key

    key, line = new_key(args.name, args.scopes)
    log.info("api.key_created", name=args.name, scopes=line.split()[1])
    if args.json:
        _json({"name": args.name, "scopes": line.split()[1].split(","), "key": key,
               "line": line})
    else:
        _out(f"key (shown once; give it to the application): {key}")
        _out(f"add this line to the keys file (api.keys_file): {line}")
    return EXIT_OK


def cmd_db(config: Config, args: argparse.Namespace) -> int:
    cipher = cipher_for(config)  # encrypts tokens stored in plaintext before 0002
    # No statement timeout: encrypting or rewriting a large table may take minutes.
    engine = db.make_engine(config.database_url, pool_size=1, timeout_s=0,
                            pooler=config.database_pooler)
    try:
        before, after = db.upgrade(engine, cipher=cipher)
    finally:
        engine.dispose()
    log.info("db.upgraded", before=before, after=after)
    _out(f"schema at revision {after} (was {before or 'empty'})")
    return EXIT_OK


# -- entry point --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keeper", description="Keeps WeChat OAuth2 grants alive.")
    p.add_argument("--config", metavar="PATH", help="configuration file (default: "
                   "$KEEPER_CONFIG, then config/keeper.toml)")
    p.add_argument("--version", action="version", version=f"keeper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[Config, argparse.Namespace], int], help_: str,
                *, json_flag: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    command("run", cmd_run, "the long-running service: a sweep every sweep_interval")
    command("sweep", cmd_sweep, "one sweep now, then exit", json_flag=True)
    sp = command("grant", cmd_grant, "exchange a login code and store the grant",
                 json_flag=True)
    sp.add_argument("--app", required=True, metavar="APPID")
    sp.add_argument("code", metavar="CODE")
    sp = command("import", cmd_import, "upsert grants from JSON lines", json_flag=True)
    sp.add_argument("file", nargs="?", default="-", metavar="FILE|-")
    for name, fn, help_ in (
        ("token", cmd_token, "print a valid access token, refreshing it first if needed"),
        ("check", cmd_check, "ask WeChat whether the stored access token is valid"),
        ("profile", cmd_profile, "the stored profile of one user"),
    ):
        sp = command(name, fn, help_, json_flag=name != "token")
        sp.add_argument("--app", required=True, metavar="APPID")
        sp.add_argument("openid", metavar="OPENID")
    command("status", cmd_status, "counts and the last sweep", json_flag=True)
    command("reauth", cmd_reauth, "users who must re-authorize", json_flag=True)
    sp = command("forecast", cmd_forecast, "users whose refresh token's lifetime ends on each "
                 "of the coming days (China time)", json_flag=True)
    sp.add_argument("--days", type=int, default=30, metavar="N", help="days (default 30)")
    from keeper.cli.events import add_parser as add_events

    add_events(command)
    sp = command("rotate-key", cmd_rotate_key,
                 "re-encrypt every token under the first key of encryption_key_file",
                 json_flag=True)
    sp.add_argument("--batch", type=int, default=500, metavar="N", help="grants per transaction")
    sp.add_argument("--new", action="store_true",
                    help="make a new key and exit (needs no configuration)")
    sp.add_argument("--output", metavar="FILE",
                    help="with --new: write the key to FILE (mode 0600; never overwrites)")
    sp = command("cleanup-avatars", cmd_cleanup_avatars,
                 "remove avatar files no profile points to any more", json_flag=True)
    sp.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                    help="only files older than this (default 3600)")
    sp = command("db", cmd_db, "database schema")
    sp.add_argument("action", choices=["upgrade"])
    command("serve", cmd_serve, "the HTTP API for applications (see [api])")
    sp = command("api-key", lambda _c, a: cmd_api_key(a),
                 "make an API key for keeper serve (shown once) and its keys-file line",
                 json_flag=True)
    sp.add_argument("--name", required=True, help="who uses the key (a name for the log)")
    sp.add_argument("--scopes", required=True, metavar="SCOPES",
                    help="comma-separated: tokens, grants, read")
    sub.add_parser("simulate", help="run the WeChat simulator on loopback", add_help=False)
    sub.add_parser("demo", help="the demo that `make demo` runs", add_help=False)
    return p


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Tools with their own arguments.
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in ("simulate", "demo"):
        rest = argv[first + 1:]
        if argv[first] == "simulate":
            from keeper.wechat.simulator.cli import main as simulate

            return simulate(rest)
        from keeper.cli.demo import main as demo

        return demo(rest)
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "output", None) and not args.new:
        parser.error("--output goes with --new")
    configure("info")
    try:
        if args.command == "rotate-key" and args.new:
            return cmd_new_key(args)  # before the configuration: making the first key needs none
        if args.command == "api-key":
            return cmd_api_key(args)  # needs no configuration either
        config = load_config(args.config)
        configure(config.log_level)
        return int(args.fn(config, args))
    except (ConfigError, UsageError) as e:
        log.error("command.refused", command=args.command, error=str(e))
        return EXIT_USAGE
    except DatabaseUnavailable as e:
        log.error("database.unavailable", command=args.command, error=str(e))
        return EXIT_FAILED
    except (Failed, StoreError, QuotaWait, KeeperError) as e:
        log.error("command.failed", command=args.command, error=str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        # A file or directory the configuration points to cannot be used; the message names
        # the file (paths are not secrets) and the system's reason.
        log.error("command.failed", command=args.command,
                  error=f"{e.filename or 'a file'}: {e.strerror or type(e).__name__}")
        unusable = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
        return EXIT_USAGE if isinstance(e, unusable) else EXIT_FAILED
    except Exception as e:
        # A bug. One line and exit 1 (systemd may restart); the exception's text is left out,
        # since it might hold a value that was being handled (a token).
        log.error("command.crashed", command=args.command, error=type(e).__name__,
                  where=_where(e))
        return EXIT_FAILED


def _where(error: BaseException) -> str:
    """``file:line`` where ``error`` was raised: enough to find the bug, no values."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"

