"""Moving clients off a gateway without loss: region drain and shutdown.

Moving one session: note where it is in each of its channels and stop
delivering to it (both in one step, so nothing reaches it after the note),
leave that position at the webapp as a resume record, send Slack's
``{"type": "goodbye"}``, close with 1001. The client calls ``rtm.connect``
again; the webapp hands it a ticket naming the record, on a gateway of a good
region, and that gateway replays what the client missed, exactly once.

If the webapp does not take the resume record (it is down, or too slow to answer
within ``RESUME_TIMEOUT_S``), the session cannot resume: it gets no ``goodbye``
(which promises the resume) and is closed with 4010 (``RESYNC``: reconnect and
catch up), so the client reads what it missed with ``conversations.history``,
as after any other reconnect. Before, it got ``goodbye`` all the same, its
next connection started at a fresh bootstrap, and everything between its
position and that bootstrap was silently skipped (docs/soak.md, Findings).

Sessions are moved at a bounded rate (``--drain-rate-per-s``), so the region
that receives them sees a steady stream rather than a reconnect storm.

:class:`RegionDrain` watches ``rtm/regions/drained/<region>`` in Consul: while
the key exists the gateway re-registers with ``role=draining`` (``rtm status``
shows it, ``rtm.connect`` skips it), refuses new connections (``goodbye``),
and moves its sessions away; when the key goes, it serves again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.state import Effects, GatewayState, Session
from services.errors import CloseCode
from services.metrics import ServiceMetrics
from services.regions import drained_key

log = logging.getLogger("rtm.gateway.drain")

DEFAULT_DRAIN_RATE_PER_S = 500.0  # sessions moved per second while draining
MOVE_TICK_S = 0.05  # sessions are moved in batches this often
MAX_MOVES_IN_FLIGHT = 256  # moves (resume POST + goodbye + close) running at once
GOODBYE = '{"type":"goodbye"}'


class ClosingSocket(Protocol):
    """What a move does to a client's websocket."""

    async def send(self, message: str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class MovingGateway(Protocol):
    """What :class:`Mover` uses of the gateway."""

    @property
    def metrics(self) -> ServiceMetrics: ...

    @property
    def state(self) -> GatewayState: ...

    @property
    def sockets(self) -> Mapping[int, ClosingSocket]: ...  # sid -> its websocket

    def apply(self, effects: Effects) -> None: ...

    @property
    def socket_mode(self) -> AppMover: ...

    async def leave_resume(
        self, session: Session, where: dict[str, int], until: dict[str, int] | None = None
    ) -> str: ...

    async def withdraw_resume(self, owner: str, rid: str) -> bool: ...


class AppMover(Protocol):
    """Moves a Slack app's link instead of a client session (:class:`gateway.socket_mode.SocketMode`)."""

    def owns(self, session: Session) -> bool: ...

    async def move(self, session: Session, where: dict[str, int], reason: str) -> None: ...


class DrainingGateway(Protocol):
    """What :class:`RegionDrain` uses of the gateway."""

    @property
    def metrics(self) -> ServiceMetrics: ...

    @property
    def discovery(self) -> FlagWatcher: ...

    @property
    def mover(self) -> Mover: ...

    async def retag(self) -> None: ...


class FlagWatcher(Protocol):
    """Consul's KV watch (:class:`services.discovery.Discovery`)."""

    def watch_key(self, key: str, on_change: Callable[[bytes | None], Awaitable[None]]) -> Any: ...


class Mover:
    """Moves sessions off this gateway, at most ``rate_per_s`` a second."""

    def __init__(self, gateway: MovingGateway) -> None:
        self.gateway = gateway
        m = gateway.metrics
        self.moved = m.counter("rtm_gw_sessions_moved_total", "Sessions moved off this gateway", ["reason"])
        self.resume_failures = m.counter("rtm_gw_resume_failures_total", "Resume records the webapp did not take")
        self.goodbye_missed = m.counter(
            "rtm_gw_goodbye_missed_total",
            "Moved sessions whose client closed the socket before its goodbye (their resume record is withdrawn)",
        )
        # sid -> leaves a detached session had not reached (channel -> leave seq), until its record is left
        self.pending_leaves: dict[int, dict[str, int]] = {}

    async def move_all(self, rate_per_s: float, reason: str, keep_going: Any = lambda: True) -> int:
        """Move every current session (and any that arrive meanwhile), paced; return how many moved.

        The pace is kept by starting moves on a clock, not by waiting for each
        batch: a slow resume POST or close handshake delays its own session,
        not the ones behind it. At most :data:`MAX_MOVES_IN_FLIGHT` run at once.
        """
        per_tick = max(1, int(rate_per_s * MOVE_TICK_S))
        in_flight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_MOVES_IN_FLIGHT)
        total = 0
        next_tick = time.monotonic()
        while keep_going():
            batch = list(self.gateway.state.sessions.values())[:per_tick]
            if not batch:
                break
            for session in batch:
                where = self.detach(session)  # at once: nothing more reaches it
                if self.gateway.socket_mode.owns(session):  # a Slack app's link: gateway/socket_mode.py
                    self.pending_leaves.pop(session.sid, None)  # an app's record does not carry them (yet)
                    task = asyncio.create_task(self.gateway.socket_mode.move(session, where, reason))
                else:
                    task = asyncio.create_task(self.finish(session, where, reason, slots))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            total += len(batch)
            next_tick += MOVE_TICK_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        return total

    def detach(self, session: Session) -> dict[str, int]:
        """Note where ``session`` is in each channel and stop delivering to it, in one step."""
        gateway = self.gateway
        where = gateway.state.position(session)
        until = gateway.state.pending_leaves(session)
        if until:
            self.pending_leaves[session.sid] = until
        gateway.apply(gateway.state.detach(session))
        return where

    async def finish(
        self,
        session: Session,
        where: dict[str, int],
        reason: str,
        slots: asyncio.Semaphore,
        code: CloseCode = CloseCode.GOING_AWAY,
    ) -> None:
        """Leave the resume record, then say goodbye and close with ``code``; if the record was
        not taken, close with 4010 and no goodbye (the client catches up from history)."""
        until = self.pending_leaves.pop(session.sid, None)
        async with slots:
            rid = ""
            try:
                rid = await self.gateway.leave_resume(session, where, until)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the record is not there
                self.resume_failures.inc()
                log.warning(
                    "resume record for %s not taken (%r): closing with %d, no goodbye; it catches up from history",
                    session.user,
                    exc,
                    CloseCode.RESYNC,
                )
            ws = self.gateway.sockets.get(session.sid)
            told = False
            if ws is not None:
                if rid:
                    told = await say_goodbye(ws, reason, code)
                else:
                    await ws.close(CloseCode.RESYNC, "resume record not taken: reconnect and catch up")
            self.moved.labels(reason).inc()
        if rid and not told:
            # The client closed (or lost) the socket while the record was being left: it never
            # learns it was moved and reconnects as a fresh connection. Its record, left pending,
            # would be claimed by its token's next move and replay what it already had. (Outside
            # the slot: the withdrawal's retries must not hold up other sessions' moves.)
            self.goodbye_missed.inc()
            await self.gateway.withdraw_resume(session.user, rid)


