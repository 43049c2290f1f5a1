"""The reference pages (docs/reference/) against the code they describe, so that they cannot
drift: a key, command, option, log event, metric, errcode, route or error the code has and a
page lacks fails here, and so does one a page lists that the code does not have. Each failure
names the page and what is missing or extra.

- configuration.md and config/keeper.toml: the keys and defaults of keeper.config.keys;
- commands.md: the argparse parser ``keeper`` builds (and development/simulator.md: the
  options of ``keeper simulate``);
- log-events.md: every ``log.<level>("event", ...)`` call in keeper/, found by walking the
  syntax trees (no catalogue to keep beside ~90 calls), and the library lines keeper.log
  renames;
- metrics.md: the registry a scrape reads;
- errcodes.md (and the codes of wechat.md's table): keeper.core.errcodes.TABLE;
- http-api.md: the OpenAPI document ``/openapi.json`` serves.

The pages are parsed simply: Markdown tables whose first column holds backticked names.
"""

from __future__ import annotations

import argparse
import ast
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keeper.config import build_config
from keeper.config.keys import KEYS, Key, is_table
from keeper.config.values import parse_duration
from keeper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
NOTHING = object()


# -- reading the pages ------------------------------------------------------------------------


def tables(path: Path) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of ``path``: (its header's cells, its rows' cells). ``\\|`` in a
    cell is a ``|`` of the cell's text."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|")
                     for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                rows.append(cells)
        elif header is not None:
            yield header, rows
            header, rows = None, []


def ticked(cell: str) -> list[str]:
    """The backticked parts of a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def differ(page: str, what: str, source: str, in_code: Iterable[Any],
           on_page: Iterable[Any]) -> str:
    """A failure message naming what the code has and the page lacks, and the reverse (empty
    when they agree)."""
    code, doc = set(in_code), set(on_page)
    lines = []
    if code - doc:
        lines.append(f"  {what} in {source} that {page} lacks: "
                     + ", ".join(sorted(map(str, code - doc))))
    if doc - code:
        lines.append(f"  {what} {page} lists that {source} does not have: "
                     + ", ".join(sorted(map(str, doc - code))))
    return "\n".join([f"{page} has drifted from {source}:", *lines]) if lines else ""


def check(message: str) -> None:
    """Fail with ``message``: headed lists of what is missing or extra, and indented lines of
    details that differ (given a heading here when they have none)."""
    out: list[str] = []
    for line in message.splitlines():
        if line.startswith("  ") and not (out and (out[-1].startswith("  ")
                                                   or out[-1].endswith(":"))):
            out.append("the documentation and the code differ:")
        out.append(line)
    if out:
        pytest.fail("\n".join(out), pytrace=False)


# -- configuration ----------------------------------------------------------------------------

CONFIG_PAGE = REFERENCE / "configuration.md"
KEEPER_TOML = ROOT / "config" / "keeper.toml"
CATALOGUE = {k.name: k for k in KEYS}


def toml_value(text: str) -> Any:
    """``text`` read as one TOML value, or NOTHING."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return NOTHING


def same_default(key: Key, shown: Any) -> bool:
    if key.duration:
        try:
            return parse_duration(shown, key.name) == parse_duration(key.default, key.name)
        except ConfigError:
            return False
    return bool(shown == key.default and type(shown) is type(key.default))


def wrong_defaults(where: str, shown: dict[str, Any]) -> list[str]:
    """Lines naming each key whose default ``shown`` (NOTHING: none shown) is not the code's."""
    wrong = []
    for name, value in sorted(shown.items()):
        key = CATALOGUE.get(name)
        if key is None:
            continue
        if key.default is None and value is not NOTHING:
            wrong.append(f"  {name}: {where} shows the default {value!r}; the key has none")
        elif key.default is not None and value is NOTHING:
            wrong.append(f"  {name}: {where} shows no default; it is {key.default!r}")
        elif key.default is not None and not same_default(key, value):
            wrong.append(f"  {name}: {where} shows the default {value!r}; it is "
                         f"{key.default!r}")
    return wrong


