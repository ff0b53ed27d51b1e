"""A load-client process: many websocket clients (picows + uvloop), controlled over stdin.

Started by :class:`bench.harness.LoadClient`. Requests are JSON lines on
stdin, each answered by one JSON line on stdout:

* ``connect`` {api_url, tokens, local_addrs, concurrency, timeout_s, deadline_s, region? | regions?}: for each
  token, ``rtm.connect`` over HTTP then a websocket to the returned URL
  (bound to one of ``local_addrs``, round-robin), waiting for ``hello``.
  Connections are numbered in the order of ``tokens``, continuing across calls.
  Optional ``after_hello`` [text or null per token]: a frame each connection sends
  right after its hello (e.g. a ``presence_sub``).
  Replies {connected, failed, errors, gw: [gateway host:port per new conn], elapsed_s}.
* ``stat``: {frames, other, open, closed}: message frames recorded so far, etc.
* ``dump`` {path}: writes the records (conn, post id, receive time, latency,
  all int64 arrays) to ``path`` (.npy of shape (n, 4)) and clears them.
* ``quit``: closes every websocket and exits.

A benchmark message's text is ``m<post id>:<send time, unix µs>`` (or Slackbot's
``Reminder: m<post id>:<due time, unix µs>.``, bench/spike.py); the client
records, per received message frame, (conn, post id, receive µs, receive −
send µs) without parsing the rest of the JSON. Other frames are only counted.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

import aiohttp
import numpy as np
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.control import control_loop
from bench.rtm_connect import OVERLOAD, rtm_connect

RTM_CONNECT_ATTEMPTS = 20
RTM_CONNECT_RETRY_DELAY_S = 1.0
RTM_CONNECT_RETRYABLE = OVERLOAD  # a server error is a failure to report, not to ride through
MARK = b'"text":"m'
REMINDER_MARK = b'"text":"Reminder: m'  # a reminder of text m<id>:<µs> arrives as "Reminder: m<id>:<µs>."
HELLO = b'{"type":"hello"}'


class Recorder:
    def __init__(self) -> None:
        self.conn = array("q")
        self.post = array("q")
        self.recv = array("q")
        self.lat = array("q")
        self.other = 0
        self.open = 0
        self.closed: dict[int, int] = {}  # conn -> close time (µs)

    def clear(self) -> None:
        self.conn = array("q")
        self.post = array("q")
        self.recv = array("q")
        self.lat = array("q")


REC = Recorder()


class Client(WSListener):
    __slots__ = ("idx", "hello", "transport")

    def __init__(self, idx: int, hello: asyncio.Future[None]) -> None:
        self.idx = idx
        self.hello = hello
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            i = payload.find(MARK)
            start = i + len(MARK)
            if i < 0:
                i = payload.find(REMINDER_MARK)
                start = i + len(REMINDER_MARK)
            if i < 0:
                if not self.hello.done() and payload == HELLO:
                    REC.open += 1
                    self.hello.set_result(None)
                else:
                    REC.other += 1
                return
            now = time.time_ns() // 1000
            j = payload.find(b'"', start)
            body = payload[start:j].rstrip(b".")
            k = body.find(b":")
            sent = int(body[k + 1 :])
            REC.conn.append(self.idx)
            REC.post.append(int(body[:k]))
            REC.recv.append(now)
            REC.lat.append(now - sent)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.hello.done():
            REC.closed[self.idx] = time.time_ns() // 1000
            REC.open -= 1
        elif not self.hello.done():
            self.hello.set_exception(ConnectionError("disconnected before hello"))


class State:
    def __init__(self) -> None:
        self.clients: list[Client | None] = []
        self.http: aiohttp.ClientSession | None = None


STATE = State()


async def connect(req: dict[str, Any]) -> dict[str, Any]:
    api_url = req["api_url"]
    tokens: list[str] = req["tokens"]
    addrs: list[str] = req.get("local_addrs") or ["127.0.0.1"]
    sem = asyncio.Semaphore(int(req.get("concurrency", 100)))
    timeout_s = float(req.get("timeout_s", 20.0))
    region = str(req.get("region") or "")
    regions: list[str] = list(req.get("regions") or [])  # per connection, round-robin by connection number
    after_hello: list[str | None] = list(req.get("after_hello") or [])
    if STATE.http is None:
        STATE.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=int(req.get("concurrency", 100))),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )
    http = STATE.http
    base = len(STATE.clients)
    STATE.clients.extend([None] * len(tokens))
    gws: list[str | None] = [None] * len(tokens)
    errors: dict[str, int] = {}
    retries: dict[str, int] = {}
    loop = asyncio.get_running_loop()

    def count_retry(error: str) -> None:
        retries[error] = retries.get(error, 0) + 1

    async def one(i: int, token: str) -> None:
        idx = base + i
        async with sem:
            try:
                reply = await rtm_connect(
                    http,
                    api_url,
                    token,
                    regions[idx % len(regions)] if regions else region,
                    attempts=RTM_CONNECT_ATTEMPTS,
                    retry_delay_s=RTM_CONNECT_RETRY_DELAY_S,
                    retryable=RTM_CONNECT_RETRYABLE,
                    on_retry=count_retry,
                )
                url = reply["url"]
                hello: asyncio.Future[None] = loop.create_future()
                client = Client(idx, hello)
                await ws_connect(
                    lambda: client, url, local_addr=(addrs[idx % len(addrs)], 0), websocket_handshake_timeout=timeout_s
                )
                await asyncio.wait_for(hello, timeout_s)
                if i < len(after_hello) and after_hello[i] and client.transport is not None:
                    client.transport.send(WSMsgType.TEXT, str(after_hello[i]).encode())
                STATE.clients[idx] = client
                gws[i] = url.split("://", 1)[1].split("/", 1)[0]
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = type(exc).__name__ + ": " + str(exc)[:80]
                errors[key] = errors.get(key, 0) + 1

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one(i, t)) for i, t in enumerate(tokens)]
    _, pending = await asyncio.wait(tasks, timeout=float(req.get("deadline_s", 300.0)))
    for task in pending:  # past the overall deadline: give up on these
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
        errors["deadline"] = errors.get("deadline", 0) + len(pending)
    connected = sum(1 for g in gws if g is not None)
    return {
        "ok": True,
        "connected": connected,
        "failed": len(tokens) - connected,
        "errors": errors,
        "retries": retries,
        "gw": gws,
        "elapsed_s": time.monotonic() - started,
    }


async def stat(req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "frames": len(REC.conn), "other": REC.other, "open": REC.open, "closed": len(REC.closed)}


async def dump(req: dict[str, Any]) -> dict[str, Any]:
    n = len(REC.conn)
    data = np.empty((n, 4), dtype=np.int64)
    if n:
        data[:, 0] = np.frombuffer(REC.conn, dtype=np.int64)
        data[:, 1] = np.frombuffer(REC.post, dtype=np.int64)
        data[:, 2] = np.frombuffer(REC.recv, dtype=np.int64)
        data[:, 3] = np.frombuffer(REC.lat, dtype=np.int64)
    np.save(str(req["path"]), data)
    REC.clear()
    return {"ok": True, "n": n, "closed": {str(k): v for k, v in REC.closed.items()}}


async def quit_all(req: dict[str, Any]) -> dict[str, Any]:
    for client in STATE.clients:
        if client is not None and client.transport is not None:
            try:
                client.transport.send_close(WSCloseCode.OK)
                client.transport.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
    if STATE.http is not None:
        await STATE.http.close()
    await asyncio.sleep(0.2)
    return {"ok": True}


async def main() -> None:
    await control_loop({"connect": connect, "stat": stat, "dump": dump, "quit": quit_all})


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
