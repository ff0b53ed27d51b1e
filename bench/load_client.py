"""The benchmarks' load client: one process holding many Slack RTM clients (picows + uvloop), controlled over stdin.

Every benchmark that opens websockets runs this module as its client processes (through
:class:`bench.harness.LoadClient`): fanout, connections, spike, presence and tls record message
latencies; failover, drain and typing record events and typing indicators and follow ``goodbye``;
the soak records every event of every session and reconnects after any close; broadcast records
latencies on a ``ws://`` URL it is given. What a process records is one :mod:`bench.client_records`
recorder, chosen by ``--records``; how its clients connect and reconnect is the one rule below.

**The connect rule** (every benchmark, every (re)connect). One *attempt* is one ``rtm.connect``
POST (with the region hint when given), the websocket handshake and the ``hello``. A failed attempt
is retried after an exponential backoff with jitter, ``min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**(n-1))``
times a uniform factor in [0.5, 1] after the n-th failure, or after the server's ``Retry-After``
(capped at ``MAX_RETRY_AFTER_S``) when ``rtm.connect`` said ``ratelimited`` with one, whichever is
longer; within a budget of ``MAX_CONNECT_ATTEMPTS`` attempts and ``CONNECT_BUDGET_S`` seconds. Two
exceptions: an ``rtm.connect`` error outside :data:`RETRYABLE_ERRORS` (``invalid_auth``, ...) fails
at once (asking again cannot help), and an attempt whose new gateway said ``goodbye`` before the
``hello`` (it is draining too) is retried at once, as after any ``goodbye``. Every retried attempt
is counted by its reason in ``connect``'s ``retries``, every client that did not connect in its ``errors``: a
benchmark reports both, so riding through an error never hides it.

**Reconnects** are the one behaviour the callers really differ in, the ``reconnect`` field of
``connect`` (:class:`Reconnect`): ``never`` (a close is recorded; the latency benchmarks), ``goodbye``
(after ``goodbye`` and the close, connect again at once; any other close is recorded; failover,
drain, typing) or ``always`` (``goodbye``: at once; any other close: after a random
``AFTER_CLOSE_DELAY_S``; the soak, whose clients behave as Slack's do). A reconnect after
``goodbye`` resumes (the fleet moved the connection) as long as its attempts do not fail; after a
failed attempt (a 4010 before ``hello``: the resume record is gone; or any other failure, which may
have used the record up) the client goes on as a *fresh* connection (``Session.start``
``after_failed_move``), which reads what it missed with ``conversations.history`` like Slack's
clients. Only a ``goodbye`` before ``hello`` (the new gateway is draining too; it took nothing)
keeps it a move.

Requests (JSON lines on stdin, one JSON line answered each, :func:`bench.control.control_loop`):

* ``connect`` {api_url, tokens, regions? | region?, indices?, local_addrs?, after_hello?, reconnect?,
  proc?, concurrency?, timeout_s?, deadline_s?} -- or {url, n, ...}: ``n`` clients on that websocket
  URL, no ``rtm.connect``. Client ``indices[i]`` (default: numbered on from earlier calls) is
  ``tokens[i]`` with region hint ``regions[i]`` (round-robin when ``regions`` is shorter); websockets bind to ``local_addrs`` round-robin; ``after_hello[i]``
  is a text frame client ``i`` sends right after its hello. -> {connected, failed, errors, retries,
  gw: [host:port or null per client], conns: [connected indices], elapsed_s}
* ``reconnect`` {clients}: those clients close their socket and connect fresh -> {asked}
* ``typing`` {sends: [[client, channel], ...]}: one typing indicator each -> {sent}
* ``typing_schedule`` {senders, interval_s, duration_s, burst?}: each sender sends ``burst`` typing
  indicators every ``interval_s`` at its own random phase for ``duration_s`` (in the background).
* ``stat``: {open, reconnecting, gave_up, sessions, ...what the recorder counts}
* ``dump`` {path}: the recorder writes its records to ``path`` and clears them (and the count of failed
  reconnect attempts, in the reply); the reply says more.
* ``quit``: closes every websocket and exits.

Times are unix µs (``time.time_ns() // 1000``): the clock of the benchmark's poster and of the
webapp on this machine.

Why one module over 500 lines: it is the one process every benchmark's clients run; the connect
rule, the client and its sessions, and the control commands share the process state and change
together. What each benchmark records is apart, in bench.client_records.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.client_records import RECORDERS, ReconnectRecord, Recorder, now_us
from bench.control import Handler, control_loop

MAX_CONNECT_ATTEMPTS = 20  # attempts of one (re)connect; ~40 s of backoff in all (a rate limit's waits can stretch it)
CONNECT_BUDGET_S = 180.0  # one (re)connect, every attempt and wait included
BACKOFF_BASE_S = 0.2  # the first wait; doubles after each failure ...
BACKOFF_MAX_S = 3.0  # ... up to this
MAX_RETRY_AFTER_S = 10.0  # a ratelimited reply's Retry-After is honoured up to this
AFTER_CLOSE_DELAY_S = (0.1, 1.5)  # reconnect=always: a reconnect after a close without goodbye waits this (random)
RETRYABLE_ERRORS = frozenset({"ratelimited", "service_unavailable", "fatal_error", "internal_error"})  # Slack's
DEFAULT_TIMEOUT_S = 20.0  # one HTTP request, one websocket handshake, one wait for hello
DEFAULT_DEADLINE_S = 300.0  # one ``connect`` request: clients not connected by then count as failed
DEFAULT_CONCURRENCY = 100  # clients connecting at once
QUIT_GRACE_S = 0.2  # after closing every websocket, before the process exits: the close frames go out
SID_STRIDE = 100_000_000  # session ids: proc * SID_STRIDE + n (unique across client processes)

HELLO = b'{"type":"hello"}'
# How a session started (``Session.start``, in the soak's records): after ``goodbye`` (the fleet
# moved it: it resumes); after a failed attempt of such a move (fresh: it catches up from history).
MOVED = "moved"
AFTER_FAILED_MOVE = "after_failed_move"
GOODBYE = b'"type":"goodbye"'


class Reconnect(StrEnum):
    """What a client does when its websocket closes."""

    NEVER = "never"
    GOODBYE = "goodbye"
    ALWAYS = "always"


class RtmConnectError(RuntimeError):
    """``rtm.connect`` said no: ``error`` is its error code, ``retry_after_s`` its ``Retry-After`` (if any)."""

    def __init__(self, error: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"rtm.connect: {error}")
        self.error = error
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.error in RETRYABLE_ERRORS


class GoodbyeBeforeHello(ConnectionError):
    """The new gateway said ``goodbye`` before ``hello``: it is draining; ask ``rtm.connect`` again at once."""


@dataclass
class ConnectRetry:
    """The connect rule's decision for one (re)connect, without I/O or clock: after each failed attempt,
    :meth:`after_failure` says how long to wait before the next attempt, or None: give up."""

    started_s: float
    rng: random.Random
    max_attempts: int = MAX_CONNECT_ATTEMPTS
    budget_s: float = CONNECT_BUDGET_S
    failures: int = 0

    def after_failure(self, exc: BaseException, now_s: float) -> float | None:
        self.failures += 1
        if isinstance(exc, RtmConnectError) and not exc.retryable:
            return None
        if self.failures >= self.max_attempts:
            return None
        if isinstance(exc, GoodbyeBeforeHello):
            wait_s = 0.0
        else:
            wait_s = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self.failures - 1)) * self.rng.uniform(0.5, 1.0)
            if isinstance(exc, RtmConnectError) and exc.retry_after_s:
                wait_s = max(wait_s, min(exc.retry_after_s, MAX_RETRY_AFTER_S))
        if now_s + wait_s - self.started_s > self.budget_s:
            return None
        return wait_s


def failure_reason(stage: str, exc: BaseException) -> str:
    """A short key for counting failed attempts: the ``rtm.connect`` error, or the stage and the exception."""
    if isinstance(exc, RtmConnectError):
        return exc.error
    return f"{stage}: {type(exc).__name__}: {str(exc)[:60]}"


async def rtm_connect(http: aiohttp.ClientSession, api_url: str, token: str, region: str = "") -> dict[str, Any]:
    """One ``rtm.connect`` POST (with the ``region`` hint when set); the reply (``url`` ...) or :class:`RtmConnectError`."""
    form = {"region": region} if region else {}
    async with http.post(api_url + "rtm.connect", data=form, headers={"Authorization": f"Bearer {token}"}) as resp:
        reply: dict[str, Any] = await resp.json(content_type=None)
        retry_after = resp.headers.get("Retry-After", "")
    if reply.get("ok"):
        return reply
    try:
        retry_after_s = float(retry_after) if retry_after else None
    except ValueError:
        retry_after_s = None
    raise RtmConnectError(str(reply.get("error")), retry_after_s)


class Session(WSListener):
    """One websocket of a client (picows wants one listener per connection); ``idx`` is the client's."""

    def __init__(self, client: Client, sid: int, start: str) -> None:
        self.client = client
        self.idx = client.idx
        self.sid = sid
        self.start = start
        self.on_text = STATE.recorder.on_text
        self.transport: WSTransport | None = None
        self.hello: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.t_ws_us = 0
        self.t_hello_us = 0
        self.t_close_us = 0
        self.goodbye_us = 0
        self.close_code = 0
        self.gw = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if self.on_text(self, payload):
                return
            if payload == HELLO:
                if not self.hello.done():
                    self.hello.set_result(now_us())
            elif GOODBYE in payload:
                self.goodbye_us = now_us()
        elif kind == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.t_close_us = now_us()
        self.transport = None
        if not self.hello.done():
            if self.goodbye_us:
                self.hello.set_exception(GoodbyeBeforeHello(f"goodbye before hello (code {self.close_code})"))
            else:
                self.hello.set_exception(ConnectionError(f"closed before hello (code {self.close_code})"))
            return
        self.client.closed(self)

    def send_text(self, body: bytes) -> bool:
        if self.transport is None:
            return False
        self.transport.send(WSMsgType.TEXT, body)
        return True

    def close(self) -> None:
        if self.transport is not None:
            try:
                self.transport.send_close(WSCloseCode.OK)
                self.transport.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass


class Client:
    """One user, one websocket at a time (``cur``), connecting and reconnecting by the connect rule."""

    def __init__(self, idx: int, token: str, region: str, url: str = "", local_addr: str = "") -> None:
        self.idx = idx
        self.token = token
        self.region = region
        self.url = url  # set: connect here, without rtm.connect
        self.local_addr = local_addr
        self.cur: Session | None = None
        self.sessions: list[Session] = []
        self.reconnecting = False
        self.gave_up = False
        self.want_reconnect = False
        self.stage = ""
        self.attempts = 0  # of the last (re)connect

    async def open_once(self, start: str) -> Session:
        """One attempt: rtm.connect, websocket, hello; a new current session (raises on failure)."""
        url = self.url
        if not url:
            assert STATE.http is not None
            self.stage = "rtm.connect"
            url = (await rtm_connect(STATE.http, STATE.api_url, self.token, self.region))["url"]
        self.stage = "websocket handshake"
        sess = Session(self, STATE.new_sid(), start)
        sess.t_ws_us = now_us()
        local_addr = (self.local_addr, 0) if self.local_addr else None
        await ws_connect(lambda: sess, url, websocket_handshake_timeout=STATE.timeout_s, local_addr=local_addr)
        self.stage = "hello"
        try:
            sess.t_hello_us = await asyncio.wait_for(sess.hello, STATE.timeout_s)
        except BaseException:
            sess.close()
            raise
        sess.gw = url.split("://", 1)[1].split("/", 1)[0]
        self.cur = sess
        self.sessions.append(sess)
        if sess.transport is None:  # closed between hello and here: handle it as a close
            self.closed(sess)
        return sess

    async def open(self, start: str, retries: Counter[str], failures: Counter[str] | None = None) -> Session:
        """Attempts by the connect rule until one succeeds; the last failure is raised when the rule gives up.
        Every retried attempt is counted in ``retries`` by its reason, every failed one in ``failures``."""
        rule = ConnectRetry(time.monotonic(), STATE.rng, STATE.max_attempts, STATE.budget_s)
        while True:
            self.attempts = rule.failures + 1
            try:
                return await self.open_once(start)
            except Exception as exc:
                reason = failure_reason(self.stage, exc)
                if failures is not None:
                    failures[reason] += 1
                if start == MOVED and not isinstance(exc, GoodbyeBeforeHello):
                    # The move's resume may be gone with this attempt (a 4010 before hello says so;
                    # a bootstrap that failed may have taken the record): go on as a fresh connection,
                    # which reads what it missed with conversations.history, as Slack's clients do.
                    # A goodbye before hello (the new gateway drains too) took nothing: still a move.
                    start = AFTER_FAILED_MOVE
                wait_s = None if STATE.quitting else rule.after_failure(exc, time.monotonic())
                if wait_s is None:
                    raise
                retries[reason] += 1
                await asyncio.sleep(wait_s)

    def closed(self, sess: Session) -> None:
        """``sess`` closed after its hello: reconnect as ``STATE.reconnect`` says, or record the close."""
        if sess is not self.cur:
            return
        self.cur = None
        if STATE.quitting:
            return
        mode = STATE.reconnect
        if sess.goodbye_us and mode != Reconnect.NEVER:
            start, delay_s = MOVED, 0.0
        elif self.want_reconnect:
            start, delay_s = "client_reconnect", 0.0
        elif mode == Reconnect.ALWAYS:
            start, delay_s = f"after_close_{sess.close_code or 1006}", STATE.rng.uniform(*AFTER_CLOSE_DELAY_S)
        else:
            STATE.recorder.on_closed(sess)
            return
        self.want_reconnect = False
        self.reconnecting = True
        STATE.spawn(self.reconnect(start, delay_s, sess))

    async def reconnect(self, start: str, delay_s: float, prev: Session) -> None:
        await asyncio.sleep(delay_s)
        asked_us = now_us()
        sess: Session | None = None
        try:
            sess = await self.open(start, Counter(), STATE.reconnect_failures)
        except Exception:  # noqa: BLE001 - counted in STATE.reconnect_failures; recorded below
            pass
        self.reconnecting = False
        self.gave_up = sess is None
        STATE.recorder.on_reconnect(
            ReconnectRecord(
                idx=self.idx,
                start=sess.start if sess else start,
                goodbye_us=prev.goodbye_us,
                closed_us=prev.t_close_us,
                asked_us=asked_us,
                hello_us=sess.t_hello_us if sess else 0,
                attempts=self.attempts,
                gw=sess.gw if sess else "",
                sid=sess.sid if sess else 0,
            )
        )