def config_page_rows() -> dict[str, str]:
    """Each key the page's key tables list → its default cell. A row is ``name`` or
    ``[table]`` ``name`` (``[apps.quotas]`` alone is the key ``apps.quotas``); one row may name
    several keys of one table."""
    rows: dict[str, str] = {}
    for header, body in tables(CONFIG_PAGE):
        if header[0] != "key":
            continue
        for cells in body:
            names = ticked(cells[0])
            table = ""
            if names and names[0].startswith("["):
                table = names[0].strip("[]")
                names = names[1:] or [""]
            for name in names:
                full = f"{table}.{name}".strip(".") if table else name
                assert full not in rows, f"{CONFIG_PAGE.name} lists {full} twice"
                rows[full] = cells[1]
    return rows


def test_the_configuration_page_lists_every_key_with_its_default() -> None:
    rows = config_page_rows()
    page = "docs/reference/configuration.md"
    message = differ(page, "keys", "keeper.config.keys.KEYS", CATALOGUE, rows)
    shown = {}
    for name, cell in rows.items():
        shown[name] = next((v for t in ticked(cell) if (v := toml_value(t)) is not NOTHING),
                           NOTHING)
    wrong = wrong_defaults(page, shown)
    wrong += [f"  {name}: {page} does not say it is required" for name, cell in rows.items()
              if name in CATALOGUE and CATALOGUE[name].required
              and "required" not in cell.lower()]
    check("\n".join(filter(None, [message, *wrong])))


def keeper_toml_keys() -> dict[str, list[Any]]:
    """Each key config/keeper.toml sets or shows in a commented example → its values there.

    The set keys come from the parsed file; the examples (``# key = value``, the value
    continued over the commented lines after it until it is TOML; ``# # key = value``, an
    alternative to the line before) belong to the table of the last header before them, set
    or commented (``# [[apps]]``)."""
    text = KEEPER_TOML.read_text(encoding="utf-8")
    found: dict[str, list[Any]] = {}

    def flat(data: dict[str, Any], table: str) -> None:
        for name, value in data.items():
            full = f"{table}.{name}" if table else name
            if isinstance(value, dict) and is_table(full):
                flat(value, full)
            else:
                found.setdefault(full, []).append(value)

    flat(tomllib.loads(text), "")
    lines = text.splitlines()
    table = ""
    for i, line in enumerate(lines):
        if header := re.match(r"^(?:#\s*)?\[\[?([A-Za-z_.]+)\]\]?\s*(?:#.*)?$", line):
            table = header[1]
            if table in CATALOGUE:  # a table that is a key ([apps.quotas])
                found.setdefault(table, [])
            continue
        example = re.match(r"^#\s*(?:#\s*)?([A-Za-z_]+)\s*=\s*(.*)$", line)
        if not example:
            continue
        value, more = toml_value(example[2]), example[2]
        for follow in lines[i + 1:i + 6]:
            if value is not NOTHING or not follow.startswith("#"):
                break
            more += "\n" + follow[1:]
            value = toml_value(more)
        if table == "apps.quotas":  # an example override of one of the [quotas] keys
            known = f"quotas.{example[1]}" in CATALOGUE
            found.setdefault("apps.quotas" if known else f"apps.quotas.{example[1]}", [])
            continue
        found.setdefault(f"{table}.{example[1]}" if table else example[1], []).append(value)
    return found


def test_keeper_toml_shows_every_key_with_its_default() -> None:
    found = keeper_toml_keys()
    where = "config/keeper.toml"
    message = differ(where, "keys", "keeper.config.keys.KEYS", CATALOGUE, found)
    wrong = []
    for name, values in sorted(found.items()):
        key = CATALOGUE.get(name)
        if key is None or key.default is None:
            continue  # an example's value (an appid, a secret's source) is no default
        for value in values or [NOTHING]:  # set once, or shown in an example
            wrong += wrong_defaults(where, {name: value})
    check("\n".join(filter(None, [message, *wrong])))


#: Values for the keys without a default, to give the loader every key at once.
SAMPLES = {
    "encryption_key_file": "keeper.key",
    "apps.appid": "wx1",
    "apps.secret_env": "APP_SECRET",
    "apps.secret_file": "app-secret",
    "apps.quotas": {"refresh": "none"},
    "webhooks.url": "https://shop.example.com/hook",
    "webhooks.secret_env": "HOOK_SECRET",
    "webhooks.secret_file": "hook-secret",
}


