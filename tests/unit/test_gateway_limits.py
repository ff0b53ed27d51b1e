"""Unit tests for gateway.limits: per-user and per-address connection counts."""

from __future__ import annotations

from gateway.limits import ConnectionLimits, client_address


def test_the_user_limit_refuses_the_next_connection_and_a_release_makes_room() -> None:
    limits = ConnectionLimits(max_per_user=2, max_per_address=0)
    assert limits.take_user("U1") and limits.take_user("U1")
    assert not limits.take_user("U1")
    assert limits.take_user("U2")  # another user is not affected
    limits.release_user("U1")
    assert limits.take_user("U1")
    assert limits.users == {"U1": 2, "U2": 1}


def test_the_address_limit_is_checked_before_counting_and_when_counting() -> None:
    limits = ConnectionLimits(max_per_user=0, max_per_address=2)
    assert not limits.address_full("10.0.0.1")
    assert limits.take_address("10.0.0.1") and limits.take_address("10.0.0.1")
    assert limits.address_full("10.0.0.1")
    assert not limits.take_address("10.0.0.1")
    assert limits.addresses == {"10.0.0.1": 2}  # a refusal counts nothing


def test_releases_forget_idle_keys() -> None:
    limits = ConnectionLimits(max_per_user=5, max_per_address=5)
    limits.take_user("U1")
    limits.take_address("a")
    limits.release_user("U1")
    limits.release_address("a")
    limits.release_address("never-seen")  # harmless
    assert limits.users == {} and limits.addresses == {}


def test_zero_means_no_limit() -> None:
    limits = ConnectionLimits(max_per_user=0, max_per_address=0)
    assert all(limits.take_user("U1") and limits.take_address("a") for _ in range(10_000))


def test_client_address_takes_the_proxys_last_hop() -> None:
    assert client_address("127.0.0.1", None) == "127.0.0.1"
    assert client_address("127.0.0.1", "") == "127.0.0.1"
    assert client_address("127.0.0.1", "1.2.3.4, 10.0.0.7") == "10.0.0.7"  # a client cannot forge the last hop
    assert client_address("127.0.0.1", " , ") == "127.0.0.1"


def test_client_address_counts_an_ipv6_host_as_its_64() -> None:
    # One host holds a whole /64: two of its addresses are one source, another /64 is another.
    assert client_address("2001:db8:1:2::1", None) == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:2:ffff::9", None) == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1", None) == "2001:db8:1:3::/64"
    assert client_address("127.0.0.1", "::ffff:10.0.0.7") == "10.0.0.7"  # IPv4-mapped: IPv4
    limits = ConnectionLimits(max_per_address=1)
    assert limits.take_address(client_address("2001:db8::1", None))
    assert not limits.take_address(client_address("2001:db8::2", None))
