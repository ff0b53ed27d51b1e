"""Free ports on this machine for a fleet about to start: one port, or a base for ``rtm up --port-base``.

The one free-port helper of the tree: the benchmarks (``bench/``) and the tests (``tests/support.py``)
both import it from here. It lives in ``rtmctl`` (installed with the package, standard library only)
rather than in ``bench`` or ``tests`` so that neither imports the other: ``tests`` stays importable
without the ``bench`` extra, and the benchmarks never import test code.

Port bases are drawn below the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``,
32768-60999 on Linux by default): ports there are handed out to outgoing connections, so a range
probed free a moment ago can be taken by some client's socket before the fleet binds it -- likely
when a benchmark opens tens of thousands of client connections beside the fleet.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

PORT_BASE_MIN = 20000  # above the ports well-known services commonly use
EPHEMERAL_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_PORT_MIN = 32768  # Linux's default when the file cannot be read
DEFAULT_PORT_SPAN = 200  # ports an ``rtm up`` fleet takes above its base, with room to spare
MAX_PORT_BASE_ATTEMPTS = 50


def ephemeral_port_min() -> int:
    """The lowest port the kernel hands to outgoing connections."""
    try:
        return int(EPHEMERAL_PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_PORT_MIN


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_base(
    span: int = DEFAULT_PORT_SPAN, host: str = "127.0.0.1", attempts: int = MAX_PORT_BASE_ATTEMPTS
) -> int:
    """A base port B such that B..B+span all bind right now on ``host`` (for ``rtm up --port-base``),
    below the ephemeral range."""
    top = max(ephemeral_port_min(), PORT_BASE_MIN + 2 * span)
    for _ in range(attempts):
        base = random.randrange(PORT_BASE_MIN, top - span)
        socks: list[socket.socket] = []
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
    raise RuntimeError(f"no free range of {span} ports found below {top} on {host}")