@pytest.mark.parametrize("secret", ["secret_env", "secret_file"])
def test_the_loader_takes_every_catalogued_key(secret: str, tmp_path: Path) -> None:
    """A key listed in the catalogue that the loader does not read is refused as unknown (a
    key the loader reads that is not listed cannot be: ``Table`` takes defaults only from the
    catalogue). Secrets come from one source at a time, so each is given in one run."""
    other = {"secret_env": "secret_file", "secret_file": "secret_env"}[secret]
    document: dict[str, Any] = {}
    for key in KEYS:
        if key.name.endswith("." + other):
            continue
        if key.default is None and key.name not in SAMPLES:
            pytest.fail(f"give {key.name} a value in SAMPLES", pytrace=False)
        value = SAMPLES[key.name] if key.default is None else key.default
        table, _, name = key.name.rpartition(".")
        if table in ("apps", "webhooks"):
            document.setdefault(table, [{}])[0][name] = value
        elif table:
            document.setdefault(table, {})[name] = value
        else:
            document[name] = value
    refused = ""
    try:
        build_config(document, env={"APP_SECRET": "s", "HOOK_SECRET": "s"},
                     source=str(tmp_path / "keeper.toml"))
    except ConfigError as e:
        refused = str(e)
    if refused:
        check("keeper.config.keys.KEYS lists a key the loader does not take, or a value there "
              f"(or in SAMPLES) is refused:\n  {refused}")


# -- commands ---------------------------------------------------------------------------------

COMMANDS_PAGE = REFERENCE / "commands.md"
SIMULATOR_PAGE = ROOT / "docs" / "development" / "simulator.md"
#: Commands that parse the rest of the line themselves (keeper.cli.main hands it to them): the
#: page writes ``[options]`` for them, and the simulator's are on its own page.
OWN_ARGUMENTS = ("simulate", "demo")


def words(usage: str) -> list[str]:
    """A usage line's words, brackets dropped; ``ID|--failed`` is two words (alternatives), a
    metavar such as ``FILE|-`` one."""
    out: list[str] = []
    for token in usage.split():
        token = token.lstrip("[")
        while token.endswith("]") and token.count("]") > token.count("["):
            token = token[:-1]  # the end of an optional part, not of a metavar's [:COUNT]
        parts = token.split("|")
        out += parts if any(p.startswith("--") for p in parts) else [token]
    return out


