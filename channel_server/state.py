"""A channel server's in-memory model, sans I/O: commands in, frames out.

Memory is the point of this class (a CS holds millions of channels):

* ``subscribers``: channel -> an ``int`` bitmask of gateway *indexes*. A
  gateway id gets a small index the first time it subscribes; a mask of one
  or two gateways is a cached small int, so a subscribed channel costs one
  dict entry and its key string, nothing else. A gateway that disconnects
  frees its index and the lowest free one is handed out next, so indexes
  (and masks) stay as small as the number of gateways connected at once,
  however many come and go.
* ``history``: channel -> a bounded deque of ``(seq, frame)``, allocated only
  when the channel gets its first event. ``frame`` is the complete encoded
  ``ev`` push, so fan-out and replay write the same bytes without re-encoding.
* ``last_seq``: channel -> the highest seq applied, for dedup. An event whose
  seq is not above it was already applied (a retried hand-off) and is dropped.

Transient events (``seq`` None: typing) are fanned out and never stored.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services import wire

DEFAULT_HISTORY_EVENTS = 100
NO_SEQ = -1


def mask_indexes(mask: int) -> Iterator[int]:
    """The gateway indexes set in ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass(frozen=True)
class Published:
    """What a publish produced: the frame to write, to whom."""

    frame: bytes
    mask: int


class ChannelTable:
    def __init__(self, history_events: int = DEFAULT_HISTORY_EVENTS) -> None:
        self.history_events = history_events
        self.subscribers: dict[str, int] = {}
        self.history: dict[str, deque[tuple[int, bytes]]] = {}
        self.last_seq: dict[str, int] = {}
        self.gateway_index: dict[str, int] = {}
        self.free_indexes: list[int] = []  # a heap: the lowest freed index is reused first
        self.history_bytes = 0

    # -- gateways -------------------------------------------------------------
    def index_of(self, gateway_id: str) -> int:
        index = self.gateway_index.get(gateway_id)
        if index is None:
            index = heapq.heappop(self.free_indexes) if self.free_indexes else len(self.gateway_index)
            self.gateway_index[gateway_id] = index
        return index

    def drop_gateway(self, index: int) -> int:
        """Remove a gateway from every channel and free its index; return how many channels it left."""
        bit = 1 << index
        touched = [ch for ch, mask in self.subscribers.items() if mask & bit]
        for ch in touched:
            self._unset(ch, bit)
        for gateway_id in [g for g, i in self.gateway_index.items() if i == index]:
            del self.gateway_index[gateway_id]
            heapq.heappush(self.free_indexes, index)
        return len(touched)

    # -- commands ---------------------------------------------------------------
    def subscribe(self, index: int, channel: str, since_seq: int) -> list[bytes]:
        """Add the gateway to ``channel``; return the held frames with seq > since_seq, in order.

        ``since_seq`` < 0 means "live only": nothing is replayed.
        """
        self.subscribers[channel] = self.subscribers.get(channel, 0) | (1 << index)
        if since_seq < 0:
            return []
        held = self.history.get(channel)
        if not held:
            return []
        return [frame for seq, frame in held if seq > since_seq]

    def unsubscribe(self, index: int, channel: str) -> None:
        self._unset(channel, 1 << index)

    def _unset(self, channel: str, bit: int) -> None:
        mask = self.subscribers.get(channel, 0) & ~bit
        if mask:
            self.subscribers[channel] = mask
        else:
            self.subscribers.pop(channel, None)

    def publish(self, channel: str, seq: int | None, json_bytes: bytes, t0: float, ctl: Any = None) -> Published | None:
        """Apply one event. Returns None for a duplicate (seq already applied)."""
        if seq is None:
            return Published(wire.encode_event(channel, None, json_bytes, t0, ctl), self.subscribers.get(channel, 0))
        if seq <= self.last_seq.get(channel, NO_SEQ):
            return None
        self.last_seq[channel] = seq
        frame = wire.encode_event(channel, seq, json_bytes, t0, ctl)
        if self.history_events > 0:
            held = self.history.get(channel)
            if held is None:
                held = self.history[channel] = deque(maxlen=self.history_events)
            if len(held) == self.history_events:
                self.history_bytes -= len(held[0][1])
            held.append((seq, frame))
            self.history_bytes += len(frame)
        return Published(frame, self.subscribers.get(channel, 0))

    def forget(self, channel: str) -> int:
        """Drop everything held for ``channel`` (it moved away); return its subscriber mask."""
        held = self.history.pop(channel, None)
        if held:
            self.history_bytes -= sum(len(frame) for _, frame in held)
        self.last_seq.pop(channel, None)
        return self.subscribers.pop(channel, 0)

    def known_channels(self) -> set[str]:
        return set(self.subscribers) | set(self.last_seq)
