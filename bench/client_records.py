"""What a load-client process (:mod:`bench.load_client`) keeps of what its clients receive: one recorder per kind.

The load client hands each received text frame to its recorder first (``on_text``; True: the frame
was the recorder's, nothing else to do) and tells it of closes, reconnects and typing indicators
sent; ``stat`` and ``dump`` answer the control requests of the same names. Three kinds, chosen by
``python -m bench.load_client --records KIND``:

* ``latency`` (fanout, connections, spike, presence, tls, broadcast): per benchmark message frame
  (text ``m<post id>:<send µs>``, or Slackbot's ``Reminder: m<post id>:<due µs>.``, bench/spike.py)
  (client, post id, receive µs, receive - send µs), found without parsing the rest of the JSON;
  ``dump`` writes them as .npy (n, 4) int64. Other frames are only counted.
* ``events`` (failover, drain, typing): message frames (client, post id, receive µs), ``user_typing``
  events (client, channel, user, receive µs), typing indicators sent, moves after ``goodbye``
  and unexpected closes; ``dump`` writes an .npz (channel and user ids as small codes, whose tables
  are in the reply).
* ``sessions`` (the soak): every frame that is not transient (hello, goodbye, typing, presence,
  replies) as (session id, :func:`bench.soak_check.event_key` of its exact bytes) in arrival
  order, and every session's times; the soak's checker matches them to the webapp's events.

Plain classes, no I/O but ``dump``'s file: the frame handlers run once per received frame, the
hot path of every client process.
"""

from __future__ import annotations

import json
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.soak_check import event_key

if TYPE_CHECKING:
    from bench.load_client import Session

MARK = b'"text":"m'
REMINDER_MARK = b'"text":"Reminder: m'  # a reminder of text m<id>:<µs> arrives as "Reminder: m<id>:<µs>."
HELLO = b'{"type":"hello"}'
TYPING = b'"type":"user_typing"'
TYPE_PREFIX = b'{"type":"'
TRANSIENT_TYPES = {b"hello", b"goodbye", b"user_typing", b"presence_change", b"pong", b"reconnect_url"}


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class ReconnectRecord:
    """One reconnect of a client: after ``goodbye`` (``start == "moved"``) or a close; ``hello_us`` 0: it gave up."""

    idx: int
    start: str
    goodbye_us: int  # the previous session's goodbye (0: none)
    closed_us: int  # the previous session's close
    asked_us: int  # the first rtm.connect of the reconnect
    hello_us: int
    attempts: int
    gw: str
    sid: int


