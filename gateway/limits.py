"""Per-user and per-address connection limits at the gateway, sans I/O.

A gateway holds at most ``--max-connections`` sockets in all; these two limits
keep one user or one source address from taking a large share of them (a
leaked reconnect loop, a script, an abuser):

* ``--max-connections-per-address`` (:data:`DEFAULT_MAX_CONNECTIONS_PER_ADDRESS`):
  open websockets from one client address. Checked twice: before the
  websocket upgrade (HTTP 429, nothing allocated for the refused client) and
  when the connection is counted (close code 4029, for handshakes that raced
  past the first check). Behind an edge proxy every client shares the
  proxy's address; ``--client-address-header X-Forwarded-For`` makes the
  gateway count the address the proxy puts last in that header instead.
  An IPv6 address counts as its /64 (services/source_address.py): one host
  holds a whole /64.
* ``--max-connections-per-user`` (:data:`DEFAULT_MAX_CONNECTIONS_PER_USER`):
  open websockets of one user, across all of their devices and tabs, checked
  once the ticket names the user; refused with close code 4029.

* ``--max-handshakes-per-address`` (:data:`DEFAULT_MAX_HANDSHAKES_PER_ADDRESS`):
  connections from one TCP peer address whose upgrade request has not arrived
  yet, counted from the TCP accept; past it a new connection is answered HTTP
  429 at once and closed. Each such connection lasts at most
  ``--handshake-timeout-s`` (:data:`HANDSHAKE_TIMEOUT_S`). Without this bound a
  client with no ticket could hold any number of half-open connections (a
  slowloris: a partial request line, never finished), each a file descriptor
  for the whole timeout, uncounted by the per-address limit above, which
  counts upgraded websockets only. Not applied with ``--client-address-header``:
  the TCP peer is then the edge proxy, which forwards a request only once its
  head has arrived.

0 turns a limit off. :class:`ConnectionLimits` (services/connection_limits.py) only counts; the gateway
(:mod:`gateway.app`) refuses and releases.
"""

from __future__ import annotations

from services.connection_limits import ConnectionLimits
from services.source_address import source_of_address

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_ADDRESS",
    "DEFAULT_MAX_CONNECTIONS_PER_USER",
    "DEFAULT_MAX_HANDSHAKES_PER_ADDRESS",
    "HANDSHAKE_TIMEOUT_S",
    "ConnectionLimits",
    "client_address",
]

# Slack's clients open one websocket per signed-in workspace per device or tab;
# a few dozen covers a person with many tabs, while a runaway reconnect loop
# hits the limit in a second.
DEFAULT_MAX_CONNECTIONS_PER_USER = 50
# One address can be a whole office behind NAT, or a load generator
# (bench/connections.py opens 5,000 per 127.0.0.x source address): generous,
# but far below --max-connections, so one address cannot fill a gateway.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 10_000
# A handshake takes milliseconds; the load generators keep at most ~100 in flight per address
# (bench/connections.py --concurrency), so this bound is met only by connections left half-open.
DEFAULT_MAX_HANDSHAKES_PER_ADDRESS = 1_000
# From the TCP accept to the websocket upgrade (websockets' open_timeout, its default).
HANDSHAKE_TIMEOUT_S = 10.0


def client_address(peer: str, header_value: str | None) -> str:
    """The source to count a client under: the last hop of a proxy's header when one is
    configured and present (the entry the proxy itself appended), else the TCP peer; an IPv6
    address counts as its /64 (services/source_address.py)."""
    if header_value:
        last = header_value.rsplit(",", 1)[-1].strip()
        if last:
            return source_of_address(last)
    return source_of_address(peer)