def options_of(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Each option → the metavar its value is written with (``None``: a flag)."""
    return {o: None if a.nargs == 0 else (a.metavar or a.dest.upper())
            for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def positionals_of(parser: argparse.ArgumentParser) -> set[str]:
    """The words the parser's positional arguments are written with: each choice, else the
    metavar."""
    out: set[str] = set()
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            out |= set(a.choices) if a.choices else {str(a.metavar or a.dest)}
    return out


def read_usage(usage: list[str], options: dict[str, str | None]
               ) -> tuple[dict[str, list[str | None]], set[str]]:
    """(each option a usage line writes → the metavars written after it, the other words). An
    option takes the word after it when the parser says it takes a value."""
    written: dict[str, list[str | None]] = {}
    others: set[str] = set()
    i = 0
    while i < len(usage):
        word, after = usage[i], usage[i + 1] if i + 1 < len(usage) else None
        i += 1
        if not word.startswith("--"):
            others.add(word)
            continue
        value = None
        if options.get(word) is not None and after is not None and not after.startswith("--"):
            value, i = after, i + 1
        written.setdefault(word, []).append(value)
    return written, others


def wrong_metavars(page: str, command: str, written: dict[str, list[str | None]],
                   options: dict[str, str | None]) -> list[str]:
    return [f"  {command} {option}: {page} writes its value {value}; the parser's metavar is "
            f"{options[option]}"
            for option, values in sorted(written.items()) if options.get(option) is not None
            for value in values if value is not None and value != options[option]]


def test_the_commands_page_lists_every_command_and_option() -> None:
    from keeper.cli.main import _parser

    page = "docs/reference/commands.md"
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    rows: dict[str, list[str]] = {}
    for _header, body in tables(COMMANDS_PAGE):
        for cells in body:
            usage = words(ticked(cells[0])[0]) if ticked(cells[0]) else []
            if usage[:1] == ["keeper"] and len(usage) > 1:
                rows.setdefault(usage[1], []).extend(usage[2:])
    problems = [differ(page, "commands", "the parser (keeper.cli.main)", sub.choices, rows)]
    for name, command in sorted(sub.choices.items()):
        if name not in rows:
            continue
        if name in OWN_ARGUMENTS:
            if set(rows[name]) - {"options"}:
                problems.append(f"  {name}: {page} should write [options] (its own page lists "
                                f"them), not {' '.join(rows[name])}")
            continue
        options = options_of(command)
        written, others = read_usage(rows[name], options)
        where = f"the parser of keeper {name}"
        problems.append(differ(f"{page} (keeper {name})", "options", where, options, written))
        problems.append(differ(f"{page} (keeper {name})", "arguments", where,
                               positionals_of(command), others))
        problems += wrong_metavars(page, f"keeper {name}", written, options)
    globals_line = next(p for p in COMMANDS_PAGE.read_text().split("\n\n")
                        if p.startswith("Global options"))
    options = options_of(parser)
    written, _ = read_usage([w for t in ticked(globals_line) for w in words(t)], options)
    problems.append(differ(f"{page} (global options)", "options", "the parser (keeper.cli.main)",
                           options, written))
    problems += wrong_metavars(page, "keeper", written, options)
    check("\n".join(filter(None, problems)))


def test_the_simulator_page_lists_every_option_of_keeper_simulate() -> None:
    from keeper.wechat.simulator.cli import build_parser

    page = "docs/development/simulator.md"
    paragraph = next(p for p in SIMULATOR_PAGE.read_text().split("\n\n")
                     if p.startswith("`keeper simulate` takes"))
    options = options_of(build_parser())
    written: dict[str, list[str | None]] = {}
    for token in ticked(paragraph):  # each option on its own, its metavar optional
        if token.startswith("--"):
            for option, values in read_usage(words(token), options)[0].items():
                written.setdefault(option, []).extend(values)
    check("\n".join(filter(None, [
        differ(page, "options", "the parser of keeper simulate", options, written),
        *wrong_metavars(page, "keeper simulate", written, options)])))


# -- log events -------------------------------------------------------------------------------

LOG_PAGE = REFERENCE / "log-events.md"
#: A logger's methods → the level of the line (structlog's ``exception`` logs at error).
LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "warn": "warning",
              "error": "error", "exception": "error", "critical": "critical",
              "fatal": "critical", "msg": "info"}


def names_of(node: ast.expr | None) -> set[str] | None:
    """The strings an expression can be, when it is built of literals (``"a"``,
    ``"a" if x else "b"``); ``None`` otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = names_of(node.body), names_of(node.orelse)
        return body | orelse if body is not None and orelse is not None else None
    return None


def log_calls() -> tuple[dict[str, dict[str, set[str]]], list[str]]:
    """Every ``log.<level>(event, ...)`` call in keeper/: event → level → where (file:line);
    and the calls whose event the scan cannot tell (where, and why).

    Every module logs through a module-level ``log = structlog.get_logger(...)``. Two forms
    are not plain: the level chosen at the call (``(log.error if first else log.debug)(...)``:
    once per outage at error, then debug), whose every branch counts; and an event name held
    in a variable (``log.error(event, ...)`` in keeper/api/server.py and
    keeper/service/scheduler.py: schema outdated or database unavailable), found from that
    variable's assignments in the function when they are literals. Anything else fails the
    test, naming the call."""
    events: dict[str, dict[str, set[str]]] = {}
    unread: list[str] = []
    for path in sorted((ROOT / "keeper").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        scopes: list[ast.AST] = [tree, *(n for n in ast.walk(tree)
                                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
        owner: dict[ast.AST, ast.AST] = {}
        for scope in scopes:  # innermost last: a nested function's calls are its own
            for node in ast.walk(scope):
                owner[node] = scope
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "log"):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            call = next((c for c in ast.walk(owner[node]) if isinstance(c, ast.Call) and (
                c.func is node or (isinstance(c.func, ast.IfExp)
                and node in (c.func.body, c.func.orelse)))), None)
            if node.attr not in LOG_LEVELS or call is None:
                unread.append(f"{where}: log.{node.attr} (not a call of a level's method)")
                continue
            first = call.args[0] if call.args else None
            names = names_of(first)
            if names is None and isinstance(first, ast.Name):
                values = [names_of(a.value) for a in ast.walk(owner[node])
                          if isinstance(a, ast.Assign)
                          and any(isinstance(t, ast.Name) and t.id == first.id
                                  for t in a.targets)]
                if values and all(v is not None for v in values):
                    names = set().union(*values)  # type: ignore[arg-type]
            if not names:
                unread.append(f"{where}: the event name is not a literal the scan can read")
                continue
            for name in names:
                events.setdefault(name, {}).setdefault(LOG_LEVELS[node.attr], set()).add(where)
    from keeper.log import _QUIETED  # library lines keeper renames, at debug level

    for _logger, _text, name in _QUIETED:
        events.setdefault(name, {}).setdefault("debug", set()).add("keeper/log.py (_QUIETED)")
    return events, unread


def test_the_log_events_page_lists_every_event_at_its_level() -> None:
    events, unread = log_calls()
    assert len(events) > 50, "the scan found too few events: has the logger's name changed?"
    page = "docs/reference/log-events.md"
    documented: dict[str, set[str]] = {}
    for header, body in tables(LOG_PAGE):
        if header[0] == "event":
            for cells in body:
                levels = set(re.findall(r"\b(debug|info|warning|error|critical)\b", cells[1]))
                for name in ticked(cells[0]):
                    assert name not in documented, f"{page} lists {name} twice"
                    documented[name] = levels
    problems = ["log calls in keeper/ the scan cannot read (give them a literal event name):"
                "\n  " + "\n  ".join(unread)] if unread else []
    missing = sorted(set(events) - set(documented))
    if missing:
        problems.append(f"log events in keeper/ that {page} lacks:\n  " + "\n  ".join(
            f"{n} ({', '.join(sorted(events[n]))}; "
            f"{', '.join(sorted(w for ws in events[n].values() for w in ws))})"
            for n in missing))
    extra = sorted(set(documented) - set(events))
    if extra:
        problems.append(f"log events {page} lists that no code in keeper/ logs: "
                        + ", ".join(extra))
    levels = [name for name in sorted(set(events) & set(documented))
              if set(events[name]) != documented[name]]
    if levels:
        problems.append(f"log events whose levels in {page} are not the code's:")
    for name in levels:
        problems.append(f"  {name}: {page} gives the level "
                        f"{', '.join(sorted(documented[name])) or '(none)'}; keeper/ logs it "
                        f"at {', '.join(sorted(events[name]))}")
    check("\n".join(problems))


# -- metrics ----------------------------------------------------------------------------------

METRICS_PAGE = REFERENCE / "metrics.md"


def scraped_metrics(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, set[str]]]:
    """Every ``keeper_*`` metric a scrape of ``keeper run`` reads → (type, label names): the
    registry ``registry_for`` builds, its database collector answering from a read that has
    a row of each kind (so that every gauge family is there, with its labels)."""
    from datetime import UTC, datetime

    from prometheus_client.metrics import MetricWrapperBase

    from keeper.metrics import process
    from keeper.observe.collector import DatabaseCollector, Snapshot
    from keeper.observe.exposition import MULTIPROC_ENV, registry_for

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    config = build_config({"apps": [{"appid": "wx1"}]}, env={}, source="test.toml")
    read = Snapshot(grants={("wx1", "active"): 1}, reauth={("wx1", "other"): 1},
                    due={("wx1", "refresh"): (1, 0)}, last_sweep=datetime.now(UTC),
                    quota=[("wx1", "refresh", 1, 2)],
                    events={"events_pending": 0, "events_failed": 0})
    collector = DatabaseCollector(store=lambda: None, config=lambda: config, ttl_s=0)
    monkeypatch.setattr(collector, "snapshot", lambda: read)
    # A process metric has no series before it first counts something; its label names are
    # the ones it was declared with.
    declared = {m._name: set(m._labelnames) for m in vars(process).values()
                if isinstance(m, MetricWrapperBase)}
    found = {}
    for family in registry_for(collector).collect():
        if not family.name.startswith("keeper_"):
            continue  # the runtime's process_* and python_*
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = (family.type, labels or declared.get(family.name, set()))
    return found


def test_the_metrics_page_lists_every_metric_with_its_type_and_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scraped = scraped_metrics(monkeypatch)
    page = "docs/reference/metrics.md"
    documented: dict[str, tuple[str, set[str]]] = {}
    for header, body in tables(METRICS_PAGE):
        if header[0] == "metric":
            for cells in body:
                documented[ticked(cells[0])[0]] = (cells[1].split()[0], set(ticked(cells[2])))
    problems = [differ(page, "metrics", "the registry a scrape reads", scraped, documented)]
    for name in sorted(set(scraped) & set(documented)):
        (kind, labels), (page_kind, page_labels) = scraped[name], documented[name]
        if kind != page_kind:
            problems.append(f"  {name}: {page} says {page_kind}; it is a {kind}")
        if labels != page_labels:
            problems.append(f"  {name}: {page} gives the labels "
                            f"{', '.join(sorted(page_labels)) or '(none)'}; it has "
                            f"{', '.join(sorted(labels)) or '(none)'}")
    check("\n".join(filter(None, problems)))


# -- errcodes ---------------------------------------------------------------------------------

ERRCODES_PAGE = REFERENCE / "errcodes.md"
WECHAT_PAGE = REFERENCE / "wechat.md"
#: The words of the page's kind column → keeper.core.errcodes' kinds.
KIND_WORDS = {"re-authorization": "reauth", "bad code": "bad_code",
              "stale access token": "stale_token", "profile only": "profile_only",
              "app": "app", "quota": "quota", "transient": "transient", "keeper bug": "bug"}
ANY_OTHER = "any other"


def errcodes_in(cell: str) -> list[int | str]:
    """``40002, 40035, 41001-41009`` (the page's range has an en dash) or ``40013 / 40125``
    → the codes; ``any other`` stays."""
    if cell.strip().lower() == ANY_OTHER:
        return [ANY_OTHER]
    codes: list[int | str] = []
    for first, last in re.findall(r"(-?\d+)(?:\s*[\u2013-]\s*(\d+))?", cell):
        codes += range(int(first), int(last or first) + 1)
    return codes


def test_the_errcodes_page_gives_each_errcode_its_kind_on_each_endpoint() -> None:
    from keeper.core.errcodes import ENDPOINTS, TABLE, UNKNOWN, meaning

    page = "docs/reference/errcodes.md"
    # A code on an endpoint none of its rows names is "any other" there.
    code = {f"{c} on {e}: {meaning(e, c).kind}"
            for row in TABLE for c in row.codes for e in ENDPOINTS
            if meaning(e, c) is not UNKNOWN}
    code |= {f"{ANY_OTHER} on {e}: {UNKNOWN.kind}" for e in UNKNOWN.endpoints}
    documented: set[str] = set()
    problems = []
    for header, body in tables(ERRCODES_PAGE):
        if header[:3] != ["errcode", "endpoints", "kind"]:
            continue
        for cells in body:
            kind = KIND_WORDS.get(cells[2])
            if kind is None:
                problems.append(f"  {page}: the kind {cells[2]!r} is none of "
                                f"{', '.join(KIND_WORDS)}")
            endpoints = ENDPOINTS if cells[1] == "all" else [
                e.strip() for e in cells[1].split(",")]
            for c in errcodes_in(cells[0]):
                for e in endpoints:
                    said = [d for d in documented if d.startswith(f"{c} on {e}:")]
                    if said:
                        problems.append(f"  {page} gives {c} on {e} twice")
                    documented.add(f"{c} on {e}: {kind}")
    check("\n".join(filter(None, [
        differ(page, "errcodes (on an endpoint: the kind)", "keeper/core/errcodes.py", code,
               documented), *problems])))


def test_the_wechat_page_lists_the_errcodes_keeper_knows() -> None:
    from keeper.core.errcodes import TABLE

    page = "docs/reference/wechat.md"
    listed: set[int | str] = set()
    for header, body in tables(WECHAT_PAGE):
        if header[0] == "errcode":
            for cells in body:
                listed |= set(errcodes_in(cells[0]))
    check(differ(page, "errcodes", "keeper/core/errcodes.py",
                 {c for row in TABLE for c in row.codes} | {ANY_OTHER}, listed))


# -- HTTP API ---------------------------------------------------------------------------------

HTTP_PAGE = REFERENCE / "http-api.md"
#: Statuses keeper serve answers that neither the OpenAPI document describes nor
#: answered_errors finds written in keeper/api/, and why.
#: Statuses the page may list that neither the document nor keeper/api/ has (none today: the
#: 431 that keeper.api.protocol writes before a request reaches the application is in both).
OUTSIDE_THE_DOCUMENT: dict[int, str] = {}


def openapi() -> dict[str, Any]:
    import json

    from keeper.api.openapi import document
    from keeper.clock import utcnow

    config = build_config({"apps": [{"appid": "wx1"}]}, env={}, source="test.toml")
    doc: dict[str, Any] = json.loads(document(config, utcnow()))
    return doc


def answered_errors(doc: dict[str, Any]) -> dict[int, set[str]]:
    """Each error status keeper serve answers → the ``error`` codes known to come with it: those
    the document's answers name (backticked, less the Error object's field names) and those
    keeper/api/ writes as literals: ``Problem(STATUS, "code", ...)``,
    ``unavailable("code", ...)`` (503) and ``{STATUS: "code"}`` tables."""
    fields = set(doc["components"]["schemas"]["Error"]["properties"])
    errors: dict[int, set[str]] = {}
    for ops in doc["paths"].values():
        for op in ops.values():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    named = set(re.findall(r"`([a-z_]+)`", answer["description"])) - fields
                    errors.setdefault(int(status), set()).update(named)
    for path in sorted((ROOT / "keeper" / "api").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs: list[tuple[Any, Any]] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
                if node.func.id == "Problem" and len(args) >= 2:
                    pairs.append((args[0], args[1]))
                elif node.func.id == "unavailable" and args:
                    pairs.append((503, args[0]))
            elif isinstance(node, ast.Dict):
                pairs += [(k.value, v.value) for k, v in zip(node.keys, node.values, strict=True)
                          if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)]
            for status, code in pairs:
                if isinstance(status, int) and 400 <= status < 600 and isinstance(code, str):
                    errors.setdefault(status, set()).add(code)
    return errors


def api_strings() -> set[str]:
    """Every string literal in keeper/api/."""
    return {n.value for path in (ROOT / "keeper" / "api").glob("*.py")
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_the_http_api_page_lists_every_operation_with_its_scope() -> None:
    doc = openapi()
    page = "docs/reference/http-api.md"
    served: dict[str, tuple[str, set[str]]] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            scope = re.search(r"scope `(\w+)`", op.get("description", ""))
            served[f"{method.upper()} {path}"] = (
                scope[1] if scope and op["security"] else "none",
                {p["name"] for p in op.get("parameters", ()) if p["in"] == "query"})
    documented: dict[str, tuple[str, set[str]]] = {}
    for header, body in tables(HTTP_PAGE):
        if header[0] == "method and path":
            for cells in body:
                written = ticked(cells[0])[0]
                operation = re.split(r"[\[?]", written)[0]
                documented[operation] = (cells[1], set(re.findall(r"[?&](\w+)=", written)))
    problems = [differ(page, "operations", "/openapi.json", served, documented)]
    for operation in sorted(set(served) & set(documented)):
        (scope, query), (page_scope, page_query) = served[operation], documented[operation]
        if scope != page_scope:
            problems.append(f"  {operation}: {page} says the scope {page_scope}; it needs "
                            f"{scope}")
        if query != page_query:
            problems.append(f"  {operation}: {page} writes the query parameters "
                            f"{', '.join(sorted(page_query)) or '(none)'}; it takes "
                            f"{', '.join(sorted(query)) or '(none)'}")
    check("\n".join(filter(None, problems)))


def test_the_http_api_page_lists_every_error() -> None:
    doc = openapi()
    page = "docs/reference/http-api.md"
    fields = set(doc["components"]["schemas"]["Error"]["properties"])
    documented: dict[int, set[str]] = {}
    for header, body in tables(HTTP_PAGE):
        if header[0] == "status":
            for cells in body:
                documented[int(cells[0])] = {c for c in ticked(cells[1])
                                             if re.fullmatch(r"[a-z_]+", c)} - fields
    answered = answered_errors(doc)
    known = set(answered)  # described by the document, or written in keeper/api/
    problems = [differ(page, "error statuses",
                       "/openapi.json and keeper/api/ (and OUTSIDE_THE_DOCUMENT)",
                       known | set(OUTSIDE_THE_DOCUMENT), documented)]
    problems += [f"  {status}: /openapi.json or keeper/api/ has it now; remove it from "
                 "OUTSIDE_THE_DOCUMENT" for status in sorted(known & set(OUTSIDE_THE_DOCUMENT))]
    for status, codes in sorted(answered.items()):
        if codes - documented.get(status, set()):
            problems.append(f"  {status}: {page} lacks the error "
                            f"{', '.join(sorted(codes - documented.get(status, set())))}")
    strings = api_strings()
    for status, codes in sorted(documented.items()):
        if codes - strings:
            problems.append(f"  {status}: {page} lists the error "
                            f"{', '.join(sorted(codes - strings))}, which keeper/api/ never "
                            "writes")
    check("\n".join(filter(None, problems)))
