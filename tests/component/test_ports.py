"""rtmctl.ports: the free-port helper the tests and benchmarks share, on real sockets."""

from __future__ import annotations

import socket

import pytest

import rtmctl.ports as ports
from rtmctl.ports import PORT_BASE_MIN, ephemeral_port_min, free_port, free_port_base


def test_a_free_port_binds() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_a_port_base_lies_below_the_ephemeral_range_and_every_port_of_its_span_binds() -> None:
    span = 20
    base = free_port_base(span=span)
    assert PORT_BASE_MIN <= base and base + span <= ephemeral_port_min()
    socks = []
    try:
        for port in range(base, base + span):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in socks:
            sock.close()


def test_no_free_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the only candidate base is taken, the helper says so instead of returning it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(ports, "PORT_BASE_MIN", taken)
        monkeypatch.setattr(ports, "ephemeral_port_min", lambda: taken + 2)  # one candidate: ``taken``
        with pytest.raises(RuntimeError, match="no free range of 1 ports"):
            ports.free_port_base(span=1, attempts=5)
