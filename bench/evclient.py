"""An event-client process for the failover, typing and drain benchmarks (picows + uvloop).

Like :mod:`bench.loadclient` (many websockets in one process, controlled by
JSON lines on stdin, one JSON line answered per request), but it also

* records ``user_typing`` events (connection, channel, user, receive time),
* sends typing indicators on a schedule and records each send,
* follows Slack's ``goodbye`` as Slack's clients do: after the goodbye and
  the close, ``rtm.connect`` again (same region hint) and open the new URL,
  recording each step's time (bounded: a few attempts, a deadline).

Requests:

* ``connect`` {api_url, tokens, regions?, follow_goodbye, concurrency, timeout_s}
  -> {connected, failed, errors, gw: [host:port per new conn]}
* ``typing`` {senders: [[conn, channel], ...], interval_s, duration_s, burst?}: each sender
  sends ``burst`` (default 1) ``{"id":N,"type":"typing","channel":C}`` back to back every
  ``interval_s`` (its own random phase) for ``duration_s``; answered at once (runs in the
  background).
* ``stat`` -> {msgs, typing, other, open, moves, moving, typing_sent}
* ``dump`` {path}: writes an .npz of the records and clears them (the code
  tables of channel and user ids are in the reply).
* ``quit``.

Times are unix µs from ``time.time_ns()``: the same clock as the benchmark's
poster on this machine. A benchmark message's text is ``m<post id>:<send µs>``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from array import array
from typing import Any

import aiohttp
import numpy as np
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.control import control_loop
from bench.rtm_connect import RATELIMITED_ONLY, rtm_connect

MARK = b'"text":"m'
HELLO = b'{"type":"hello"}'
TYPING = b'"type":"user_typing"'
GOODBYE = b'"type":"goodbye"'
RECONNECT_ATTEMPTS = 8
RTM_CONNECT_ATTEMPTS = 5  # per connection attempt; a move makes up to RECONNECT_ATTEMPTS of those
RTM_CONNECT_RETRY_DELAY_S = 0.5
RTM_CONNECT_RETRYABLE = RATELIMITED_ONLY  # anything else fails this attempt (a move retries it with backoff)
RECONNECT_DEADLINE_S = 150.0


def now_us() -> int:
    return time.time_ns() // 1000


class Codes:
    """Small ints for channel and user ids."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def code(self, key: str) -> int:
        c = self.ids.get(key)
        if c is None:
            c = self.ids[key] = len(self.ids)
        return c


class Recorder:
    def __init__(self) -> None:
        self.chan = Codes()
        self.user = Codes()
        self.other = 0
        self.open = 0
        self.clear()

    def clear(self) -> None:
        self.m_conn, self.m_post, self.m_recv = array("q"), array("q"), array("q")
        self.t_conn, self.t_chan, self.t_user, self.t_recv = array("q"), array("q"), array("q"), array("q")
        self.s_conn, self.s_chan, self.s_send = array("q"), array("q"), array("q")
        # moves: conn, goodbye µs, closed µs, rtm.connect asked µs, hello µs (0: failed), attempts
        self.mv: list[tuple[int, int, int, int, int, int, str]] = []
        self.closed: list[tuple[int, int, int]] = []  # conn, µs, close code (unexpected closes)
        self.move_errors: dict[str, int] = {}  # why a reconnect attempt failed


REC = Recorder()


class Conn(WSListener):
    def __init__(self, idx: int, token: str, region: str, follow: bool) -> None:
        self.idx = idx
        self.token = token
        self.region = region
        self.follow = follow
        self.transport: WSTransport | None = None
        self.hello: asyncio.Future[int] | None = None
        self.goodbye_us = 0
        self.close_code = 0
        self.gw = ""
        self.moving = False
        self.stage = ""

    # picows callbacks (one listener object per websocket; a new one per reconnect)
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            i = payload.find(MARK)
            if i >= 0:
                now = now_us()
                j = payload.find(b":", i + 9)
                REC.m_conn.append(self.idx)
                REC.m_post.append(int(payload[i + 9 : j]))
                REC.m_recv.append(now)
                return
            if TYPING in payload:
                now = now_us()
                ev = json.loads(payload)
                REC.t_conn.append(self.idx)
                REC.t_chan.append(REC.chan.code(ev["channel"]))
                REC.t_user.append(REC.user.code(ev["user"]))
                REC.t_recv.append(now)
                return
            if payload == HELLO:
                if self.hello is not None and not self.hello.done():
                    self.hello.set_result(now_us())
                return
            if GOODBYE in payload:
                self.goodbye_us = now_us()
                return
            REC.other += 1
        elif kind == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.transport is not transport:
            return
        self.transport = None
        if self.hello is not None and not self.hello.done():
            self.hello.set_exception(ConnectionError(f"closed before hello (code {self.close_code})"))
            return
        REC.open -= 1
        if self.follow and self.goodbye_us and not STATE.quitting:
            self.moving = True
            STATE.spawn(self.move(now_us()))
        elif not STATE.quitting:
            REC.closed.append((self.idx, now_us(), self.close_code))

    async def open_once(self, timeout_s: float) -> int:
        """rtm.connect + websocket + hello; returns the hello time (µs)."""
        assert STATE.http is not None
        self.stage = "rtm.connect"
        reply = await rtm_connect(
            STATE.http,
            STATE.api_url,
            self.token,
            self.region,
            attempts=RTM_CONNECT_ATTEMPTS,
            retry_delay_s=RTM_CONNECT_RETRY_DELAY_S,
            retryable=RTM_CONNECT_RETRYABLE,
        )
        url = reply["url"]
        self.stage = "websocket handshake"
        self.hello = asyncio.get_running_loop().create_future()
        self.goodbye_us = 0
        self.close_code = 0
        await ws_connect(lambda: self, url, websocket_handshake_timeout=timeout_s)
        self.stage = "hello"
        hello_us = await asyncio.wait_for(self.hello, timeout_s)
        self.gw = url.split("://", 1)[1].split("/", 1)[0]
        REC.open += 1
        return hello_us

    async def move(self, closed_us: int) -> None:
        goodbye_us = self.goodbye_us
        asked = now_us()
        deadline = time.monotonic() + RECONNECT_DEADLINE_S
        attempts = 0
        hello_us = 0
        while attempts < RECONNECT_ATTEMPTS and time.monotonic() < deadline and not STATE.quitting:
            attempts += 1
            try:
                hello_us = await self.open_once(STATE.timeout_s)
                break
            except Exception as exc:  # noqa: BLE001 - retried, then recorded as failed
                key = f"{self.stage}: {type(exc).__name__}: {str(exc)[:60]} (close {self.close_code})"
                REC.move_errors[key] = REC.move_errors.get(key, 0) + 1
                if self.goodbye_us:  # the new gateway said goodbye too: ask again at once
                    continue
                await asyncio.sleep(min(2.0, 0.2 * 2**attempts) * random.uniform(0.5, 1.0))
        REC.mv.append((self.idx, goodbye_us, closed_us, asked, hello_us, attempts, self.gw if hello_us else ""))
        self.moving = False


class State:
    def __init__(self) -> None:
        self.conns: list[Conn | None] = []
        self.http: aiohttp.ClientSession | None = None
        self.api_url = ""
        self.timeout_s = 20.0
        self.quitting = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.typing_id = 0

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


STATE = State()


async def connect(req: dict[str, Any]) -> dict[str, Any]:
    STATE.api_url = req["api_url"]
    tokens: list[str] = req["tokens"]
    regions: list[str] = list(req.get("regions") or [""] * len(tokens))
    follow = bool(req.get("follow_goodbye", False))
    concurrency = int(req.get("concurrency", 100))
    STATE.timeout_s = float(req.get("timeout_s", 20.0))
    if STATE.http is None:
        STATE.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=STATE.timeout_s),
        )
    sem = asyncio.Semaphore(concurrency)
    base = len(STATE.conns)
    STATE.conns.extend([None] * len(tokens))
    gws: list[str | None] = [None] * len(tokens)
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        async with sem:
            conn = Conn(base + i, tokens[i], regions[i], follow)
            try:
                await conn.open_once(STATE.timeout_s)
                STATE.conns[base + i] = conn
                gws[i] = conn.gw
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = type(exc).__name__ + ": " + str(exc)[:80]
                errors[key] = errors.get(key, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(len(tokens))))
    connected = sum(1 for g in gws if g is not None)
    return {
        "ok": True,
        "connected": connected,
        "failed": len(tokens) - connected,
        "errors": errors,
        "gw": gws,
        "elapsed_s": time.monotonic() - started,
    }


