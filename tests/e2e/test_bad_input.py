"""Bad input never crashes keeper: one clear line, exit 2, and nothing good is lost.

The commands run in this process through ``keeper.cli.main.main`` (which returns the exit code), so
hypothesis can feed them many files quickly; stdout and stderr are captured.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper.cli.main import main
from keeper.config import load_config
from keeper.crypto import Cipher, load_keys
from keeper.errors import ConfigError, StoreError
from keeper.store.grants import Store
from keeper.store.rows import new_lease_id
from tests.conftest import APPID, config_text

NOW = datetime.now(UTC)
BOUNDED = settings(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]


@dataclass
class Setup:
    """A configuration file, its key and database, and a way to run ``keeper`` on them."""

    dir: Path
    config: Path
    db_url: str
    capsys: pytest.CaptureFixture[str]

    def run(self, *args: str, config: Path | None = None) -> Ran:
        self.capsys.readouterr()
        code = main(["--config", str(config or self.config), *args])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err, err
        assert "command.crashed" not in err, err
        return Ran(code, out, err)

    def store(self) -> Store:
        cipher = Cipher(load_keys([self.dir / "keeper.key"]))
        return Store(self.db_url, cipher=cipher, auto_upgrade=True).open()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures logging for a process; give the next test the logging it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def setup(tmp_path: Path, migrated_url: str, capsys: pytest.CaptureFixture[str]) -> Setup:
    (tmp_path / "keeper.key").write_text(Fernet.generate_key().decode() + "\n")
    config = tmp_path / "keeper.toml"
    config.write_text(config_text(db_url=migrated_url, api_base="http://127.0.0.1:9"))
    return Setup(tmp_path, config, migrated_url, capsys)


def grant_line(openid: str, *, token: str = "1", expires_in_s: float = 3600,
               issued_days_ago: float = 3, **extra: object) -> str:
    return json.dumps({
        "appid": APPID, "openid": openid, "access_token": f"TOK-A-{openid}-{token}",
        "refresh_token": f"TOK-R-{openid}-{token}", "scope": "snsapi_userinfo",
        "access_expires_at": int(NOW.timestamp() + expires_in_s),
        "refresh_issued_at": int(NOW.timestamp() - issued_days_ago * 86400), **extra,
    })


def import_file(setup: Setup, name: str, data: bytes) -> Ran:
    path = setup.dir / name
    path.write_bytes(data)
    return setup.run("import", "--json", str(path))


# -- the bad inputs the import must survive -------------------------------------------------


BAD_LINES = {
    "surrogate in openid": grant_line("o-bad").replace('"o-bad"', '"o\\ud800"'),
    "surrogate in token": grant_line("o-bad").replace('TOK-A-o-bad-1', 'TOK\\udfff'),
    "refresh issued in 9999": grant_line("o-bad", refresh_issued_at="9999-12-31T23:59:59Z"),
    "access expires in year 1": grant_line("o-bad", access_expires_at="0001-01-01T00:00:00Z"),
    "deep nesting": "[" * 100_000,
    "NUL in openid": grant_line("o-bad").replace('"o-bad"', '"o\\u0000x"'),
    "token over 512 bytes": grant_line("o-bad", access_token="TOK-" + "A" * 600),
    "not UTF-8": '{"appid": "\udcff"}',
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_line_is_one_log_line_and_its_neighbours_are_stored(
    setup: Setup, name: str
) -> None:
    body = "\n".join([grant_line("o-before"), BAD_LINES[name], grant_line("o-after")]) + "\n"
    ran = import_file(setup, "in.jsonl", body.encode("utf-8", "surrogateescape"))
    assert ran.code == 2, ran.err
    assert json.loads(ran.out) == {"imported": 2, "bad_lines": 1}
    bad = [e for e in ran.events() if e["event"] == "import.bad_line"]
    assert [e["line"] for e in bad] == [2]
    assert "TOK-" not in ran.err
    store = setup.store()
    try:
        assert store.get_grant(APPID, "o-before") is not None
        assert store.get_grant(APPID, "o-after") is not None
    finally:
        store.close()


def test_a_row_the_database_refuses_does_not_drop_its_batch(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a batch the database refuses because of one row, when it is imported, then the
    other rows are stored one by one and the refused one is a bad line by its number."""
    real = Store.upsert_grants

    def refuse_poison(self: Store, writes: Any, now: datetime) -> int:
        if any(w.grant.openid == "o-poison" for w in writes):
            raise StoreError("storing grants: DataError: refused")
        return real(self, writes, now)

    monkeypatch.setattr(Store, "upsert_grants", refuse_poison)
    lines = [grant_line(f"o{i}") for i in range(5)]
    lines[3] = grant_line("o-poison")
    ran = import_file(setup, "in.jsonl", ("\n".join(lines) + "\n").encode())
    assert ran.code == 2
    assert json.loads(ran.out) == {"imported": 4, "bad_lines": 1}
    assert [e["line"] for e in ran.events() if e["event"] == "import.bad_line"] == [4]
    store = setup.store()
    try:
        assert [store.get_grant(APPID, f"o{i}") is not None for i in range(5)] == [
            True, True, True, False, True]
    finally:
        store.close()


