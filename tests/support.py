"""Helpers shared by the component and system tests: free ports, bounded waits."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from services.certs import FleetCertificates
from services.identity import PeerIdentity
from services.tls import WireTrust

T = TypeVar("T")

# One factor scales every wait for slow machines (like websockets' test suite).
TIMEOUT_FACTOR = 1.0
DEFAULT_WAIT_S = 10.0 * TIMEOUT_FACTOR
POLL_INTERVAL_S = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout_s: float = DEFAULT_WAIT_S, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)  # wait-ok: bounded poll of a condition


async def async_wait_until(
    predicate: Callable[[], Awaitable[T]], timeout_s: float = DEFAULT_WAIT_S, what: str = "condition"
) -> T:
    """Async twin of :func:`wait_until` for coroutine predicates."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)  # wait-ok: bounded poll of a condition


def free_port_base(span: int = 200, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A base port B such that B..B+span all bind right now (for ``rtm up --port-base``)."""
    import random

    for _ in range(attempts):
        base = random.randrange(20000, 60000 - span)
        socks = []
        try:
            for port in range(base, base + span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no free range of {span} ports found")


class FleetCA:
    """A fleet CA in a temporary directory, issuing certificates to tests (see tests/conftest.py)."""

    def __init__(self, directory: Path) -> None:
        self.certs = FleetCertificates(directory)
        self.certs.ensure_ca()

    def trust(self, service: str, instance: str = "") -> WireTrust:
        """Credentials for ``service/instance`` (instance defaults to ``<service>-test``)."""
        identity = PeerIdentity(service, instance or f"{service}-test")
        paths = self.certs.ensure(f"{identity.service}-{identity.instance}", identity)
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    def flags(self, service: str, instance: str) -> list[str]:
        """The ``--tls-*`` flags of a process started as ``service/instance``."""
        paths = self.certs.ensure(f"{service}-{instance}", PeerIdentity(service, instance))
        return ["--tls-ca", str(paths.ca), "--tls-cert", str(paths.cert), "--tls-key", str(paths.key)]