async def type_loop(senders: list[tuple[int, str]], interval_s: float, duration_s: float, burst: int = 1) -> None:
    """One scheduler for every sender: each at its own phase, ``burst`` sends back to back every ``interval_s``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + duration_s
    n = len(senders)
    if not n:
        return
    # sender k's i-th send at t0 + phase_k + i * interval
    phases = [random.uniform(0, interval_s) for _ in range(n)]
    order = sorted(range(n), key=lambda k: phases[k])
    i = 0
    while True:
        for k in order:
            at = t0 + phases[k] + i * interval_s
            if at >= end or STATE.quitting:
                return
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            idx, channel = senders[k]
            conn = STATE.conns[idx] if idx < len(STATE.conns) else None
            if conn is None or conn.transport is None:
                continue
            for _ in range(burst):
                STATE.typing_id += 1
                body = b'{"id":%d,"type":"typing","channel":"%s"}' % (STATE.typing_id, channel.encode())
                REC.s_conn.append(idx)
                REC.s_chan.append(REC.chan.code(channel))
                REC.s_send.append(now_us())
                conn.transport.send(WSMsgType.TEXT, body)
        i += 1


async def stat(req: dict[str, Any]) -> dict[str, Any]:
    return {
        "ok": True,
        "msgs": len(REC.m_conn),
        "typing": len(REC.t_conn),
        "typing_sent": len(REC.s_conn),
        "other": REC.other,
        "open": REC.open,
        "moves": len(REC.mv),
        "moving": sum(1 for c in STATE.conns if c is not None and c.moving),
        "closed": len(REC.closed),
    }


def arr(a: array) -> np.ndarray:
    return np.frombuffer(a, dtype=np.int64).copy() if len(a) else np.zeros(0, dtype=np.int64)


async def dump(req: dict[str, Any]) -> dict[str, Any]:
    mv = np.array([m[:6] for m in REC.mv], dtype=np.int64).reshape(-1, 6)
    np.savez(
        str(req["path"]),
        msgs=np.stack([arr(REC.m_conn), arr(REC.m_post), arr(REC.m_recv)], axis=1)
        if len(REC.m_conn)
        else np.zeros((0, 3), np.int64),
        typ=np.stack([arr(REC.t_conn), arr(REC.t_chan), arr(REC.t_user), arr(REC.t_recv)], axis=1)
        if len(REC.t_conn)
        else np.zeros((0, 4), np.int64),
        sent=np.stack([arr(REC.s_conn), arr(REC.s_chan), arr(REC.s_send)], axis=1)
        if len(REC.s_conn)
        else np.zeros((0, 3), np.int64),
        moves=mv,
    )
    reply = {
        "ok": True,
        "chan": REC.chan.ids,
        "user": REC.user.ids,
        "move_gw": [m[6] for m in REC.mv],
        "closed": REC.closed,
        "n_msgs": len(REC.m_conn),
        "move_errors": REC.move_errors,
    }
    REC.clear()
    return reply


async def quit_all(req: dict[str, Any]) -> dict[str, Any]:
    STATE.quitting = True
    for t in list(STATE.tasks):
        t.cancel()
    for conn in STATE.conns:
        if conn is not None and conn.transport is not None:
            try:
                conn.transport.send_close(WSCloseCode.OK)
                conn.transport.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
    if STATE.http is not None:
        await STATE.http.close()
    await asyncio.sleep(0.2)
    return {"ok": True}


async def start_typing(req: dict[str, Any]) -> dict[str, Any]:
    STATE.spawn(
        type_loop(
            [(int(a), str(b)) for a, b in req["senders"]],
            float(req["interval_s"]),
            float(req["duration_s"]),
            int(req.get("burst", 1)),
        )
    )
    return {"ok": True}


async def main() -> None:
    await control_loop({"connect": connect, "typing": start_typing, "stat": stat, "dump": dump, "quit": quit_all})


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
