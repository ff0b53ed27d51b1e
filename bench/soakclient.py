"""The chaos soak's client process: many Slack RTM clients (picows + uvloop) that record what they receive.

Started by :mod:`bench.soak` (through :class:`bench.harness.LoadClient`), controlled
by JSON lines on stdin (:func:`bench.control.control_loop`). Each *client* is
one user with one websocket at a time, and behaves as Slack's clients do:

* after ``goodbye`` and the close (a drain, a gateway shutting down), it calls
  ``rtm.connect`` again at once: the new connection resumes (``start = moved``);
* after any other close (a gateway killed, a keepalive timeout), it reconnects
  after a short random backoff: a fresh connection at a new bootstrap;
* on ``reconnect`` (the soak's client-initiated reconnects) it closes its
  socket itself and connects fresh.

Every connection that got its ``hello`` is a *session* with its times (unix µs,
``time.time_ns``: the webapp's clock on this machine). Every received frame that
is not transient (hello, goodbye, typing, presence, replies) is recorded as
(session id, :func:`bench.soak_check.event_key` of its exact bytes), in arrival
order; the soak matches those keys to the webapp's events afterwards.

Requests:

* ``connect`` {api_url, proc, clients: [[client, token, region], ...], concurrency, timeout_s}
  -> {connected, failed, errors}
* ``reconnect`` {clients: [client, ...]} -> {asked}
* ``typing`` {sends: [[client, channel], ...]} -> {sent}
* ``stat`` -> {open, reconnecting, gave_up, sessions, frames, typing_sent, types, fresh: [...]}
  (``fresh``: sessions that started fresh after a close since the last ``stat``:
  [client, sid, previous session's close µs, hello µs])
* ``dump`` {path}: the frames as ``.npy`` (n, 2) int64 [sid, key]; the reply has every session.
* ``quit``.
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.control import control_loop
from bench.rtm_connect import SLACK_RETRYABLE, rtm_connect
from bench.soak_check import event_key

RECONNECT_ATTEMPTS = 40
RECONNECT_DEADLINE_S = 180.0
RECONNECT_BACKOFF_MAX_S = 3.0
AFTER_CLOSE_DELAY_S = (0.1, 1.5)  # a fresh reconnect after a crash waits a random time in this range
RTM_CONNECT_ATTEMPTS = 5  # per session opened; a reconnect makes up to RECONNECT_ATTEMPTS of those
RTM_CONNECT_RETRY_DELAY_S = 0.5
RTM_CONNECT_RETRYABLE = SLACK_RETRYABLE
SID_STRIDE = 100_000_000  # session ids: proc * SID_STRIDE + n (unique across client processes)

HELLO = b'{"type":"hello"}'
TYPE_PREFIX = b'{"type":"'
TRANSIENT_TYPES = {b"hello", b"goodbye", b"user_typing", b"presence_change", b"pong", b"reconnect_url"}


def now_us() -> int:
    return time.time_ns() // 1000


class Recorder:
    def __init__(self) -> None:
        self.sid = array("q")
        self.key = array("q")
        self.types: Counter[str] = Counter()  # every received text frame by its type
        self.typing_sent = 0
        self.fresh: list[list[int]] = []
        self.errors: Counter[str] = Counter()


REC = Recorder()


class Sess(WSListener):
    """One websocket of a client (picows wants one listener per connection)."""

    def __init__(self, client: Client, sid: int, start: str) -> None:
        self.client = client
        self.sid = sid
        self.start = start
        self.transport: WSTransport | None = None
        self.hello: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.t_ws_us = 0
        self.t_hello_us = 0
        self.t_close_us = 0
        self.close_code = 0
        self.goodbye = False
        self.gw = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if payload.startswith(TYPE_PREFIX):
                kind_b = payload[9 : payload.find(b'"', 9)]
                REC.types[kind_b.decode(errors="replace")] += 1
                if kind_b in TRANSIENT_TYPES:
                    if payload == HELLO and not self.hello.done():
                        self.hello.set_result(now_us())
                    elif kind_b == b"goodbye":
                        self.goodbye = True
                    return
            else:
                REC.types["(reply)"] += 1
                if b'"reply_to"' in payload:
                    return
            REC.sid.append(self.sid)
            REC.key.append(event_key(payload))
        elif kind == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.t_close_us = now_us()
        self.transport = None
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"closed before hello (code {self.close_code})"))
            return
        self.client.closed(self)


class Client:
    """One user, one websocket at a time, reconnecting as Slack's clients do."""

    def __init__(self, idx: int, token: str, region: str) -> None:
        self.idx = idx
        self.token = token
        self.region = region
        self.cur: Sess | None = None
        self.sessions: list[Sess] = []
        self.reconnecting = False
        self.gave_up = False
        self.want_reconnect = False

    def closed(self, sess: Sess) -> None:
        if sess is not self.cur:
            return
        self.cur = None
        if STATE.quitting:
            return
        if sess.goodbye:
            start, delay = "moved", 0.0
        elif self.want_reconnect:
            start, delay = "client_reconnect", 0.0
        else:
            start, delay = f"after_close_{sess.close_code or 1006}", random.uniform(*AFTER_CLOSE_DELAY_S)
        self.want_reconnect = False
        self.reconnecting = True
        STATE.spawn(self.reconnect(start, delay, sess.t_close_us))

    async def open(self, start: str) -> Sess:
        """rtm.connect, websocket, hello: a new session (raises on failure)."""
        assert STATE.http is not None
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
        STATE.next_sid += 1
        sess = Sess(self, STATE.proc * SID_STRIDE + STATE.next_sid, start)
        sess.t_ws_us = now_us()
        await ws_connect(lambda: sess, url, websocket_handshake_timeout=STATE.timeout_s)
        try:
            sess.t_hello_us = await asyncio.wait_for(sess.hello, STATE.timeout_s)
        except BaseException:
            if sess.transport is not None:
                sess.transport.disconnect()
            raise
        sess.gw = url.split("://", 1)[1].split("/", 1)[0]
        self.cur = sess
        self.sessions.append(sess)
        if sess.transport is None:  # closed between hello and here: handle it as a close
            self.closed(sess)
        return sess

    async def reconnect(self, start: str, delay_s: float, closed_us: int) -> None:
        await asyncio.sleep(delay_s)
        deadline = time.monotonic() + RECONNECT_DEADLINE_S
        for attempt in range(RECONNECT_ATTEMPTS):
            if STATE.quitting or time.monotonic() > deadline:
                break
            try:
                sess = await self.open(start)
                self.reconnecting = False
                if start != "moved":
                    REC.fresh.append([self.idx, sess.sid, closed_us, sess.t_hello_us])
                return
            except Exception as exc:  # noqa: BLE001 - retried, counted
                REC.errors[f"reconnect: {type(exc).__name__}: {str(exc)[:60]}"] += 1
                await asyncio.sleep(min(RECONNECT_BACKOFF_MAX_S, 0.2 * 2**attempt) * random.uniform(0.5, 1.0))
        self.reconnecting = False
        self.gave_up = True


