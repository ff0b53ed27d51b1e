"""The public port's limits (webapp_stub/http_limits.py, http_front.py), without sockets: connections
at once and per client address, aiohttp's included, and a request's time to arrive."""

from __future__ import annotations

import json

from tests.unit.test_http_front import MAX_BODY, BlockingApi, Fallback, HandedTransport, post
from webapp_stub.http_front import PRUNE_ON_REFUSAL_S, FrontProtocol, HttpFront
from webapp_stub.http_limits import PortLimits, client_source


def test_port_limits_count_in_all_and_per_source() -> None:
    limits = PortLimits(max_connections=3, max_per_address=2)
    assert limits.take("10.0.0.1") and limits.take("10.0.0.1")
    assert not limits.take("10.0.0.1")  # its address is full
    assert limits.take("10.0.0.2")
    assert not limits.take("10.0.0.3")  # the port is full
    limits.release("10.0.0.1")
    assert limits.take("10.0.0.3") and limits.open == 3
    off = PortLimits(max_connections=0, max_per_address=0)
    assert all(off.take("10.0.0.1") for _ in range(5000))


def test_a_client_counts_under_its_address_an_ipv6_one_under_its_64() -> None:
    assert client_source(("10.1.2.3", 5000)) == "10.1.2.3"
    assert client_source(("2001:db8:1:2::7", 5000, 0, 0)) == client_source(("2001:db8:1:2::9", 1, 0, 0))
    assert client_source(None) == ""


def front(**limits: object) -> tuple[HttpFront, BlockingApi]:
    api = BlockingApi()
    return HttpFront(api, Fallback, max_body_bytes=MAX_BODY, **limits), api  # type: ignore[arg-type]


def connect(http: HttpFront, peer: str = "127.0.0.1") -> tuple[FrontProtocol, HandedTransport]:
    protocol, transport = FrontProtocol(http), HandedTransport(peer)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def refused(transport: HandedTransport) -> bool:
    if not transport.closed or not transport.written:
        return False
    head, _, body = transport.written[-1].partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 503 ") and json.loads(body) == {"ok": False, "error": "too_many_connections"}


async def test_past_the_port_limit_a_connection_is_refused_503_until_one_goes() -> None:
    http, api = front(max_connections=2, max_connections_per_address=0)
    first, _ = connect(http)
    connect(http, "10.0.0.9")
    _, third = connect(http, "10.0.0.7")
    assert refused(third) and api.metrics.kinds == ["too_many_connections"]
    first.connection_lost(None)
    _, fourth = connect(http, "10.0.0.7")
    assert not fourth.closed


async def test_one_address_holds_at_most_its_share() -> None:
    http, _ = front(max_connections=0, max_connections_per_address=2)
    connect(http)
    connect(http)
    _, third = connect(http)
    assert refused(third)
    _, other = connect(http, "10.0.0.2")
    assert not other.closed


async def test_connections_handed_to_aiohttp_count_until_they_close() -> None:
    http, _ = front(max_connections=1, max_connections_per_address=0)
    protocol, handed = connect(http)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # aiohttp's from here on
    assert http.handed and not http.connections
    _, second = connect(http)
    assert refused(second)
    handed.closed = True  # aiohttp closed it: the next look finds it gone
    http._pruned_at -= PRUNE_ON_REFUSAL_S  # a refusal looks at most every PRUNE_ON_REFUSAL_S
    _, third = connect(http)
    assert not third.closed and not http.handed


async def test_without_the_lean_path_every_connection_goes_to_aiohttp_inside_the_limits() -> None:
    http, _ = front(lean=False, max_connections=1, max_connections_per_address=0)
    connect(http)
    assert http.handed_over == 1 and not http.connections
    _, second = connect(http)
    assert refused(second)


async def test_a_request_that_keeps_arriving_is_answered_408_and_closed() -> None:
    http, api = front(request_timeout_s=10.0, keepalive_timeout_s=75.0)
    protocol, transport = connect(http)
    whole = post(b"channel=C1&text=slow")
    protocol.data_received(whole[:5])
    started = protocol.request_started
    assert started is not None
    for i in range(5, 20):  # a byte at a time keeps the connection active, not the request young
        protocol.data_received(whole[i : i + 1])
    assert http.close_idle(started + 9.0) == 0 and not transport.closed
    assert http.close_idle(started + 10.5) == 1 and transport.closed
    head, _, body = transport.written[-1].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and json.loads(body) == {"ok": False, "error": "request_timeout"}
    assert api.metrics.kinds == ["request_timeout"]