def test_an_input_file_that_cannot_be_read_is_exit_2_with_one_line(setup: Setup) -> None:
    ran = setup.run("import", str(setup.dir))  # a directory
    assert ran.code == 2
    refused = [e for e in ran.events() if e["event"] == "command.refused"]
    assert len(refused) == 1 and "cannot read" in refused[0]["error"]


def test_a_config_file_that_is_not_utf8_is_exit_2(setup: Setup) -> None:
    bad = setup.dir / "latin1.toml"
    bad.write_bytes(setup.config.read_bytes() + b'\n# caf\xe9\n')
    ran = setup.run("status", config=bad)
    assert ran.code == 2 and "not UTF-8" in ran.err and str(bad) in ran.err


def test_a_secret_file_that_is_not_utf8_only_fails_keeper_grant(setup: Setup) -> None:
    secret = setup.dir / "wx.secret"
    secret.write_bytes(b"\xff\xfe\x00s")
    config = setup.dir / "secret-file.toml"
    config.write_text(setup.config.read_text().replace(
        'secret_env = "KEEPER_TEST_SECRET"', f'secret_file = "{secret}"'))
    assert setup.run("status", config=config).code == 0
    ran = setup.run("grant", "--app", APPID, "CODE", config=config)
    assert ran.code == 2 and "not UTF-8" in ran.err


def test_a_key_file_that_cannot_be_read_is_exit_2(setup: Setup) -> None:
    (setup.dir / "keeper.key").write_bytes(b"\xff\xfe not a key")
    ran = setup.run("status")
    assert ran.code == 2 and "encryption_key_file" in ran.err
    (setup.dir / "keeper.key").write_text(Fernet.generate_key().decode() + "\n")
    assert setup.run("status").code == 0  # the database is made (and sealed) with this key
    (setup.dir / "keeper.key").write_text(Fernet.generate_key().decode() + "\n")
    assert setup.run("status").code == 2  # the wrong key


# -- keeper token while another process holds the grant -------------------------------------


def test_a_valid_token_is_returned_at_once_while_another_process_holds_the_grant(
    setup: Setup,
) -> None:
    """Given a grant leased by a process that crashed (its lease runs for an hour more) and an
    access token inside access_margin but valid for an hour, `keeper token` prints that token
    at once instead of waiting for the lease."""
    config = setup.dir / "margin.toml"
    config.write_text(setup.config.read_text().replace(
        'lease = "2m"', 'lease = "2m"\naccess_margin = "90m"'))
    assert import_file(setup, "in.jsonl", (grant_line("o1") + "\n").encode()).code == 0
    store = setup.store()
    try:
        assert store.claim_one(APPID, "o1", lease_id=new_lease_id(),
                               lease_s=3600, now=NOW) is not None
    finally:
        store.close()
    started = time.monotonic()
    ran = setup.run("token", "--app", APPID, "o1", config=config)
    assert (ran.code, ran.out) == (0, "TOK-A-o1-1\n"), ran.err
    assert time.monotonic() - started < 2  # it waited for nothing (the wait is 6 s)