@dataclass
class State:
    """The process's clients and settings (one load-client process, one ``State``)."""

    recorder: Recorder = field(default_factory=Recorder)
    max_attempts: int = MAX_CONNECT_ATTEMPTS
    budget_s: float = CONNECT_BUDGET_S
    clients: dict[int, Client] = field(default_factory=dict)
    http: aiohttp.ClientSession | None = None
    api_url: str = ""
    proc: int = 0
    next_sid: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    reconnect: Reconnect = Reconnect.NEVER
    quitting: bool = False
    rng: random.Random = field(default_factory=random.Random)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    reconnect_failures: Counter[str] = field(default_factory=Counter)
    typing_id: int = 0

    def new_sid(self) -> int:
        self.next_sid += 1
        return self.proc * SID_STRIDE + self.next_sid

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send_typing(self, idx: int, channel: str) -> bool:
        client = self.clients.get(idx)
        if client is None or client.cur is None:
            return False
        self.typing_id += 1
        if not client.cur.send_text(b'{"id":%d,"type":"typing","channel":"%s"}' % (self.typing_id, channel.encode())):
            return False
        self.recorder.on_typing_sent(idx, channel)
        return True


STATE = State()


async def connect(req: dict[str, Any]) -> dict[str, Any]:
    url = str(req.get("url") or "")
    tokens: list[str] = list(req.get("tokens") or ([""] * int(req.get("n", 0)) if url else []))
    n = len(tokens)
    first = max(STATE.clients, default=-1) + 1
    indices: list[int] = [int(i) for i in req.get("indices") or range(first, first + n)]
    regions: list[str] = list(req.get("regions") or [str(req.get("region") or "")])  # round-robin if short
    addrs: list[str] = list(req.get("local_addrs") or [""])
    after_hello: list[str | None] = list(req.get("after_hello") or [])
    concurrency = int(req.get("concurrency", DEFAULT_CONCURRENCY))
    STATE.api_url = str(req.get("api_url") or STATE.api_url)
    STATE.proc = int(req.get("proc", STATE.proc))
    STATE.timeout_s = float(req.get("timeout_s", DEFAULT_TIMEOUT_S))
    STATE.reconnect = Reconnect(req.get("reconnect", STATE.reconnect))
    if STATE.http is None and not url:
        STATE.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=STATE.timeout_s),
        )
    sem = asyncio.Semaphore(concurrency)
    gws: list[str | None] = [None] * n
    errors: Counter[str] = Counter()  # clients that did not connect, by the reason of their last attempt
    retries: Counter[str] = Counter()  # attempts retried, by reason

    async def one(i: int) -> None:
        idx = indices[i]
        client = STATE.clients[idx] = Client(idx, tokens[i], regions[i % len(regions)], url, addrs[idx % len(addrs)])
        async with sem:
            try:
                sess = await client.open("first", retries)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors[failure_reason(client.stage, exc)] += 1
                return
            if i < len(after_hello) and after_hello[i]:
                sess.send_text(str(after_hello[i]).encode())
            gws[i] = sess.gw

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    pending: set[asyncio.Future[None]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=float(req.get("deadline_s", DEFAULT_DEADLINE_S)))
    for task in pending:  # past the request's deadline: give up on these
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
        errors["deadline"] += len(pending)
    connected = [indices[i] for i in range(n) if gws[i] is not None]
    return {
        "ok": True,
        "connected": len(connected),
        "failed": n - len(connected),
        "errors": dict(errors),
        "retries": dict(retries),
        "gw": gws,
        "conns": connected,
        "elapsed_s": time.monotonic() - started,
    }


