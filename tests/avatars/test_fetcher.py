"""Avatar downloads are safe by construction; files are content-addressed and atomic."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from keeper.avatars.fetcher import AvatarRefused, Fetcher, check_image, largest, sniff


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"),
                                           ("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_real_images_of_the_four_kinds_pass(fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    assert sniff(data)[0] == mime
    check_image(data, mime)


@pytest.mark.parametrize("data", [b"<html>not an image</html>", b"", b"BM\x00\x00fake-bmp"])
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(AvatarRefused, match="not a JPEG"):
        sniff(data)


def test_a_truncated_image_is_refused() -> None:
    data = image_bytes("PNG", (64, 64))
    with pytest.raises(AvatarRefused, match="decode"):
        check_image(data[: len(data) // 2], "image/png")


def test_an_image_over_the_pixel_cap_is_refused_before_decoding() -> None:
    data = image_bytes("PNG", (300, 300))
    with pytest.raises(AvatarRefused, match="over the cap"):
        check_image(data, "image/png", max_pixels=200 * 200)


def test_a_signature_that_lies_is_refused() -> None:
    with pytest.raises(AvatarRefused):
        check_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png")


@pytest.mark.parametrize(("url", "biggest"), [
    ("http://wx.qlogo.cn/mmopen/abc/132", "http://wx.qlogo.cn/mmopen/abc/0"),
    ("http://wx.qlogo.cn/mmopen/abc/0", "http://wx.qlogo.cn/mmopen/abc/0"),
    ("http://wx.qlogo.cn/mmopen/abc", "http://wx.qlogo.cn/mmopen/abc"),
])
def test_the_largest_size_is_asked_for(url: str, biggest: str) -> None:
    assert largest(url) == biggest


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://wx.qlogo.cn/a", "scheme"), ("file:///etc/passwd", "scheme"),
    ("http://evil.example/a", "not in avatar_hosts"),
    ("http://wx.qlogo.cn.evil.example/a", "not in avatar_hosts"),
    ("http://user@evil.example/a", "not in avatar_hosts"),
])
def test_only_allowed_hosts_and_schemes(tmp_path: Path, url: str, reason: str) -> None:
    f = Fetcher(hosts=("wx.qlogo.cn",), avatar_dir=tmp_path)
    with pytest.raises(AvatarRefused, match=reason):
        f.allowed(url)
    f.allowed("https://WX.qlogo.cn/mmopen/x/0")


def test_files_are_named_by_content_sharded_and_shared(tmp_path: Path) -> None:
    f = Fetcher(hosts=("h",), avatar_dir=tmp_path)
    data = image_bytes("PNG")
    digest = hashlib.sha256(data).hexdigest()
    relative = f"{digest[:2]}/{digest[2:4]}/{digest}.png"
    f.write(relative, data)
    f.write(relative, data)  # a second user with the same picture: the same file
    assert (tmp_path / relative).read_bytes() == data
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{digest}.png"]
    assert f.intact(relative, digest)
    (tmp_path / relative).write_bytes(data[:-3])
    assert not f.intact(relative, digest)
    assert not f.intact(None, digest)
