"""Unit tests for gateway.client_socket: one write per delivery, bursts coalesced, slow consumers cut off."""

from __future__ import annotations

from typing import Any

from gateway.client_socket import ClientSocket, Cork


class Transport:
    """A fake transport: ``backlog`` bytes stay unsent after each write when the client is slow."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.slow = False
        self.closing = False
        self.eof = False

    def write(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        self.written.append(data)
        if self.slow:
            self.buffered += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


class WS:
    def __init__(self) -> None:
        self.transport = Transport()
        self.remote_address = ("127.0.0.1", 1)


def client(
    max_bytes: int = 1000, max_frames: int = 5, cork: Cork | None = None
) -> tuple[ClientSocket, Transport, list[Any]]:
    cut: list[Any] = []
    ws = WS()
    return ClientSocket(ws, 7, max_bytes, max_frames, cut.append, cork or Cork()), ws.transport, cut


def test_a_reading_client_gets_every_frame() -> None:
    sock, transport, cut = client()
    assert all(sock.write(b"f%d" % i) for i in range(100))
    assert transport.written == [b"f%d" % i for i in range(100)]
    assert cut == [] and sock.queued_frames == 0


def test_backlog_within_bounds_is_tolerated_and_reset_once_drained() -> None:
    sock, transport, cut = client(max_frames=5)
    transport.slow = True
    assert all(sock.write(b"x") for _ in range(5))
    assert sock.queued_frames == 5
    transport.slow, transport.buffered = False, 0  # the client read everything
    assert sock.write(b"x")
    assert sock.queued_frames == 0 and cut == []


def test_too_many_queued_frames_cut_the_client_off_once() -> None:
    sock, transport, cut = client(max_bytes=10**6, max_frames=3)
    transport.slow = True
    results = [sock.write(b"x") for _ in range(6)]
    assert results == [True, True, True, False, False, False]
    assert cut == [sock]
    assert len(transport.written) == 4  # nothing is written after the cut


def test_too_many_queued_bytes_cut_the_client_off() -> None:
    sock, transport, cut = client(max_bytes=100, max_frames=1000)
    transport.slow = True
    assert sock.write(b"a" * 60)
    assert not sock.write(b"b" * 60)
    assert cut == [sock] and sock.cut


def test_a_closing_or_half_closed_transport_is_not_written() -> None:
    sock, transport, cut = client()
    transport.closing = True
    assert not sock.write(b"x")
    transport.closing, transport.eof = False, True
    assert not sock.write(b"x")
    assert transport.written == [] and cut == []


def test_a_held_cork_coalesces_each_sockets_frames_into_one_write_in_order() -> None:
    cork = Cork()
    a, ta, _ = client(cork=cork)
    b, tb, _ = client(cork=cork)
    assert a.write(b"0")  # not corked: written at once
    cork.hold()
    assert a.write(b"1") and b.write(b"1") and a.write(b"2")
    assert ta.written == [b"0"] and tb.written == []
    cork.release()
    assert ta.written == [b"0", b"12"] and tb.written == [b"1"]
    assert a.write(b"3")
    assert ta.written[-1] == b"3" and cork.dirty == []


def test_a_coalesced_write_counts_its_frames_against_the_bound() -> None:
    cork = Cork()
    sock, transport, cut = client(max_bytes=10**6, max_frames=3, cork=cork)
    transport.slow = True
    cork.hold()
    assert all(sock.write(b"x") for _ in range(4))
    cork.release()
    assert cut == [sock]
    assert not sock.write(b"y")


def test_a_socket_closing_while_corked_gets_nothing() -> None:
    cork = Cork()
    sock, transport, _ = client(cork=cork)
    cork.hold()
    assert sock.write(b"x")
    transport.closing = True
    assert not sock.write(b"y")
    cork.release()
    assert transport.written == []


def test_one_sockets_failing_flush_does_not_strand_the_others() -> None:
    cork = Cork()
    bad, bad_transport, _ = client(cork=cork)
    good, good_transport, _ = client(cork=cork)

    def broken(data: bytes) -> None:
        raise OSError("broken")

    bad_transport.write = broken  # type: ignore[method-assign]
    cork.hold()
    assert bad.write(b"1") and good.write(b"1")
    cork.release()
    assert good_transport.written == [b"1"]
    assert bad.queued is None and cork.dirty == []