async def reconnect(req: dict[str, Any]) -> dict[str, Any]:
    asked = 0
    for idx in req["clients"]:
        client = STATE.clients.get(int(idx))
        if client is None or client.cur is None or client.cur.transport is None or client.reconnecting:
            continue
        client.want_reconnect = True
        client.cur.close()
        asked += 1
    return {"ok": True, "asked": asked}


async def typing(req: dict[str, Any]) -> dict[str, Any]:
    sent = sum(STATE.send_typing(int(idx), str(channel)) for idx, channel in req["sends"])
    return {"ok": True, "sent": sent}


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
            for _ in range(burst):
                STATE.send_typing(idx, channel)
        i += 1


async def typing_schedule(req: dict[str, Any]) -> dict[str, Any]:
    senders = [(int(a), str(b)) for a, b in req["senders"]]
    STATE.spawn(type_loop(senders, float(req["interval_s"]), float(req["duration_s"]), int(req.get("burst", 1))))
    return {"ok": True}


async def stat(req: dict[str, Any]) -> dict[str, Any]:
    clients = STATE.clients.values()
    return {
        "ok": True,
        "open": sum(1 for c in clients if c.cur is not None),
        "reconnecting": sum(1 for c in clients if c.reconnecting),
        "gave_up": sum(1 for c in clients if c.gave_up),
        "sessions": sum(len(c.sessions) for c in clients),
        **STATE.recorder.stat(),
    }