async def say_goodbye(ws: Any, reason: str, code: CloseCode = CloseCode.GOING_AWAY) -> bool:
    """Slack's goodbye, then a close with ``code``, 1001 by default (the legacy RTM client ignores
    goodbye). False if the goodbye could not be sent: the client had closed, or was closing, the
    socket itself (its close frame had arrived), so it will not act on a goodbye."""
    if ws.state is not State.OPEN:
        return False
    try:
        await ws.send(GOODBYE)
    except ConnectionClosed:
        return False
    await ws.close(code, reason)
    return True


class RegionDrain:
    """Follows this gateway's region's drain flag in Consul."""

    def __init__(self, gateway: DrainingGateway, region: str, rate_per_s: float) -> None:
        self.gateway = gateway
        self.region = region
        self.rate_per_s = rate_per_s
        self.draining = False
        self.task: asyncio.Task[None] | None = None
        gateway.metrics.gauge("rtm_gw_draining", "1 while this gateway's region is drained").set_function(
            lambda: 1 if self.draining else 0
        )

    def start(self) -> None:
        self.gateway.discovery.watch_key(drained_key(self.region), self.on_flag)

    async def on_flag(self, value: bytes | None) -> None:
        draining = value is not None
        if draining == self.draining:
            return
        self.draining = draining
        log.warning(
            "region %s %s", self.region, "drained: moving clients away" if draining else "undrained: serving again"
        )
        try:
            await self.gateway.retag()
        except Exception as exc:
            log.warning("re-registering as %s failed: %s", "draining" if draining else "active", exc)
        if draining and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        moved = await self.gateway.mover.move_all(self.rate_per_s, "region drained", lambda: self.draining)
        log.warning("region drain: moved %d sessions", moved)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