def test_an_expired_token_still_waits_for_the_lease_holder(setup: Setup) -> None:
    assert import_file(setup, "in.jsonl",
                       (grant_line("o1", expires_in_s=30) + "\n").encode()).code == 0
    store = setup.store()
    try:
        store.claim_one(APPID, "o1", lease_id=new_lease_id(),
                        lease_s=3600, now=NOW)
    finally:
        store.close()
    config = setup.dir / "short.toml"
    config.write_text(setup.config.read_text().replace("read_timeout = 0.5",
                                                       "read_timeout = 0.001"))
    ran = setup.run("token", "--app", APPID, "o1", config=config)
    assert ran.code == 1 and "busy in another keeper process" in ran.err
    assert "TOK-" not in ran.out + ran.err


# -- keeper rotate-key --new ----------------------------------------------------------------


def test_a_new_key_needs_no_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no config/keeper.toml here
    monkeypatch.delenv("KEEPER_CONFIG", raising=False)
    assert main(["rotate-key", "--new"]) == 0
    key = capsys.readouterr().out.strip()
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"
    assert main(["--config", str(tmp_path / "missing.toml"), "rotate-key", "--new"]) == 0


def test_a_new_key_file_is_written_0600_and_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keeper.key"
    assert main(["rotate-key", "--new", "--output", str(path), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["path"] == str(path) and path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    assert Cipher(load_keys([path])).primary_id == written["key_id"]
    assert main(["rotate-key", "--new", "--output", str(path)]) == 2
    assert path.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keeper.key"]  # no temporary left


# -- arbitrary import files -----------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
TIMES = st.datetimes(min_value=datetime(2010, 1, 2), max_value=datetime(2030, 1, 1))
OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5))])


@st.composite
def times(draw: st.DrawFn, *, latest: datetime) -> object:
    when = draw(TIMES.map(lambda t: t.replace(tzinfo=UTC, microsecond=0)))
    when = min(when, latest.replace(microsecond=0))
    if draw(st.booleans()):
        return int(when.timestamp())
    return when.astimezone(draw(OFFSETS)).isoformat()


@st.composite
def valid_lines(draw: st.DrawFn) -> dict[str, object]:
    line: dict[str, object] = {
        "appid": APPID,
        "openid": draw(st.from_regex(r"gen-[A-Za-z0-9_-]{1,24}", fullmatch=True)),
        "access_token": "TOK-" + draw(st.text(PRINTABLE, min_size=1, max_size=500)),
        "refresh_token": "TOK-" + draw(st.text(PRINTABLE, min_size=1, max_size=500)),
        "scope": draw(st.sampled_from(["snsapi_base", "snsapi_userinfo",
                                       "snsapi_base,snsapi_userinfo"])),
        "access_expires_at": draw(times(latest=NOW + timedelta(days=300))),
        "refresh_issued_at": draw(times(latest=NOW - timedelta(hours=1))),
    }
    if draw(st.booleans()):
        line["unionid"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True))
    return line


ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=10,
)


@st.composite
def bad_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "json", "text", "bytes", "nested", "huge"]))
    if kind == "field":  # a valid line with one field made arbitrary
        line = draw(valid_lines())
        line["openid"] = "junk-" + str(line["openid"])
        line[draw(st.sampled_from(sorted(line)))] = draw(JSON_VALUES)
        return json.dumps(line).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "text":
        return draw(ANY_TEXT).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "nested":
        depth = draw(st.integers(min_value=500, max_value=100_000))
        return draw(st.sampled_from([b"[", b'{"a":', b"[{"])) * depth
    return b'{"access_expires_at": ' + b"9" * draw(st.integers(300, 70_000)) + b"}"


