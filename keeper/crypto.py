"""Tokens at rest: authenticated encryption with Fernet (AES-128-CBC + HMAC-SHA256), from the
``cryptography`` package; no home-made crypto.

Several keys may be configured: the first encrypts, every one decrypts (``MultiFernet``), so a
key is rotated by putting a new one first, running ``keeper rotate-key``, and then removing the
old one. Each stored token carries the id of the key that encrypted it (``key_id``), so rotation
knows what is left to do and can resume.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from keeper.errors import ConfigError

log = structlog.get_logger(__name__)

#: A known plaintext kept encrypted in the database, to tell a wrong key at start.
CHECK_PLAINTEXT = b"keeper key check v1"
#: Tokens a Cipher remembers (``decrypt(remember=True)``): a few sweeps' pages, and no token
#: longer than MAX_REMEMBERED_CHARS (a WeChat token's is about 250).
REMEMBERED = 4096
MAX_REMEMBERED_CHARS = 1024


class WrongKey(ConfigError):
    """The configured keys cannot decrypt what this database holds."""


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (not the key: a one-way hash of it)."""
    return hashlib.sha256(b"keeper-key-id:" + key).hexdigest()[:12]


def _parse_keys(text: str, source: str) -> list[bytes]:
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            raw = base64.urlsafe_b64decode(line.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{source}: line {number} is not a Fernet key "
                              "(44 url-safe base64 characters; see `keeper rotate-key --new`)")
        keys.append(line.encode("ascii"))
    return keys


def load_keys(paths: Sequence[Path]) -> list[bytes]:
    """Every key in ``paths``, in order (one key per line; ``#`` comments)."""
    keys: list[bytes] = []
    for path in paths:
        try:
            text = path.read_text(encoding="ascii")
        except OSError as e:
            raise ConfigError(f"encryption_key_file {path} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"encryption_key_file {path} is not a key file") from None
        keys.extend(_parse_keys(text, f"encryption_key_file {path}"))
    if not keys:
        raise ConfigError("encryption_key_file holds no key")
    return keys


def create_key_file(path: Path) -> None:
    """A new key file, mode 0600, never overwriting one that exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("# keeper's token encryption key: back it up apart from the database.\n")
        f.write(Fernet.generate_key().decode("ascii") + "\n")
    log.warning("encryption.key_created", path=str(path))


class Cipher:
    """Encrypts and decrypts token strings with the configured keys."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._fernets = [Fernet(k) for k in keys]
        self._multi = MultiFernet(self._fernets)
        self.ids = [key_id(k) for k in keys]
        self.primary_id = self.ids[0]
        #: Tokens lately decrypted with ``remember``, plaintext -> what the primary key made
        #: of it (first in, first out; see :meth:`decrypt`).
        self._sealed: dict[str, str] = {}
        self._sealed_lock = threading.Lock()

    def encrypt(self, plaintext: str) -> str:
        """``plaintext`` sealed with the primary key: what :meth:`decrypt` with ``remember``
        lately read for it, or a new token."""
        sealed = self._sealed.get(plaintext)
        if sealed is not None:
            return sealed
        return self._fernets[0].encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, *, remember: bool = False) -> str:
        """The plaintext of ``token``. ``remember``: if the primary key sealed it, the next
        :meth:`encrypt` of the same plaintext returns this very token rather than sealing it
        again (a sweep writes back every refresh token it read, and WeChat mostly answers a
        refresh with the same one: a Fernet encryption spared per refresh). Holds the last
        ``REMEMBERED`` tokens."""
        data = token.encode("ascii", "replace")
        try:
            if remember:
                try:
                    plaintext = self._fernets[0].decrypt(data).decode("utf-8")
                except InvalidToken:
                    pass
                else:
                    if len(token) <= MAX_REMEMBERED_CHARS:
                        self._remember(plaintext, token)
                    return plaintext
            return self._multi.decrypt(data).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError):
            raise WrongKey(
                "a stored token cannot be decrypted with the configured keys "
                "(wrong encryption_key_file, or a key was removed before `keeper rotate-key`)"
            ) from None

    def _remember(self, plaintext: str, token: str) -> None:
        with self._sealed_lock:
            self._sealed[plaintext] = token
            if len(self._sealed) > REMEMBERED:
                del self._sealed[next(iter(self._sealed))]

    def check_value(self) -> str:
        return self.encrypt(CHECK_PLAINTEXT.decode())

    def verify(self, check: str) -> None:
        """Raise :class:`WrongKey` unless ``check`` (from the database) decrypts."""
        if self.decrypt(check) != CHECK_PLAINTEXT.decode():
            raise WrongKey("the database's key check does not match")
