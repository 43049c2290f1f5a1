"""Text as WeChat really sends it, made safe to store: the one place answers are cleaned.

Reported in the wild (see docs/reference/wechat.md, "Profiles as they really come"): raw
control characters inside strings (0x14 before a nickname, a backspace as the city, a newline
in the province), nicknames in GBK bytes, truncated emoji (lone surrogate escapes such as
``"\\ud83d"``), an escaped NUL, private-use characters for old emoji, numbers sent as strings.
The rules:

- bytes that are not UTF-8 become U+FFFD (decoding is done with ``errors="replace"``);
- lone surrogates become U+FFFD (PostgreSQL and UTF-8 encoders refuse them);
- NUL and the other C0 control characters are dropped, except tab and newline;
- private-use characters are kept (they are old emoji, and harmless);
- every text is capped in length (the database columns and the log lines stay bounded).

Pure code: no I/O library.
"""

from __future__ import annotations

import re
from typing import Any

_DROP = {c: None for c in range(0x20) if c not in (0x09, 0x0A)}
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Longest text kept from any one field of an answer (characters).
MAX_TEXT = 1024


def clean_text(value: str, max_chars: int = MAX_TEXT) -> str:
    """``value`` without C0 controls (but tab and newline), lone surrogates as U+FFFD, capped."""
    if value.isprintable():  # no control character and no surrogate: the common case
        return value[:max_chars]
    text = value.translate(_DROP)
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return text[:max_chars]


def clean_json(value: Any, max_chars: int = MAX_TEXT) -> Any:
    """Every string in a parsed JSON value (keys included) passed through :func:`clean_text`."""
    if isinstance(value, str):
        return clean_text(value, max_chars)
    if isinstance(value, dict):
        return {clean_text(str(k), 128): clean_json(v, max_chars) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v, max_chars) for v in value]
    return value


def flag(value: object) -> bool:
    """WeChat's 0/1 flags, which come as numbers, strings or booleans: only 1 is true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1
    if isinstance(value, str):
        return value.strip() in ("1", "true", "True")
    return False


def whole_number(value: object) -> int | None:
    """An integer sent as a number or a string (``7200``, ``"7200"``, ``7200.0``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value):
        return int(value)
    return None


#: WeChat's ``sex`` codes: 0 unknown, 1 male, 2 female.
SEX_CODES = (0, 1, 2)
#: Blanks trimmed around a ``sex`` sent as a string (the migration to integers trims the same).
SEX_BLANKS = " \t\r\n"
_SEX_TEXT = re.compile(r"[012](?:\.0+)?")


def sex_code(value: object) -> int | None:
    """WeChat's ``sex`` as the integer it documents (0 unknown, 1 male, 2 female), however it
    came: ``1``, ``"1"``, ``" 2 "``, ``2.0``. None when the answer says nothing (absent, null,
    blank). Any other value (out of range, not a number) is 0, WeChat's own "unknown": the
    field is there, its meaning is not."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value) if value in SEX_CODES else 0
    if isinstance(value, str):
        text = value.strip(SEX_BLANKS)
        if not text:
            return None
        return int(text[0]) if _SEX_TEXT.fullmatch(text) else 0
    return 0


def text_or_none(value: object, max_chars: int) -> str | None:
    """A field as text (numbers become text), cleaned and capped; None when absent."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        value = int(value)
    return clean_text(str(value), max_chars)
