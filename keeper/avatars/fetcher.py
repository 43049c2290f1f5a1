"""Avatar copies: download a user's current avatar safely and keep it, content-addressed.

WeChat avatar URLs stop working when a user changes their picture, so keeper keeps its own copy.
Safe by construction: only ``avatar_hosts`` (exact match, http/https), at most 3 redirects and
each to an allowed host, the body read in chunks under a cap, the bytes checked to be a real
JPEG, PNG, GIF or WebP that decodes (with a pixel cap against decompression bombs), and nothing
from the URL or the openid in a file path: files are named by their SHA-256, sharded by its
first two bytes, and written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter

from keeper import __version__
from keeper.errors import KeeperError
from keeper.wechat.client import read_capped

MAX_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
#: Signature → (MIME type, file extension).
_KINDS = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
)
_PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF",
                "image/webp": "WEBP"}
_SIZE_SEGMENT = re.compile(r"/(\d+)$")


class AvatarRefused(KeeperError):
    """A download that keeper refused, with a short reason (never a token; URLs are logged
    by host only)."""


@dataclass(frozen=True)
class Saved:
    """An avatar file on disk. ``path`` is relative to ``avatar_dir``."""

    sha256: str
    path: str
    size: int
    mime: str
    url: str


def largest(url: str) -> str:
    """The 640x640 variant: WeChat's trailing size segment set to 0."""
    return _SIZE_SEGMENT.sub("/0", url) if _SIZE_SEGMENT.search(url) else url


def sniff(data: bytes) -> tuple[str, str]:
    """(MIME type, extension) from the file signature, or AvatarRefused."""
    for magic, mime, ext in _KINDS:
        if data.startswith(magic):
            return mime, ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    raise AvatarRefused("not a JPEG, PNG, GIF or WebP image")


def check_image(data: bytes, mime: str, *, max_pixels: int = MAX_PIXELS) -> None:
    """The bytes decode as the image their signature says, within the pixel cap."""
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[mime]]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise AvatarRefused(f"image of {width}x{height} pixels is over the cap")
            image.load()  # a full decode: truncated or corrupt data fails here
    except AvatarRefused:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError):
        raise AvatarRefused("image does not decode (damaged or truncated)") from None


class Fetcher:
    """Downloads avatars with its own connection pools, timeouts and concurrency limit."""

    def __init__(
        self, *, hosts: tuple[str, ...], avatar_dir: Path, connect_timeout_s: float = 3.0,
        read_timeout_s: float = 5.0, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
        concurrency: int = 4,
    ) -> None:
        self.hosts = frozenset(h.lower() for h in hosts)
        self.avatar_dir = avatar_dir
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.slots = threading.BoundedSemaphore(concurrency)
        self._local = threading.local()
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb guard, at our cap

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.headers["User-Agent"] = f"keeper/{__version__}"
            adapter = HTTPAdapter(pool_connections=2, pool_maxsize=2, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def allowed(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise AvatarRefused(f"scheme {parts.scheme or '(none)'} is not http or https")
        host = (parts.hostname or "").lower()
        if host not in self.hosts:
            raise AvatarRefused(f"host {host or '(none)'} is not in avatar_hosts")

    def download(self, url: str) -> bytes:
        """The body at ``url``, redirects followed only to allowed hosts."""
        for _ in range(MAX_REDIRECTS + 1):
            self.allowed(url)
            failure: str | None = None
            location: str | None = None
            body = b""
            try:
                with self._session().get(url, timeout=self.timeout, stream=True,
                                         allow_redirects=False) as resp:
                    if resp.is_redirect:
                        location = urljoin(url, resp.headers.get("Location", ""))
                    elif resp.status_code != 200:
                        failure = f"HTTP {resp.status_code}"
                    else:
                        capped = read_capped(resp, self.max_bytes, _CHUNK)
                        if capped is None:
                            failure = f"larger than {self.max_bytes} bytes"
                        else:
                            body = capped
            except requests.Timeout:
                failure = "timeout"
            except requests.RequestException as e:
                failure = f"download failed ({type(e).__name__})"
            if failure is not None:
                raise AvatarRefused(failure)
            if location is None:
                return body
            url = location
        raise AvatarRefused(f"more than {MAX_REDIRECTS} redirects")

    def _checked(self, url: str) -> tuple[bytes, str, str]:
        with self.slots:
            data = self.download(url)
        mime, ext = sniff(data)
        check_image(data, mime, max_pixels=self.max_pixels)
        return data, mime, ext

    def fetch(self, url: str) -> Saved:
        """Download, check and store the avatar at ``url``: its largest size (640x640)
        first, the URL as given if that is refused."""
        try:
            data, mime, ext = self._checked(largest(url))
        except AvatarRefused:
            if largest(url) == url:
                raise
            data, mime, ext = self._checked(url)
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest[2:4]}/{digest}.{ext}"
        self.write(relative, data)
        return Saved(digest, relative, len(data), mime, url)

    def write(self, relative: str, data: bytes) -> None:
        """Atomically: a crash never leaves a half file under the final name."""
        final = self.avatar_dir / relative
        if final.exists() and final.stat().st_size == len(data):
            return  # the same picture, already kept (content-addressed)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        tmp = final.parent / f".tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def intact(self, relative: str | None, sha256: str | None) -> bool:
        """Whether the stored file exists and still has its SHA-256."""
        if not relative or not sha256:
            return False
        path = self.avatar_dir / relative
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        except OSError:
            return False