class State:
    def __init__(self) -> None:
        self.clients: dict[int, Client] = {}
        self.http: aiohttp.ClientSession | None = None
        self.api_url = ""
        self.proc = 0
        self.next_sid = 0
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
    STATE.proc = int(req["proc"])
    concurrency = int(req.get("concurrency", 50))
    STATE.timeout_s = float(req.get("timeout_s", 20.0))
    if STATE.http is None:
        STATE.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=STATE.timeout_s),
        )
    sem = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()

    async def one(idx: int, token: str, region: str) -> bool:
        client = STATE.clients[idx] = Client(idx, token, region)
        async with sem:
            for attempt in range(3):
                try:
                    await client.open("first")
                    return True
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
        return False

    started = time.monotonic()
    done = await asyncio.gather(*(one(int(i), str(t), str(r)) for i, t, r in req["clients"]))
    return {
        "ok": True,
        "connected": sum(done),
        "failed": len(done) - sum(done),
        "errors": dict(errors),
        "elapsed_s": time.monotonic() - started,
    }


async def reconnect(req: dict[str, Any]) -> dict[str, Any]:
    asked = 0
    for idx in req["clients"]:
        client = STATE.clients.get(int(idx))
        if client is None or client.cur is None or client.cur.transport is None or client.reconnecting:
            continue
        client.want_reconnect = True
        client.cur.transport.send_close(WSCloseCode.OK)
        client.cur.transport.disconnect()
        asked += 1
    return {"ok": True, "asked": asked}


async def typing(req: dict[str, Any]) -> dict[str, Any]:
    sent = 0
    for idx, channel in req["sends"]:
        client = STATE.clients.get(int(idx))
        if client is None or client.cur is None or client.cur.transport is None:
            continue
        STATE.typing_id += 1
        client.cur.transport.send(
            WSMsgType.TEXT, b'{"id":%d,"type":"typing","channel":"%s"}' % (STATE.typing_id, str(channel).encode())
        )
        sent += 1
    REC.typing_sent += sent
    return {"ok": True, "sent": sent}


async def stat(req: dict[str, Any]) -> dict[str, Any]:
    fresh, REC.fresh = REC.fresh, []
    clients = STATE.clients.values()
    return {
        "ok": True,
        "open": sum(1 for c in clients if c.cur is not None),
        "reconnecting": sum(1 for c in clients if c.reconnecting),
        "gave_up": sum(1 for c in clients if c.gave_up),
        "sessions": sum(len(c.sessions) for c in clients),
        "frames": len(REC.sid),
        "typing_sent": REC.typing_sent,
        "types": dict(REC.types),
        "errors": dict(REC.errors),
        "fresh": fresh,
    }


async def dump(req: dict[str, Any]) -> dict[str, Any]:
    n = len(REC.sid)
    data = np.empty((n, 2), dtype=np.int64)
    if n:
        data[:, 0] = np.frombuffer(REC.sid, dtype=np.int64)
        data[:, 1] = np.frombuffer(REC.key, dtype=np.int64)
    np.save(str(req["path"]), data)
    sessions = [
        [s.sid, c.idx, s.t_ws_us, s.t_hello_us, s.t_close_us, s.close_code, s.start, s.gw]
        for c in STATE.clients.values()
        for s in c.sessions
    ]
    return {"ok": True, "n": n, "sessions": sessions, "types": dict(REC.types), "errors": dict(REC.errors)}


async def quit_all(req: dict[str, Any]) -> dict[str, Any]:
    STATE.quitting = True
    for t in list(STATE.tasks):
        t.cancel()
    for client in STATE.clients.values():
        if client.cur is not None and client.cur.transport is not None:
            try:
                client.cur.transport.send_close(WSCloseCode.OK)
                client.cur.transport.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
    if STATE.http is not None:
        await STATE.http.close()
    await asyncio.sleep(0.2)
    return {"ok": True}


async def main() -> None:
    await control_loop(
        {"connect": connect, "reconnect": reconnect, "typing": typing, "stat": stat, "dump": dump, "quit": quit_all}
    )


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