async def test_a_request_being_answered_is_not_timed_nor_one_that_came_whole() -> None:
    http, _ = front(request_timeout_s=10.0, keepalive_timeout_s=75.0)
    protocol, transport = connect(http)
    protocol.data_received(post(b"channel=C1&text=a"))  # whole: answered (its answer waits)
    assert protocol.busy and protocol.arriving_since() is None
    assert http.close_idle(protocol.last_active + 60.0) == 0 and not transport.closed
    idle, idle_transport = connect(http)
    assert idle.arriving_since() is None
    assert http.close_idle(idle.last_active + 60.0) == 0 and not idle_transport.closed  # idle: keep-alive's
    assert http.close_idle(idle.last_active + 76.0) == 1 and idle_transport.closed


async def test_a_closed_connection_whose_client_does_not_read_is_aborted_not_answered_again() -> None:
    """Review 12: a connection closed (408, keep-alive) with answers its client never reads stayed
    open and counted for ever (close() waits for them), and each sweep wrote it another 408."""
    http, api = front(request_timeout_s=10.0, keepalive_timeout_s=75.0)
    protocol, transport = connect(http)
    protocol.data_received(post(b"channel=C1&text=slow")[:5])
    started = protocol.request_started
    assert started is not None
    transport.unwritten = 4096  # answers the client has not read
    assert http.close_idle(started + 10.5) == 1 and transport.closed and not transport.aborted
    assert http.close_idle(started + 15.0) == 0 and not transport.aborted
    assert http.close_idle(started + 21.0) == 0 and not transport.aborted  # the first look at it closing: 15 s
    assert http.close_idle(started + 26.0) == 1 and transport.aborted
    assert len(transport.written) == 1 and api.metrics.kinds == ["request_timeout", "client_not_reading"]
    protocol.connection_lost(None)
    assert http.limits.open == 0 and not http.stalled


async def test_an_aiohttp_connection_closed_with_unwritten_answers_counts_until_they_go() -> None:
    """Review 12: one aiohttp closed with answers unwritten was released at once while its socket
    stayed open (no limit on such sockets); one aiohttp blocks on (a client never reading) was
    counted for ever."""
    http, api = front(max_connections=0, max_connections_per_address=0, request_timeout_s=10.0)
    closing, closing_transport = connect(http)
    closing.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    blocked, blocked_transport = connect(http)
    blocked.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    closing_transport.closed, closing_transport.unwritten = True, 100
    blocked_transport.unwritten = 70_000
    http.prune(0.0)
    assert http.limits.open == 2
    http.prune(11.0)
    assert http.limits.open == 1 and closing_transport.aborted and not blocked_transport.aborted
    http.prune(76.0)
    assert http.limits.open == 0 and blocked_transport.aborted and not http.handed and not http.stalled
    assert api.metrics.kinds == ["client_not_reading", "client_not_reading"]


def test_an_ipv4_peer_and_an_ipv4_mapped_one_count_alike() -> None:
    assert client_source(("127.0.0.1", 5000)) == client_source(("::ffff:127.0.0.1", 5000, 0, 0)) == "127.0.0.1"
    assert client_source(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"


async def test_a_flood_of_refused_connections_looks_through_aiohttp_s_at_most_so_often(monkeypatch) -> None:
    """Review 12: each refused connection passed over every connection aiohttp held (2 ms at
    10,000), so connecting at the limit in a loop could spend the webapp's event loop on it."""
    http, _ = front(max_connections=1, max_connections_per_address=0)
    protocol, _ = connect(http)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    passes = []
    real = http.prune
    monkeypatch.setattr(http, "prune", lambda now=None: (passes.append(now), real(now)))
    for _ in range(100):
        assert refused(connect(http)[1])
    assert len(passes) == 1


async def test_a_client_that_does_not_read_its_answers_is_left_to_the_keepalive_timeout() -> None:
    """What waits behind answers its client does not read may have arrived whole: no 408 for it
    (review12); the keep-alive timeout ends the connection."""
    http, api = front(request_timeout_s=10.0, keepalive_timeout_s=75.0)
    protocol, transport = connect(http)
    protocol.pause_writing()
    protocol.data_received(post(b"channel=C1&text=a")[:10])
    assert protocol.arriving_since() is None
    assert http.close_idle(protocol.last_active + 30.0) == 0 and not transport.closed
    assert http.close_idle(protocol.last_active + 76.0) == 1 and transport.closed and not api.metrics.kinds