async def dump(req: dict[str, Any]) -> dict[str, Any]:
    sessions = [s for c in STATE.clients.values() for s in c.sessions]
    failures, STATE.reconnect_failures = dict(STATE.reconnect_failures), Counter()
    return {"ok": True, **STATE.recorder.dump(str(req["path"]), sessions, failures)}


async def quit_all(req: dict[str, Any]) -> dict[str, Any]:
    STATE.quitting = True
    for task in list(STATE.tasks):
        task.cancel()
    for client in STATE.clients.values():
        if client.cur is not None:
            client.cur.close()
    if STATE.http is not None:
        await STATE.http.close()
    await asyncio.sleep(QUIT_GRACE_S)  # wait-ok: the close frames go out before the process exits
    return {"ok": True}


COMMANDS: dict[str, Handler] = {
    "connect": connect,
    "reconnect": reconnect,
    "typing": typing,
    "typing_schedule": typing_schedule,
    "stat": stat,
    "dump": dump,
    "quit": quit_all,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load_client", description=__doc__.split("\n", 1)[0])
    p.add_argument("--records", choices=sorted(RECORDERS), default="latency", help="what the clients record")
    p.add_argument("--max-connect-attempts", type=int, default=MAX_CONNECT_ATTEMPTS, help="attempts per (re)connect")
    p.add_argument("--connect-budget-s", type=float, default=CONNECT_BUDGET_S, help="seconds per (re)connect")
    args = p.parse_args(argv)
    STATE.recorder = RECORDERS[args.records]()
    STATE.max_attempts = args.max_connect_attempts
    STATE.budget_s = args.connect_budget_s

    import uvloop

    uvloop.run(control_loop(COMMANDS))


if __name__ == "__main__":
    main()
