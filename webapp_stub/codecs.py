"""Ids, tokens, ``ts`` strings, cursors and the one JSON encoding of events, pure.

A ``ts`` (``"1700000000.000100"``) is stored as integer microseconds
(:func:`ts_to_us`, :func:`us_to_ts`); a cursor is ``base64("<kind>:<key>")``
and an unreadable one is Slack's ``invalid_cursor``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any

from webapp_stub.errors import ApiError

# A Slack ts is seconds.microseconds; its seconds have 10 digits until the year 2286.
# More than this many digits cannot be a ts (and would overflow SQLite's integers).
MAX_TS_SECONDS_DIGITS = 12
MAX_SQL_INT = 2**63 - 1  # SQLite INTEGER; cursors and seqs beyond it are refused
ID_LENGTH = 11  # after the one-letter prefix, like Slack's U024BE7LH-style ids
JSON_SEPARATORS = (",", ":")


def new_id(prefix: str) -> str:
    """A Slack-looking id such as ``U5F0A2C97E1B`` (44 random bits)."""
    return prefix + secrets.token_hex(6)[:ID_LENGTH].upper()


def new_token(kind: str) -> str:
    """``xoxp-…`` for people, ``xoxb-…`` for bots."""
    return f"{kind}-{secrets.token_hex(16)}"


def ts_to_us(ts: str) -> int:
    """``"1700000000.000100"`` -> 1700000000000100. Raises ValueError."""
    text = str(ts).strip()
    whole, _, frac = text.partition(".")
    if (
        not whole.isascii()
        or not whole.isdigit()
        or len(whole) > MAX_TS_SECONDS_DIGITS
        or (frac and not (frac.isascii() and frac.isdigit()))
        or len(frac) > 6
    ):
        raise ValueError(f"bad ts {ts!r}")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0") or 0)


def us_to_ts(us: int) -> str:
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


def encode_cursor(kind: str, key: str | int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode()


def decode_cursor(cursor: str | None, kind: str) -> str | None:
    """The key inside ``cursor``; None for no cursor; ``invalid_cursor`` if unreadable."""
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise ApiError("invalid_cursor") from None
    got, _, key = text.partition(":")
    if got != kind or not key:
        raise ApiError("invalid_cursor")
    return key


def int_cursor(cursor: str | None, kind: str) -> int | None:
    key = decode_cursor(cursor, kind)
    if key is None:
        return None
    if not key.isascii() or not key.isdigit() or len(key) > 19:
        raise ApiError("invalid_cursor")
    number = int(key)
    if number > MAX_SQL_INT:
        raise ApiError("invalid_cursor")
    return number


# One encoder for every call: json.dumps with non-default arguments builds a new
# JSONEncoder each time, which cost about as much as encoding a small event (issue 17).
# allow_nan=False: NaN or infinity raises ValueError rather than fanning out ``NaN``, which is
# not JSON (args.py and limits.py refuse them where they enter; this is the backstop).
_ENCODE = json.JSONEncoder(separators=JSON_SEPARATORS, ensure_ascii=False, allow_nan=False).encode


def dumps(obj: Any) -> str:
    """The one JSON encoding of client-visible events: compact, UTF-8 text."""
    return _ENCODE(obj)


def _stored_constant(name: str) -> None:
    return None


# The reader of JSON the webapp stored (a message's blocks and attachments, a scheduled message's,
# a profile's fields): before session 13 a NaN or Infinity in a request was stored as Python writes
# it, and :func:`dumps` now refuses them, so such a row read back as is would fail every history page
# or profile that shows it, for good. They read back as null.
_STORED = json.JSONDecoder(parse_constant=_stored_constant).decode


def stored_loads(text: str) -> Any:
    """JSON text the webapp stored, NaN and Infinity read as null."""
    return _STORED(text)
