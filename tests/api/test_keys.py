"""API keys: made once, kept as digests, found in constant time, read again on change."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from keeper.api.keys import KeyRing, new_key, parse_keys
from keeper.errors import ConfigError, UsageError


def test_a_new_key_is_32_random_bytes_and_its_line_holds_only_the_digest() -> None:
    key, line = new_key("shop", "read,tokens")
    name, scopes, digest = line.split()
    assert (name, scopes) == ("shop", "tokens,read")  # in the canonical order
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith("kpr_") and len(key) == 4 + 43 and key not in line
    assert len({new_key("shop", "read")[0] for _ in range(100)}) == 100


@pytest.mark.parametrize("name,scopes", [("", "read"), ("a b", "read"), ("x" * 65, "read"),
                                         ("ok", ""), ("ok", "admin"), ("ok", "read,,write")])
def test_bad_names_and_scopes_are_usage_errors(name: str, scopes: str) -> None:
    with pytest.raises(UsageError):
        new_key(name, scopes)


@pytest.mark.parametrize("text,where", [
    ("shop read\n", "line 1"),
    ("# c\n\nshop read sha256:" + "0" * 63 + "\n", "line 3"),
    ("shop admin sha256:" + "0" * 64, "line 1"),
    ("a read sha256:" + "0" * 64 + "\na read sha256:" + "1" * 64, "line 2"),
    ("kpr_thisisakey", "line 1"),
])
def test_bad_keys_file_lines_are_named_by_number(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_keys(text, "api-keys")


def test_keys_are_found_by_digest_and_the_file_is_read_again_when_it_changes(
    tmp_path: Path,
) -> None:
    a, line_a = new_key("a", "tokens")
    b, line_b = new_key("b", "read,grants")
    path = tmp_path / "api-keys"
    path.write_text(f"# keys\n{line_a}  # the shop\n")
    ring = KeyRing(path, recheck_s=0)
    found = ring.find(a)
    assert found is not None and found.name == "a" and found.scopes == {"tokens"}
    assert ring.find(b) is None and ring.find("") is None and ring.find(a + "x") is None
    assert ring.find("k" * 10_000) is None

    path.write_text(f"{line_b}\n")
    os.utime(path, ns=(1, 1))  # a change the size and inode alone might not show
    assert ring.find(a) is None and ring.find(b) is not None
    path.write_text("garbage\n")  # a bad file keeps the keys read before
    assert ring.find(b) is not None
    path.unlink()
    assert ring.find(b) is not None


def test_a_missing_or_bad_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        KeyRing(tmp_path / "none")
    (tmp_path / "bad").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyRing(tmp_path / "bad")
