"""Images the WeChat simulator serves: solid-colour PNG avatars, a decompression bomb, and tiny
GIF, WebP and JPEG files (for the hostile avatar hosts). Pure bytes, no imaging library."""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(width: int, height: int, colour_type: int, pixels: bytes) -> bytes:
    """A PNG of 8-bit samples; ``pixels`` are the raw rows (each led by its filter byte)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels, 9))
            + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=256)
def avatar_png(image_key: str, size_px: int) -> bytes:
    """A valid ``size_px`` x ``size_px`` solid-colour RGB PNG, its colour derived from the key."""
    rgb = hashlib.blake2b(image_key.encode(), digest_size=3).digest()
    raw = (b"\x00" + rgb * size_px) * size_px  # each row: filter type 0, then its pixels
    return _png(size_px, size_px, 2, raw)


def bomb_png(side_px: int = 30000) -> bytes:
    """A few hundred bytes of 8-bit grayscale PNG whose header claims ``side_px`` squared pixels.

    Its IDAT holds the first 16 rows only: a decoder that trusts the header allocates ~900 MB
    (at 30000) before it finds out; one that checks the header first refuses it unread.
    """
    return _png(side_px, side_px, 0, (b"\x00" * (1 + side_px)) * 16)


# Tiny valid images in formats other than PNG (each decodes to one pixel).
GIF_1X1 = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00"
           b"\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
WEBP_1X1 = (b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10\x07\x10\x11\x11"
            b"\x88\x88\xfe\x07\x00")  # lossless (VP8L)


def _jpeg_1x1() -> bytes:
    """A baseline JPEG of one mid-grey pixel: one 8x8 block whose DC diff is 0, then EOB."""

    def segment(marker: int, data: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(data) + 2) + data

    one_code = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table of one 1-bit code, for 0
    return (b"\xff\xd8"  # SOI
            + segment(0xDB, b"\x00" + b"\x01" * 64)  # DQT: table 0, all ones
            + segment(0xC0, struct.pack(">BHHB", 8, 1, 1, 1) + b"\x01\x11\x00")  # SOF0 1x1 grey
            + segment(0xC4, b"\x00" + one_code)  # DHT: DC table 0, category 0 = "0"
            + segment(0xC4, b"\x10" + one_code)  # DHT: AC table 0, EOB = "0"
            + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")  # SOS: component 1, tables 0/0
            + b"\x3f"  # "0" (DC diff 0), "0" (EOB), padded with ones
            + b"\xff\xd9")  # EOI


JPEG_1X1 = _jpeg_1x1()
