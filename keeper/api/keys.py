"""API keys: made by ``keeper api-key``, kept by the operator as SHA-256 digests only.

A key is 32 random bytes (``kpr_`` + 43 base64url characters), shown once. The keys file has
one key per line, ``NAME SCOPES sha256:HEX`` (``#`` starts a comment), so a leaked keys file
opens nothing. A presented key is hashed and compared with every digest in constant time. The
file is read again when it changes (checked at most once a second), so keys are added and
revoked without a restart; a file that turns bad keeps the keys read before, and says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from keeper.errors import ConfigError, UsageError

log = structlog.get_logger("keeper.api")

SCOPES = ("tokens", "grants", "read")
PREFIX = "kpr_"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
#: Longer ``Authorization`` values are refused before hashing: no key is that long.
MAX_KEY_CHARS = 256


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key(name: str, scopes: str) -> tuple[str, str]:
    """A new key and its keys-file line. ``UsageError`` names what is wrong."""
    if not _NAME.match(name):
        raise UsageError(f"--name: expected 1-64 letters, digits or _.@-, got {name[:70]!r}")
    wanted = parse_scopes(scopes, "--scopes")
    key = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return key, f"{name} {','.join(s for s in SCOPES if s in wanted)} " \
                f"sha256:{digest_of(key).hex()}"


def parse_scopes(text: str, where: str) -> frozenset[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise UsageError(f"{where}: expected a comma-separated list of {', '.join(SCOPES)}, "
                         f"got {text[:70]!r}")
    return frozenset(scopes)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The keys of a keys file; ``ConfigError`` naming the line of a bad one."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}, line {number}"
        if len(fields) != 3:
            raise ConfigError(f"{where}: expected NAME SCOPES sha256:HEX (the line "
                              "`keeper api-key` printed; never a key itself)")
        name, scope_text, digest = fields
        if not _NAME.match(name):
            raise ConfigError(f"{where}: bad key name")
        if name in names:
            raise ConfigError(f"{where}: the name {name} is used twice")
        try:
            scopes = parse_scopes(scope_text, where)
        except UsageError as e:
            raise ConfigError(str(e)) from None
        m = _DIGEST.match(digest)
        if not m:
            raise ConfigError(f"{where}: expected sha256: and 64 lowercase hex digits")
        names.add(name)
        keys.append(ApiKey(name, scopes, bytes.fromhex(m[1])))
    return keys


class KeyRing:
    """The keys of one keys file, read again when it changes."""

    def __init__(self, path: Path, *, recheck_s: float = 1.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._keys: list[ApiKey] = []
        self._broken: str | None = None
        self.load(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, *, strict: bool = False) -> None:
        """Read the file. ``strict`` (at start): a bad or missing file is a ``ConfigError``;
        later, the keys read before stay and the problem is logged once."""
        stamp = self._file_stamp()
        try:
            if stamp is None:
                raise ConfigError(f"api.keys_file: {self.path} does not exist (make a key: "
                                  "keeper api-key --name NAME --scopes tokens)")
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"api.keys_file: {self.path} cannot be read: "
                                  f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
            keys = parse_keys(text, str(self.path))
        except ConfigError as e:
            if strict:
                raise
            if self._broken != str(e):
                log.error("api.keys_refused", error=str(e), kept=len(self._keys))
            self._broken, self._stamp = str(e), stamp
            return
        if self._stamp is not None and not strict:
            log.info("api.keys_reloaded", keys=len(keys))
        self._keys, self._stamp, self._broken = keys, stamp, None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        with self._lock:
            if now - self._checked < self.recheck_s:
                return
            self._checked = now
            if self._file_stamp() != self._stamp:
                self.load()

    def find(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, compared in constant time with every digest."""
        self._maybe_reload()
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        digest = digest_of(presented)
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    def __len__(self) -> int:
        return len(self._keys)