def columns(*cols: array[int]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Equal-length int64 arrays side by side: shape (n, len(cols)), (0, len(cols)) when empty."""
    return np.stack([np.frombuffer(c, dtype=np.int64) if len(c) else np.zeros(0, np.int64) for c in cols], axis=1)


class Recorder:
    """Records nothing (the base of every kind; every hook is optional)."""

    def on_text(self, sess: Session, payload: bytes) -> bool:
        """A received text frame; True when it was recorded (the client looks no further)."""
        return False

    def on_closed(self, sess: Session) -> None:
        """``sess`` closed after its hello and its client will not reconnect."""

    def on_reconnect(self, rec: ReconnectRecord) -> None:
        """A client reconnected (or gave up)."""

    def on_typing_sent(self, idx: int, channel: str) -> None:
        """Client ``idx`` sent a typing indicator in ``channel``."""

    def stat(self) -> dict[str, Any]:
        return {}

    def dump(self, path: str, sessions: list[Session], reconnect_errors: dict[str, int]) -> dict[str, Any]:
        """Write the records to ``path`` and clear them; what the reply adds."""
        return {}


class LatencyRecorder(Recorder):
    """Per benchmark message frame: (client, post id, receive µs, latency µs)."""

    def __init__(self) -> None:
        self.other = 0
        self.closed: dict[int, int] = {}  # client -> close µs
        self.clear()

    def clear(self) -> None:
        self.conn: array[int] = array("q")
        self.post: array[int] = array("q")
        self.recv: array[int] = array("q")
        self.lat: array[int] = array("q")

    def on_text(self, sess: Session, payload: bytes) -> bool:
        i = payload.find(MARK)
        start = i + len(MARK)
        if i < 0:
            i = payload.find(REMINDER_MARK)
            start = i + len(REMINDER_MARK)
        if i < 0:
            if payload != HELLO:
                self.other += 1
            return False
        now = now_us()
        body = payload[start : payload.find(b'"', start)].rstrip(b".")
        k = body.find(b":")
        self.conn.append(sess.idx)
        self.post.append(int(body[:k]))
        self.recv.append(now)
        self.lat.append(now - int(body[k + 1 :]))
        return True

    def on_closed(self, sess: Session) -> None:
        self.closed[sess.idx] = sess.t_close_us

    def stat(self) -> dict[str, Any]:
        return {"frames": len(self.conn), "other": self.other, "closed": len(self.closed)}

    def dump(self, path: str, sessions: list[Session], reconnect_errors: dict[str, int]) -> dict[str, Any]:
        n = len(self.conn)
        np.save(path, columns(self.conn, self.post, self.recv, self.lat))
        self.clear()
        return {"n": n, "closed": {str(k): v for k, v in self.closed.items()}}


class Codes:
    """Small ints for channel and user ids."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def code(self, key: str) -> int:
        c = self.ids.get(key)
        if c is None:
            c = self.ids[key] = len(self.ids)
        return c


class EventRecorder(Recorder):
    """Message frames, ``user_typing`` events, typing indicators sent, moves and unexpected closes."""

    def __init__(self) -> None:
        self.chan = Codes()
        self.user = Codes()
        self.other = 0
        self.clear()

    def clear(self) -> None:
        self.m_conn, self.m_post, self.m_recv = array("q"), array("q"), array("q")
        self.t_conn, self.t_chan, self.t_user, self.t_recv = array("q"), array("q"), array("q"), array("q")
        self.s_conn, self.s_chan, self.s_send = array("q"), array("q"), array("q")
        self.moves: list[ReconnectRecord] = []
        self.closed: list[tuple[int, int, int]] = []  # client, µs, close code (unexpected closes)

    def on_text(self, sess: Session, payload: bytes) -> bool:
        i = payload.find(MARK)
        if i >= 0:
            now = now_us()
            start = i + len(MARK)
            self.m_conn.append(sess.idx)
            self.m_post.append(int(payload[start : payload.find(b":", start)]))
            self.m_recv.append(now)
            return True
        if TYPING in payload:
            now = now_us()
            ev = json.loads(payload)
            self.t_conn.append(sess.idx)
            self.t_chan.append(self.chan.code(ev["channel"]))
            self.t_user.append(self.user.code(ev["user"]))
            self.t_recv.append(now)
            return True
        if payload != HELLO and b'"type":"goodbye"' not in payload:
            self.other += 1
        return False

    def on_closed(self, sess: Session) -> None:
        self.closed.append((sess.idx, sess.t_close_us, sess.close_code))

    def on_reconnect(self, rec: ReconnectRecord) -> None:
        self.moves.append(rec)

    def on_typing_sent(self, idx: int, channel: str) -> None:
        self.s_conn.append(idx)
        self.s_chan.append(self.chan.code(channel))
        self.s_send.append(now_us())

    def stat(self) -> dict[str, Any]:
        return {
            "msgs": len(self.m_conn),
            "typing": len(self.t_conn),
            "typing_sent": len(self.s_conn),
            "other": self.other,
            "moves": len(self.moves),
            "closed": len(self.closed),
        }

    def dump(self, path: str, sessions: list[Session], reconnect_errors: dict[str, int]) -> dict[str, Any]:
        moves = [(m.idx, m.goodbye_us, m.closed_us, m.asked_us, m.hello_us, m.attempts) for m in self.moves]
        np.savez(
            path,
            msgs=columns(self.m_conn, self.m_post, self.m_recv),
            typ=columns(self.t_conn, self.t_chan, self.t_user, self.t_recv),
            sent=columns(self.s_conn, self.s_chan, self.s_send),
            moves=np.array(moves, dtype=np.int64).reshape(-1, 6),
        )
        reply = {
            "chan": self.chan.ids,
            "user": self.user.ids,
            "move_gw": [m.gw for m in self.moves],
            "closed": self.closed,
            "n_msgs": len(self.m_conn),
            "move_errors": reconnect_errors,
        }
        self.clear()
        return reply


class SessionRecorder(Recorder):
    """Every non-transient frame as (session id, event key), in arrival order; sessions started fresh."""

    def __init__(self) -> None:
        self.sid: array[int] = array("q")
        self.key: array[int] = array("q")
        self.types: Counter[str] = Counter()  # every received text frame by its type
        self.typing_sent = 0
        self.fresh: list[list[int]] = []  # [client, sid, previous session's close µs, hello µs]

    def on_text(self, sess: Session, payload: bytes) -> bool:
        if payload.startswith(TYPE_PREFIX):
            kind = payload[9 : payload.find(b'"', 9)]
            self.types[kind.decode(errors="replace")] += 1
            if kind in TRANSIENT_TYPES:
                return False  # hello, goodbye: the client's; the rest: not an event
        else:
            self.types["(reply)"] += 1
            if b'"reply_to"' in payload:
                return True
        self.sid.append(sess.sid)
        self.key.append(event_key(payload))
        return True

    def on_reconnect(self, rec: ReconnectRecord) -> None:
        if rec.start != "moved" and rec.hello_us:
            self.fresh.append([rec.idx, rec.sid, rec.closed_us, rec.hello_us])

    def on_typing_sent(self, idx: int, channel: str) -> None:
        self.typing_sent += 1

    def stat(self) -> dict[str, Any]:
        fresh, self.fresh = self.fresh, []
        return {"frames": len(self.sid), "typing_sent": self.typing_sent, "types": dict(self.types), "fresh": fresh}

    def dump(self, path: str, sessions: list[Session], reconnect_errors: dict[str, int]) -> dict[str, Any]:
        n = len(self.sid)
        np.save(path, columns(self.sid, self.key))
        rows = [[s.sid, s.idx, s.t_ws_us, s.t_hello_us, s.t_close_us, s.close_code, s.start, s.gw] for s in sessions]
        return {"n": n, "sessions": rows, "types": dict(self.types), "errors": reconnect_errors}


RECORDERS: dict[str, type[Recorder]] = {
    "latency": LatencyRecorder,
    "events": EventRecorder,
    "sessions": SessionRecorder,
}
