"""Configuration: defaults from the contract, one clear line naming the key for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper.config import build_config, load_config, parse_duration
from keeper.core.quota import Quota
from keeper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def build(data: dict[str, object], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return build_config(data, env=env or {}, source="test.toml")


def test_the_shipped_file_is_valid_and_holds_the_contract_defaults() -> None:
    c = load_config(str(ROOT / "config" / "keeper.toml"), env={})
    assert c.database_url == "sqlite:///var/keeper.db"
    assert c.api_base == "https://api.weixin.qq.com"
    assert c.avatar_hosts == ("wx.qlogo.cn", "thirdwx.qlogo.cn")
    assert (c.sweep_interval_s, c.profile_interval_s, c.workers) == (60, 86400, 32)
    assert c.userinfo_lang == "zh_CN"


def test_an_empty_file_means_the_defaults() -> None:
    c = build({})
    assert c.workers == 32 and c.apps == () and str(c.avatar_dir) == "var/avatars"


def test_apps_get_default_quotas_and_refresh_days() -> None:
    c = build({"apps": [{"appid": "wx1", "secret_env": "S"}]}, {"S": "secret-value"})
    app = c.app("wx1")
    assert app.secret == "secret-value" and app.secret_source == "env S"
    assert (app.refresh_token_days, app.refresh_at_day) == (30, 29)
    assert app.quotas["code"] == Quota(10000, 60)
    assert app.quotas["refresh"] == Quota(50000, 60)
    assert app.quotas["userinfo"] == Quota(50000, 60)
    assert app.quotas["auth"] is None


def test_quotas_are_configurable_globally_and_per_app() -> None:
    c = build({"quotas": {"refresh": "20/2 seconds", "auth": "100/minute"},
               "apps": [{"appid": "wx1"}, {"appid": "wx2", "quotas": {"refresh": "none"}}]})
    assert c.app("wx1").quotas["refresh"] == Quota(20, 2)
    assert c.app("wx1").quotas["auth"] == Quota(100, 60)
    assert c.app("wx2").quotas["refresh"] is None


def test_durations_take_seconds_and_suffixes() -> None:
    assert parse_duration(90, "k") == 90
    assert parse_duration("15m", "k") == 900
    assert parse_duration("24h", "k") == 86400
    assert parse_duration("29d", "k") == 29 * 86400
    assert build({"profile_interval": 0}).profile_interval_s == 0


def test_environment_overrides_the_file() -> None:
    c = build({"database_url": "sqlite:///a.db", "api_base": "http://x"},
              {"KEEPER_DATABASE_URL": "sqlite:///b.db", "KEEPER_API_BASE": "http://127.0.0.1:9"})
    assert c.database_url == "sqlite:///b.db" and c.api_base == "http://127.0.0.1:9"


def test_a_secret_file_is_read_and_a_relative_one_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "wx1.secret").write_text("from-credentials\n")
    c = build({"apps": [{"appid": "wx1", "secret_file": "wx1.secret"}]},
              {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert c.app("wx1").secret == "from-credentials"


def test_a_missing_secret_is_not_fatal_until_a_code_exchange_needs_it() -> None:
    c = build({"apps": [{"appid": "wx1", "secret_env": "MISSING"}]})
    assert c.app("wx1").secret is None
    assert "unavailable" in c.redacted()["apps"][0]["secret_source"]


def test_redacted_config_hides_passwords_and_secrets() -> None:
    c = build({"apps": [{"appid": "wx1", "secret_env": "S"}]},
              {"S": "topsecretvalue",
               "KEEPER_DATABASE_URL": "postgresql+psycopg://keeper:hunter22@db/keeper"})
    text = repr(c.redacted()) + repr(c)
    assert "hunter22" not in text and "topsecretvalue" not in text


@pytest.mark.parametrize(("data", "key"), [
    ({"wrokers": 3}, "wrokers"),
    ({"workers": "many"}, "workers"),
    ({"workers": 0}, "workers"),
    ({"sweep_interval": "soon"}, "sweep_interval"),
    ({"profile_interval": -5}, "profile_interval"),
    ({"userinfo_lang": "fr"}, "userinfo_lang"),
    ({"avatar_hosts": "wx.qlogo.cn"}, "avatar_hosts"),
    ({"quotas": {"refresh": "lots"}}, "quotas.refresh"),
    ({"quotas": {"sms": "1/minute"}}, "quotas.sms"),
    ({"api_base": "ftp://x"}, "api_base"),
    ({"apps": [{"secret_env": "S"}]}, "apps[0].appid"),
    ({"apps": [{"appid": "wx1", "secret": "inline"}]}, "apps[wx1].secret"),
    ({"apps": [{"appid": "wx1", "refresh_at_day": 30}]}, "apps[wx1].refresh_at_day"),
    ({"apps": [{"appid": "wx1"}, {"appid": "wx1"}]}, "apps[wx1]"),
    ({"log_level": "loud"}, "log_level"),
])
def test_bad_values_are_refused_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(data)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("workers = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad), env={})


def test_the_config_path_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("workers = 3\n")
    assert load_config(None, env={"KEEPER_CONFIG": str(path)}).workers == 3


@pytest.mark.parametrize(("data", "key"), [
    ({"database_url": "postgresql+psycopg://keeper:hunter22@db/keeper"}, "database_url"),
    ({"apps": [{"appid": "wx1", "refresh_at_day": "0123456789abcdef0123456789abcdef"}]},
     "apps[0].refresh_at_day"),
    ({"avatar_dir": "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE="}, "avatar_dir"),
])
def test_a_file_holding_a_secret_is_refused(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(data)
    assert key in str(e.value) and "hunter22" not in str(e.value)


def test_encryption_key_files_resolve_like_secret_files(tmp_path: Path) -> None:
    (tmp_path / "keeper.key").write_text("x")
    c = build({"encryption_key_file": ["keeper.key", "/abs/old.key"]},
              {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert c.encryption_key_files == (tmp_path / "keeper.key", Path("/abs/old.key"))


def test_a_file_that_is_not_utf8_is_one_clear_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'userinfo_lang = "\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        load_config(str(bad), env={})
    assert str(bad) in str(e.value)


def test_a_file_nested_too_deeply_is_one_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.toml"):
        load_config(str(deep), env={})


def test_a_secret_file_that_is_not_utf8_only_makes_the_secret_unavailable(
    tmp_path: Path,
) -> None:
    (tmp_path / "wx1.secret").write_bytes(b"\xff\xfe secret")
    c = build({"apps": [{"appid": "wx1", "secret_file": str(tmp_path / "wx1.secret")}]})
    app = c.app("wx1")
    assert app.secret is None
    assert "not UTF-8" in app.secret_source and str(tmp_path / "wx1.secret") in app.secret_source


def test_an_unreadable_secret_file_says_why_in_its_source(tmp_path: Path) -> None:
    c = build({"apps": [{"appid": "wx1", "secret_file": str(tmp_path)}]})  # a directory
    assert c.app("wx1").secret is None
    assert "cannot be read" in c.app("wx1").secret_source


@pytest.mark.parametrize(("data", "key"), [
    ({"access_margin": "2h"}, "access_margin"),
    ({"access_margin": 7200}, "access_margin"),
    ({"profile_interval": float("inf")}, "profile_interval"),
    ({"profile_interval": float("nan")}, "profile_interval"),
    ({"sweep_interval": "9" * 400}, "sweep_interval"),
    ({"lease": 10**18}, "lease"),
    ({"apps": [{"appid": "wx1", "refresh_token_days": float("inf")}]},
     "apps[wx1].refresh_token_days"),
    ({"apps": [{"appid": "wx1", "refresh_at_day": float("nan")}]},
     "apps[wx1].refresh_at_day"),
    ({"quotas": {"refresh": "5/" + "9" * 400 + " seconds"}}, "quotas.refresh"),
    ({"quotas": {"refresh": "9" * 5000 + "/minute"}}, "quotas.refresh"),
    ({"avatar_dir": "var/\x00avatars"}, "avatar_dir"),
    ({"journal_dir": 5}, "journal_dir"),
    ({"encryption_key_file": ["keeper.key", "a\x00b"]}, "encryption_key_file"),
    ({"apps": [{"appid": "wx1", "secret_file": "s\x00"}]}, "apps[wx1].secret_file"),
    ({"database_url": "not a url"}, "database_url"),
    ({"api_base": "http://host/\x07"}, "api_base"),
])
def test_values_out_of_range_are_refused_naming_the_key(
    data: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as e:
        build(data)
    assert key in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 300


def test_an_access_margin_shorter_than_the_token_life_is_taken() -> None:
    assert build({"access_margin": "119m"}).access_margin_s == 119 * 60


def test_unknown_keys_that_are_not_plain_names_are_quoted_on_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        build({"": [], "a\nb": 1, "quotas": {}})
    assert "\n" not in str(e.value) and "'a\\nb'" in str(e.value)


def test_the_api_table_defaults_to_loopback_and_a_keys_file_beside_the_config(
    tmp_path: Path,
) -> None:
    c = build_config({}, env={}, source=str(tmp_path / "keeper.toml"))
    assert (c.api.host, c.api.port, c.api.socket) == ("127.0.0.1", 8790, None)
    assert c.api.keys_file == tmp_path / "api-keys"
    assert c.access_refresh == "ahead" and c.api.processes == 1


def test_the_keys_file_is_looked_up_among_systemd_credentials_first(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-keys").write_text("")
    c = build_config({"api": {"keys_file": "api-keys"}}, env={"CREDENTIALS_DIRECTORY":
                     str(creds)}, source=str(tmp_path / "keeper.toml"))
    assert c.api.keys_file == creds / "api-keys"


@pytest.mark.parametrize("listen,where", [
    ("0.0.0.0:80", ("0.0.0.0", 80, None)),  # noqa: S104  (what the operator wrote)
    ("[::1]:8790", ("::1", 8790, None)),
    ("localhost:1", ("localhost", 1, None)),
    ("unix:/run/keeper-api/api.sock", (None, None, Path("/run/keeper-api/api.sock"))),
])
def test_api_listen_takes_host_port_or_a_unix_socket(
    listen: str, where: tuple[object, ...]
) -> None:
    api = build({"api": {"listen": listen}}).api
    assert (api.host, api.port, api.socket) == where


@pytest.mark.parametrize("data,key", [
    ({"api": {"listen": "8790"}}, "api.listen"),
    ({"api": {"listen": "host:0"}}, "api.listen"),
    ({"api": {"listen": "host:70000"}}, "api.listen"),
    ({"api": {"listen": "[zz::1]:80"}}, "api.listen"),
    ({"api": {"listen": "unix:api.sock"}}, "api.listen"),
    ({"api": {"listen": 8790}}, "api.listen"),
    ({"api": {"processes": 0}}, "api.processes"),
    ({"api": {"threads": True}}, "api.threads"),
    ({"api": {"token_wait": "1h"}}, "api.token_wait"),
    ({"api": {"keys_file": ""}}, "api.keys_file"),
    ({"api": {"key": "x"}}, "api.key"),
    ({"api": "on"}, "api"),
    ({"access_refresh": "lazy"}, "access_refresh"),
])
def test_bad_api_values_are_refused_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(data)
    assert str(e.value).startswith(key) or str(e.value).endswith(key), str(e.value)


def test_webhooks_take_their_secret_from_credentials_first_and_default_to_every_event(
    tmp_path: Path,
) -> None:
    from keeper.core.events import TYPES

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook_shop").write_text("whsec-from-credentials\n")
    (tmp_path / "webhook_shop").write_text("whsec-beside-the-file\n")
    example = (ROOT / "config" / "keeper.toml").read_text().split("# [[webhooks]]")[1]
    table = "[[webhooks]]\n" + "\n".join(line[2:] for line in example.splitlines()
                                          if line.startswith("# "))
    import tomllib

    data = tomllib.loads(table)
    c = build_config(data, env={"CREDENTIALS_DIRECTORY": str(creds)},
                     source=str(tmp_path / "keeper.toml"))
    (hook,) = c.webhooks
    assert hook.secret == "whsec-from-credentials" and hook.events == frozenset(TYPES)
    assert hook.timeout_s == 10 and len(hook.key) == 12 and hook.host == "shop.example.com"
    assert "whsec" not in repr(hook) and "shop.example.com/hooks" not in repr(c)
    assert c.redacted()["webhooks"] == [{
        "key": hook.key, "host": "shop.example.com", "events": sorted(TYPES),
        "secret_source": f"file {creds / 'webhook_shop'}", "timeout_s": 10.0}]
    c = build_config(data, env={}, source=str(tmp_path / "keeper.toml"))
    assert c.webhooks[0].secret == "whsec-beside-the-file"
    assert c.events_retention_s == 7 * 86400


def test_the_same_webhook_url_twice_is_refused() -> None:
    hook = {"url": "https://a/h", "secret_env": "S"}
    with pytest.raises(ConfigError, match=r"webhooks\[1\].url: the same url as webhooks\[0\]"):
        build_config({"webhooks": [hook, hook]}, env={"S": "x" * 10}, source="t")


@pytest.mark.parametrize(("hook", "env", "content", "key", "reason"), [
    ({"secret_env": "HOOK_S"}, {}, None, "webhooks[0].secret_env",
     "the environment variable HOOK_S is not set or empty"),
    ({"secret_env": "HOOK_S"}, {"HOOK_S": " \n"}, None, "webhooks[0].secret_env",
     "the environment variable HOOK_S is not set or empty"),
    ({"secret_file": "hook.secret"}, {}, None, "webhooks[0].secret_file",
     "cannot be read: No such file or directory"),
    ({"secret_file": "hook.secret"}, {}, b"\n", "webhooks[0].secret_file", "is empty"),
    ({"secret_file": "hook.secret"}, {}, b"\xff\xfe whsec", "webhooks[0].secret_file",
     "is not UTF-8 text"),
    ({"secret_file": "."}, {}, None, "webhooks[0].secret_file",
     "cannot be read: Is a directory"),
])
def test_a_webhook_secret_that_cannot_be_read_is_loaded_as_missing_and_said_by_the_senders(
    tmp_path: Path, hook: dict[str, str], env: dict[str, str], content: bytes | None, key: str,
    reason: str,
) -> None:
    """Only a process that sends needs a webhook's secret: the configuration loads without
    it, and the check the senders make names the key, the source and the webhook (by key and
    host, never by its url, whose query string may hold a secret)."""
    if content is not None:
        (tmp_path / "hook.secret").write_bytes(content)
    url = "https://hooks.example.com/keeper-in?token=QSECRET"
    c = build_config({"webhooks": [{"url": url, **hook}]}, env=env,
                     source=str(tmp_path / "keeper.toml"))
    (h,) = c.webhooks
    assert h.secret is None
    assert h.secret_problem is not None and h.secret_problem.startswith(key)
    assert reason in h.secret_problem
    assert c.redacted()["webhooks"][0]["secret_source"].endswith("(unavailable)")
    from keeper.config.webhooks import require_secrets

    require_secrets(())  # no webhook: nothing to sign
    with pytest.raises(ConfigError) as e:
        require_secrets(c.webhooks)
    message = str(e.value)
    assert message.startswith(key) and reason in message, message
    assert h.key in message and "hooks.example.com" in message
    assert "QSECRET" not in message and "keeper-in" not in message and "\n" not in message
    if "secret_file" in hook:
        assert str(tmp_path / hook["secret_file"]) in message  # where it was looked for


def test_every_webhook_whose_secret_is_missing_is_named_in_one_line() -> None:
    c = build({"webhooks": [{"url": "https://a.example/h", "secret_env": "A"},
                            {"url": "https://b.example/h", "secret_env": "B"},
                            {"url": "https://c.example/h", "secret_env": "C"}]},
              {"B": "whsec-b-is-here"})
    assert [h.secret for h in c.webhooks] == [None, "whsec-b-is-here", None]
    from keeper.config.webhooks import require_secrets

    with pytest.raises(ConfigError) as e:
        require_secrets(c.webhooks)
    assert "webhooks[0].secret_env" in str(e.value) and "webhooks[2].secret_env" in str(e.value)
    assert "webhooks[1]" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("hook", "error"), [
    ({"events": ["reauth.lost"]}, "webhooks[0].events: unknown event type 'reauth.lost'"),
    ({"timeout": 0}, "webhooks[0].timeout: expected"),
    ({"colour": "red"}, "unknown configuration key: webhooks[0].colour"),
])
def test_a_malformed_webhook_is_refused_even_when_its_secret_is_missing_too(
    hook: dict[str, object], error: str,
) -> None:
    """A malformed table is a configuration error for every command, whether or not its
    secret can be read."""
    with pytest.raises(ConfigError) as e:
        build({"webhooks": [{"url": "https://x.example/", "secret_env": "UNSET", **hook}]})
    assert error in str(e.value)


def test_the_same_webhook_url_twice_is_refused_even_without_its_secret() -> None:
    hook = {"url": "https://a/h", "secret_env": "UNSET"}
    with pytest.raises(ConfigError, match=r"webhooks\[1\].url: the same url as webhooks\[0\]"):
        build({"webhooks": [hook, hook]})


def test_an_app_secret_that_cannot_be_read_says_where_it_was_looked_for(
    tmp_path: Path,
) -> None:
    c = build({"apps": [{"appid": "wx1", "secret_env": "MISSING"},
                        {"appid": "wx2", "secret_file": str(tmp_path / "none")},
                        {"appid": "wx3"},
                        {"appid": "wx4", "secret_env": "S"}]}, {"S": "secret-value"})
    assert c.app("wx1").secret_problem == ("apps[wx1].secret_env: the environment variable "
                                           "MISSING is not set or empty")
    assert c.app("wx2").secret_problem == (f"apps[wx2].secret_file: {tmp_path / 'none'} cannot "
                                           "be read: No such file or directory")
    assert c.app("wx3").secret_problem == "apps[wx3]: neither secret_env nor secret_file is given"
    assert c.app("wx4").secret_problem is None