@given(lines=st.lists(st.one_of(valid_lines(), bad_lines()), max_size=8))
@BOUNDED
def test_any_import_file_stores_its_good_lines_and_touches_nothing_else(
    setup: Setup, lines: list[dict[str, object] | bytes]
) -> None:
    store = setup.store()
    try:
        store_baseline(setup, store)
        before = {g.openid: g for g in map(lambda o: store.get_grant(APPID, o), BASE) if g}
        good = {str(x["openid"]): x for x in lines if isinstance(x, dict)}  # the later wins
        body = b"\n".join(json.dumps(x).encode() if isinstance(x, dict) else x for x in lines)
        ran = import_file(setup, "fuzz.jsonl", body + b"\n")
        assert ran.code in (0, 2)
        if all(isinstance(x, dict) for x in lines):
            assert ran.code == 0, ran.err
        assert "TOK-" not in ran.err
        for openid, line in good.items():
            stored = store.get_grant(APPID, openid)
            assert stored is not None, (openid, ran.err)
            assert (stored.access_token, stored.refresh_token, stored.scope) == (
                line["access_token"], line["refresh_token"], line["scope"])
            assert stored.unionid == line.get("unionid")
            assert stored.access_expires_at == as_time(line["access_expires_at"])
            assert stored.refresh_issued_at == as_time(line["refresh_issued_at"])
        after = {o: store.get_grant(APPID, o) for o in BASE}
        assert after == before
    finally:
        store.close()


BASE = [f"base-{i}" for i in range(3)]


def store_baseline(setup: Setup, store: Store) -> None:
    if store.get_grant(APPID, BASE[0]) is None:
        body = "\n".join(grant_line(o) for o in BASE) + "\n"
        assert import_file(setup, "base.jsonl", body.encode()).code == 0


def as_time(value: object) -> datetime:
    if isinstance(value, int):
        return datetime.fromtimestamp(value, UTC)
    assert isinstance(value, str)
    return datetime.fromisoformat(value).astimezone(UTC)


# -- arbitrary configuration files ----------------------------------------------------------

KNOWN_KEYS = [
    "api_base", "avatar_dir", "avatar_hosts", "sweep_interval", "profile_interval", "workers",
    "userinfo_lang", "access_margin", "lease", "connect_timeout", "read_timeout", "log_level",
    "avatar_workers", "avatar_timeout", "avatar_max_bytes", "avatar_keep_when_removed",
    "database_timeout", "journal_dir", "quotas", "apps", "encryption_key_file",
]
TOML_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
TOML_VALUES = st.recursive(
    st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.floats()
    | TOML_TEXT | st.sampled_from(["15m", "2h", "9" * 40, "50000/minute", "none", "1e999"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["appid", "secret_env", "secret_file", "refresh",
                                       "refresh_token_days", "code", "x"]) | TOML_TEXT,
                      inner, max_size=3),
    max_leaves=8,
)


def toml_value(value: object) -> str:
    """``value`` written as TOML (strings as JSON-escaped basic strings, which TOML reads;
    non-ASCII raw, since TOML refuses JSON's surrogate pairs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else
                                             "-inf" if value == float("-inf") else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    keys = draw(st.dictionaries(st.sampled_from(KNOWN_KEYS) | TOML_TEXT, TOML_VALUES,
                                max_size=4))
    text = "\n".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in keys.items())
    return ('encryption_key_file = "keeper.key"\n' * ("encryption_key_file" not in keys)
            + text + "\n").encode()


@given(data=config_files())
@BOUNDED
def test_any_config_file_is_taken_or_refused_with_one_line(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    monkeypatch.setenv("KEEPER_DATABASE_URL", setup.db_url)
    path = setup.dir / "fuzz.toml"
    path.write_bytes(data)
    try:
        load_config(str(path))
    except ConfigError as e:
        assert "\n" not in str(e)
    ran = setup.run("status", "--json", config=path)
    assert ran.code in (0, 2), ran.err
    if ran.code == 2:
        assert len([e for e in ran.events() if e["level"] == "error"]) == 1
