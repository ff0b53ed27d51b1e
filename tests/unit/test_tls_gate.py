"""services/tls_gate.py: the source a TLS handshake counts against (an IPv4 address, an IPv6 /64)."""

from __future__ import annotations

from services.tls import HandshakeLimiter
from services.tls_gate import handshake_source


def test_ipv6_sources_are_grouped_by_their_64() -> None:
    assert handshake_source(("2001:db8:1:2::1", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert handshake_source(("2001:db8:1:2:ffff:ffff:ffff:ffff", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert handshake_source(("2001:db8:1:3::1", 5000, 0, 0)) == "2001:db8:1:3::/64"  # the next /64: its own
    assert handshake_source(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert handshake_source(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"  # IPv4-mapped: the IPv4 address
    assert handshake_source(("127.0.0.1", 5000)) == "127.0.0.1"
    assert handshake_source(None) == "?"


def test_one_host_cannot_escape_the_handshake_limit_by_rotating_its_ipv6_addresses() -> None:
    limiter = HandshakeLimiter(rate_per_s=0.0, burst=3)
    taken = [limiter.take(handshake_source((f"2001:db8:0:1::{n:x}", 443, 0, 0)), 0.0) for n in range(1, 11)]
    assert taken == [True] * 3 + [False] * 7  # one /64, one budget
    assert limiter.take(handshake_source(("2001:db8:0:2::1", 443, 0, 0)), 0.0)  # another /64 is not held up
