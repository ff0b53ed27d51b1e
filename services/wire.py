"""The msgpack wire protocol, sans I/O: bytes in, frames out.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
one msgpack map. Every map has an ``op``. Requests carry an integer ``id`` and
get exactly one reply (``{"op": "ok", "id": N, ...}`` or
``{"op": "err", "id": N, "code": ..., "detail": ...}``); pushes carry no ``id``.

The length is checked against the limit *before* anything is buffered, so a
peer that announces a 4 GiB frame costs nothing. After an error the decoder is
dead: :attr:`FrameDecoder.error` is set and further input is ignored; the I/O
layer closes the connection and counts the error.

The ops themselves (every ``op``, its fields, types, ranges, who sends it)
are declared once, in :mod:`services.ops` (and docs/wire.md); handlers parse
each message into its record there before it touches state.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from services.errors import FrameTooLarge, MalformedFrame, ProtocolError

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    """One frame for ``message`` (length prefix included)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def encode_event(channel: str, seq: int | None, json_bytes: bytes, t0: float, ctl: Any = None) -> bytes:
    """The ``ev`` push frame (:class:`services.ops.Event`); built once per event and written
    to every subscriber. Hand-built rather than through the record: it is on the
    publish path, and a unit test checks the two agree.

    ``ctl`` (optional) is fleet-internal control data that travels beside the
    client-visible JSON, e.g. ``{"join": "C9", "since": 12}`` on a user's
    channel so gateways subscribe that user's connections to C9 without
    parsing the JSON.
    """
    message: dict[str, Any] = {"op": "ev", "ch": channel, "seq": seq, "json": json_bytes, "t0": t0}
    if ctl:
        message["ctl"] = ctl
    return encode(message)


def reply_ok(request_id: int, **fields: Any) -> dict[str, Any]:
    return {"op": "ok", "id": request_id, **fields}


def reply_err(request_id: int, code: str, detail: str = "", **fields: Any) -> dict[str, Any]:
    return {"op": "err", "id": request_id, "code": code, "detail": detail, **fields}


class FrameDecoder:
    """Incremental decoder. ``feed(data)`` returns the complete frames it could decode.

    Never raises into the caller: on a protocol violation it returns the frames
    decoded before it and records the failure in :attr:`error`.
    """

    __slots__ = ("max_frame_bytes", "_buffer", "error")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self.error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[dict[str, Any]]:
        if self.error is not None:
            return []
        buf = self._buffer
        buf += data
        frames: list[dict[str, Any]] = []
        offset = 0
        end = len(buf)
        while end - offset >= HEADER_BYTES:
            (length,) = HEADER.unpack_from(buf, offset)
            if length > self.max_frame_bytes:
                self.error = FrameTooLarge(length, self.max_frame_bytes)
                break
            if end - offset - HEADER_BYTES < length:
                break
            start = offset + HEADER_BYTES
            try:
                frame = msgpack.unpackb(buf[start : start + length], raw=False)
            except Exception as exc:  # msgpack raises several types for garbage
                self.error = MalformedFrame(f"undecodable msgpack: {exc}")
                break
            if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
                self.error = MalformedFrame("a frame must be a msgpack map with a string 'op'")
                break
            frames.append(frame)
            offset = start + length
        if self.error is not None:
            buf.clear()
        elif offset:
            del buf[:offset]
        return frames
