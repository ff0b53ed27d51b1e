"""Reading a JSON document out of Consul KV, strictly: bytes in, a value or :class:`BadDocument` out.

The fleet's shared configuration lives in Consul KV (the rings,
``rtm/ring/channel`` and ``rtm/ring/presence``; the region map and the
drained regions, :mod:`services.regions`). Anyone who can write KV can write
anything there, so every reader parses through :func:`load_json` and the
document's own checks (:meth:`services.ring.RingDocument.from_json`,
:func:`services.regions.parse_map`) and gets either a clean value or a
:class:`services.errors.BadDocument` naming the key and the problem, never
another exception. Readers then log it, count it
(``rtm_errors_total{kind="bad_kv"}``) and keep the last good document; no
watch or leader task stops because of a value (docs/wire.md, "Consul KV
documents").

Refused: more than :data:`MAX_KV_DOCUMENT_BYTES`; bytes that are not UTF-8;
invalid JSON; ``NaN``/``Infinity`` (Python's json accepts them, JSON does
not); nesting deep enough to exhaust the parser; numbers beyond what a JSON
double holds exactly (:data:`MAX_SAFE_INT`).
"""

from __future__ import annotations

import json
from typing import Any

from services.errors import BadDocument

# Consul refuses KV values above 512 KiB; a document this size is already absurd.
MAX_KV_DOCUMENT_BYTES = 512 * 1024
MAX_SAFE_INT = 2**53  # versions are exact in every JSON reader below this


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(key: str, raw: bytes | str) -> Any:
    """The JSON value of ``raw`` (read from ``key``), or :class:`BadDocument`."""
    size = len(raw)
    if size > MAX_KV_DOCUMENT_BYTES:
        raise BadDocument(key, f"{size} bytes is above MAX_KV_DOCUMENT_BYTES ({MAX_KV_DOCUMENT_BYTES})")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadDocument(key, f"not a JSON document: {str(exc)[:200]}") from None


def expect_object(key: str, value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise BadDocument(key, f"must be a JSON object, not {type(value).__name__}")
    return value


def expect_version(key: str, value: Any) -> int:
    """A document version: an integer in ``[0, 2**53)`` (``7.0`` and ``true`` are not)."""
    if type(value) is not int:
        raise BadDocument(key, f"version must be an integer, not {type(value).__name__}")
    if not 0 <= value < MAX_SAFE_INT:
        raise BadDocument(key, f"version {value} is outside [0, 2**53)")
    return value
