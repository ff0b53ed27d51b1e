"""The webapp's public port's limits, sans I/O (session 12; docs/hardening-webapp.md, section 6).

Every connection to the public port, the lean front's and aiohttp's alike
(webapp_stub/http_front.py), counts against two limits: ``--max-http-connections`` open at once
(:data:`MAX_HTTP_CONNECTIONS`) and ``--max-http-connections-per-address`` from one client address
(:data:`MAX_HTTP_CONNECTIONS_PER_ADDRESS`; an IPv6 address counts as its /64,
services/source_address.py). Past either, a new connection is answered 503
``too_many_connections`` and closed. A request must arrive within ``--http-request-timeout-s``
(webapp_stub/args.py, :data:`~webapp_stub.args.HTTP_REQUEST_TIMEOUT_S`): at the lean front from
its first byte to its last (then 408 ``request_timeout`` and the connection is closed); at aiohttp,
its body from when it is read (``request_timeout``) and its head within the keep-alive timeout
(then aiohttp closes the connection). 0 turns a connection limit off.
"""

from __future__ import annotations

from services.config import Parser
from services.connection_limits import ConnectionLimits
from services.source_address import source_of_address
from webapp_stub.args import HTTP_REQUEST_TIMEOUT_S

# Connections the public port holds at once, aiohttp's included.
MAX_HTTP_CONNECTIONS = 10_000
# ... from one client address: generous, as one address can be an office behind NAT or a load
# generator (every test and benchmark posts from 127.0.0.1), but one address cannot fill the port.
MAX_HTTP_CONNECTIONS_PER_ADDRESS = 1_000
MAX_HTTP_CONNECTIONS_LIMIT = 1_000_000  # what either limit may be set to
MAX_HTTP_REQUEST_TIMEOUT_S = 3600.0


def add_http_limit_flags(parser: Parser) -> None:
    """The public port's limits (module docstring)."""
    parser.add(
        "--max-http-connections",
        MAX_HTTP_CONNECTIONS,
        "connections the public port holds at once, aiohttp's included; past it 503 (0: no limit)",
        at_least=0,
        at_most=MAX_HTTP_CONNECTIONS_LIMIT,
    )
    parser.add(
        "--max-http-connections-per-address",
        MAX_HTTP_CONNECTIONS_PER_ADDRESS,
        "connections from one client address; past it 503 (0: no limit)",
        at_least=0,
        at_most=MAX_HTTP_CONNECTIONS_LIMIT,
    )
    parser.add(
        "--http-request-timeout-s",
        HTTP_REQUEST_TIMEOUT_S,
        "the longest a request's head and body may take to arrive; then 408 request_timeout",
        above=0.0,
        at_most=MAX_HTTP_REQUEST_TIMEOUT_S,
    )


def client_source(peername: object) -> str:
    """The source a connection counts under: its peer's address (an IPv6 one as its /64)."""
    if isinstance(peername, tuple) and peername:
        host = str(peername[0])
        # an IPv4 peer is its own source, already canonical (inet_ntop): no parse per connection,
        # which is per post for a client that does not keep connections alive (slack_sdk's WebClient)
        return host if ":" not in host else source_of_address(host)
    return ""


class PortLimits:
    """The public port's open connections, in all and per client address, against the limits."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.per_address = ConnectionLimits(max_per_address=max_per_address)
        self.open = 0

    def take(self, source: str) -> bool:
        """Count a new connection from ``source``; False (nothing counted) past a limit."""
        if 0 < self.max_connections <= self.open or not self.per_address.take_address(source):
            return False
        self.open += 1
        return True

    def release(self, source: str) -> None:
        """A counted connection from ``source`` is gone."""
        self.open -= 1
        self.per_address.release_address(source)
