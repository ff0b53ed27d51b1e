"""The mutual TLS gate in front of every server: a peer reaches the server's protocol only once verified.

:func:`services.connection.serve` puts a :class:`TlsGate` in front of each
server it starts (msgpack servers, and the webapp's internal HTTP). A peer that
fails the handshake (no certificate, another CA, expired, no fleet identity) or
does not finish it within the handshake timeout is disconnected, reported to
``on_refused`` and logged at most once per source address per minute
(:class:`services.tls.RefusalLog`). Each source (an IPv4 address, or an IPv6 /64:
:func:`handshake_source`) may start at most
``--tls-handshake-burst`` handshakes at once and ``--tls-handshake-rate-per-s``
after that (successful ones are given back, :class:`services.tls.HandshakeLimiter`);
a connection over the limit is closed before any TLS work and reported to
``on_refused`` with :class:`services.errors.HandshakeRateLimited` (counted as
``rtm_errors_total{kind="handshake_rate"}``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from services.errors import HandshakeRateLimited
from services.identity import BadIdentity
from services.source_address import source_of_address
from services.tls import HandshakeLimiter, RefusalLog, WireTrust, transport_identity

log = logging.getLogger("rtm.connection")

RefusedHandler = Callable[[str, BaseException], None]


class TlsGate:
    """The server side of mutual TLS: every accepted TCP connection does its
    handshake here, and only a verified fleet peer reaches the real protocol.

    The TLS layer is the loop's own ``SSLProtocol`` (uvloop's on uvloop, asyncio's
    otherwise), attached to the accepted transport by hand rather than through
    ``create_server(ssl=...)``: that way a failed handshake (which asyncio
    reports to nobody) reaches :meth:`_refuse` (uvloop's server-side
    ``start_tls`` fails in 0.23; its protocol attached this way works). Before
    any TLS work, the source's handshake budget is checked
    (:class:`services.tls.HandshakeLimiter`). The peer's identity is checked in
    :class:`_Verify` before any byte reaches the real protocol.
    """

    def __init__(
        self, trust: WireTrust, factory: Callable[[], asyncio.BaseProtocol], on_refused: RefusedHandler | None
    ) -> None:
        self.trust = trust
        self.factory = factory
        self.on_refused = on_refused
        self.refusal_log = RefusalLog()
        self.limiter = HandshakeLimiter(trust.handshake_rate_per_s, trust.handshake_burst)

    def protocol(self) -> asyncio.BaseProtocol:
        return _Acceptor(self)

    def accept(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peername = transport.get_extra_info("peername")
        source = handshake_source(peername)
        if not self.limiter.take(source, time.monotonic()):  # before any TLS work: that is what it protects
            transport.abort()
            self._refuse(
                peername,
                HandshakeRateLimited(
                    f"over {self.limiter.rate_per_s:g} handshakes/s after a burst of {self.limiter.burst}"
                ),
            )
            return
        waiter: asyncio.Future[None] = loop.create_future()
        verify = _Verify(self, peername)
        assert self.trust.server is not None
        tls = _ssl_protocol_class(loop)(
            loop,
            verify,
            self.trust.server,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.trust.handshake_timeout_s,
            call_connection_made=True,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        waiter.add_done_callback(lambda done: self._handshake_done(done, peername, transport))

    def _handshake_done(self, done: asyncio.Future[None], peername: Any, transport: asyncio.Transport) -> None:
        exc = done.exception()
        if exc is not None:
            transport.abort()
            self._refuse(peername, exc)

    def verified(self, peername: Any) -> None:
        """A handshake from ``peername`` succeeded: its source gets its token back."""
        self.limiter.give_back(handshake_source(peername), time.monotonic())

    def _refuse(self, peername: Any, exc: BaseException) -> None:
        source = handshake_source(peername)
        if self.on_refused is not None:
            self.on_refused(source, exc)
        if self.refusal_log.should_log(source, time.monotonic()):
            if isinstance(exc, ssl.SSLError):
                why = f"TLS handshake failed: {exc.reason or exc}"
            elif isinstance(exc, HandshakeRateLimited):
                why = f"too many TLS handshakes from this address ({exc})"
            elif isinstance(exc, ConnectionAbortedError):
                why = f"no TLS handshake within {self.trust.handshake_timeout_s}s"
            else:
                why = f"{type(exc).__name__}: {exc}"
            skipped = self.refusal_log.take_suppressed()
            more = f" ({skipped} more refusals not logged)" if skipped else ""
            log.warning("refused %s: %s%s", peername or source, why, more)


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol: uvloop's (Cython, the TLS records handled in C) on a
    uvloop loop, asyncio's (pure Python) otherwise. Both take the same arguments."""
    if type(loop).__module__ == "uvloop":
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # exported, not in its stubs
    return sslproto.SSLProtocol


def handshake_source(peername: Any) -> str:
    """The source a peer counts against (the handshake limit, the refusal log): its IPv4
    address, or the /64 network of its IPv6 address (services/source_address.py)."""
    if not peername:
        return "?"
    return source_of_address(str(peername[0]))


class _Acceptor(asyncio.Protocol):
    """The protocol of an accepted TCP connection for the moment before TLS takes it over."""

    def __init__(self, gate: TlsGate) -> None:
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate.accept(transport)  # type: ignore[arg-type]


class _Verify(asyncio.Protocol):
    """Called once the handshake verified the chain: checks the certificate names
    a fleet identity, then hands the TLS transport to the real protocol (before
    the first decrypted byte is delivered)."""

    def __init__(self, gate: TlsGate, peername: Any) -> None:
        self.gate = gate
        self.peername = peername

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            if transport_identity(transport) is None:
                raise BadIdentity("no TLS session")
        except BadIdentity as exc:
            transport.abort()  # type: ignore[attr-defined]
            self.gate._refuse(self.peername, exc)
            return
        self.gate.verified(self.peername)
        protocol = self.gate.factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # only after a refusal: dropped
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass
