"""The source a connection counts under for per-source limits, sans I/O.

A host is routinely given a whole IPv6 /64 (SLAAC, privacy addresses, RFC 6177), so a limit
kept per IPv6 address would let one host open connections from each of 2**64 addresses. Every
per-source limit in the fleet (the TLS handshake budget of services/tls_gate.py, the gateway's
``--max-connections-per-address``) therefore counts an IPv4 address as itself and an IPv6 address
as its /64 network; an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) counts as its IPv4 address.
"""

from __future__ import annotations

import ipaddress

IPV6_SOURCE_PREFIX_BITS = 64


def source_of_address(host: str) -> str:
    """The source ``host`` counts under: its IPv4 address, or its IPv6 address's /64 network.
    A host that is not an IP address (a name, a test placeholder) is its own source."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # without a zone index (fe80::1%eth0)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX_BITS), strict=False))
    return str(address)
