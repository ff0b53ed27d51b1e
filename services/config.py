"""Configuration from flags and ``RTM_*`` environment variables.

Every flag ``--some-thing`` also reads ``RTM_SOME_THING`` when the flag is not
given; the flag wins. Consul's address follows Consul's own convention too:
``--consul`` falls back to ``RTM_CONSUL`` and then ``CONSUL_HTTP_ADDR``, and
the Consul ACL token ``--consul-token`` to ``RTM_CONSUL_TOKEN``, then
``CONSUL_HTTP_TOKEN``, then the file named by ``CONSUL_HTTP_TOKEN_FILE`` (the
variables Consul's own tools read). Prefer the variables to the flag: a flag's
value shows in the process list.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import uuid
from typing import Any

from services import connection, tls

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
CONSUL_TOKEN_ENV = "RTM_CONSUL_TOKEN"
CONSUL_HTTP_TOKEN_ENV = "CONSUL_HTTP_TOKEN"
CONSUL_HTTP_TOKEN_FILE_ENV = "CONSUL_HTTP_TOKEN_FILE"
# How often a registered process tells Consul it is alive, and how long
# Consul waits before it marks the process critical.
DEFAULT_TTL_S = 3.0
# Connections the kernel holds for accept() on a client-facing listener (the gateway's websocket
# port, the webapp's HTTP port): --listen-backlog. asyncio's default is 100, and when 2,000 clients
# (re)connected at once (a gateway restart, a drained region, the peers' load generator) the kernel
# dropped the connections beyond it (TcpExtListenOverflows), and each such client retried after 1 s,
# then 3 s. The kernel caps it at net.core.somaxconn (4,096 on current kernels).
LISTEN_BACKLOG = 1024
MAX_LISTEN_BACKLOG = 65535

DEFAULT_DEREGISTER_AFTER_S = 60.0


def env_name(flag: str) -> str:
    return "RTM_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default: Any) -> Any:
    """The value of ``RTM_<FLAG>`` converted like ``default``, else ``default``."""
    raw = os.environ.get(env_name(flag))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


SECRET_FLAG_WORDS = ("secret", "token", "key", "password")  # --help never shows these flags' defaults


class Parser(argparse.ArgumentParser):
    """argparse where ``add(flag, default, help)`` wires the RTM_* fallback."""

    def add(
        self,
        flag: str,
        default: Any,
        help: str,
        *,
        above: float | None = None,
        at_least: float | None = None,
        at_most: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``above``: a number the flag's value must exceed (a timeout of 0 s would never wait);
        ``at_least``: one it must reach (an interval where 0 means "off"); ``at_most``: one it
        must not pass. A bounded value must be finite. A value out of bounds, given or from the
        environment, is refused with a clear error."""
        value = env_default(flag, default)
        if isinstance(default, bool):
            self.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help, **kwargs)
            return
        kind = type(default) if default is not None else str
        for limit, relation in ((above, "above"), (at_least, "at least"), (at_most, "at most")):
            if limit is not None:
                bound = _Bound(limit, relation)
                if not bound.holds(value):
                    raise SystemExit(f"{env_name(flag)}={value}: {flag} must be {bound}")
                kind = _bounded(kind, bound)
        # The default as it is now (the environment's if set), never of a flag that may hold a secret:
        # rtm up hands its children the fleet secret and tokens through RTM_* variables.
        hidden = value in ("", None) or any(word in flag for word in SECRET_FLAG_WORDS)
        shown = "" if hidden else f"; default {value}"
        said = f"{help} (env {env_name(flag)}{shown})".replace("%", "%%")  # argparse formats help with %
        self.add_argument(flag, type=kind, default=value, help=said, **kwargs)


class _Bound:
    """A bound of a flag's value: ``above``, ``at least`` or ``at most`` ``limit``; NaN and the
    infinities hold none (an interval of inf would never end)."""

    def __init__(self, limit: float, relation: str) -> None:
        self.limit, self.relation = limit, relation

    def holds(self, value: Any) -> bool:
        if not math.isfinite(value):
            return False
        if self.relation == "above":
            return bool(value > self.limit)
        if self.relation == "at least":
            return bool(value >= self.limit)
        return bool(value <= self.limit)

    def __str__(self) -> str:
        return f"{self.relation} {self.limit}"


def _bounded(kind: Any, bound: _Bound) -> Any:
    """An argparse type: ``kind`` of the text, refused unless within ``bound``."""

    def convert(text: str) -> Any:
        value = kind(text)
        if not bound.holds(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" errors
    return convert


def consul_default() -> str:
    return os.environ.get("RTM_CONSUL") or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL_ADDR


def consul_token_default() -> str:
    """The Consul ACL token from the environment: ``RTM_CONSUL_TOKEN``, ``CONSUL_HTTP_TOKEN``,
    or the first line of ``CONSUL_HTTP_TOKEN_FILE``; "" (the anonymous token) when none is set."""
    token = os.environ.get(CONSUL_TOKEN_ENV) or os.environ.get(CONSUL_HTTP_TOKEN_ENV) or ""
    if token:
        return token
    path = os.environ.get(CONSUL_HTTP_TOKEN_FILE_ENV, "")
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip()
    return ""


def service_parser(prog: str, description: str, default_port: int) -> Parser:
    """The flags every fleet process shares."""
    parser = Parser(prog=prog, description=description)
    parser.add("--host", DEFAULT_HOST, "address to bind")
    parser.add("--advertise-host", "", "address registered in Consul (default: --host)")
    parser.add("--port", default_port, "port to serve on (0: any free port)")
    parser.add("--metrics-port", 0, "port for /metrics and /healthz (0: any free port)")
    parser.add("--instance-id", "", "unique instance id (default: generated)")
    parser.add_argument(
        "--consul", default=consul_default(), help="Consul HTTP address host:port (env RTM_CONSUL or CONSUL_HTTP_ADDR)"
    )
    parser.add_argument(
        "--consul-token",
        default=consul_token_default(),
        help=f"Consul ACL token (env {CONSUL_TOKEN_ENV}, {CONSUL_HTTP_TOKEN_ENV} or {CONSUL_HTTP_TOKEN_FILE_ENV}; "
        "prefer those: a flag shows in the process list)",
    )
    parser.add("--ttl-s", DEFAULT_TTL_S, "Consul TTL check period in seconds")
    parser.add("--log-level", "INFO", "log level")
    add_peer_limit_flags(parser)
    tls.add_flags(parser)  # --tls-ca/--tls-cert/--tls-key/--wire-tls: see services/tls.py
    return parser


def add_listen_backlog_flag(parser: Parser) -> None:
    """``--listen-backlog`` of a process with a client-facing listener (:data:`LISTEN_BACKLOG`)."""
    parser.add(
        "--listen-backlog",
        LISTEN_BACKLOG,
        "connections the kernel queues for accept() on the client-facing port (capped by net.core.somaxconn)",
        above=0,
        at_most=MAX_LISTEN_BACKLOG,
    )


def add_peer_limit_flags(parser: Parser) -> None:
    """The per-connection limits of msgpack listeners (services.connection.PeerLimits)."""
    parser.add(
        "--max-peer-requests-in-flight",
        connection.MAX_REQUESTS_IN_FLIGHT,
        "requests of one msgpack peer served at once; at the cap the connection stops reading",
    )
    parser.add(
        "--peer-frame-timeout-s", connection.FRAME_TIMEOUT_S, "seconds a begun msgpack frame may take to complete"
    )
    parser.add("--peer-idle-timeout-s", connection.IDLE_TIMEOUT_S, "seconds a msgpack peer may send nothing at all")
    parser.add(
        "--peer-keepalive-interval-s",
        connection.KEEPALIVE_INTERVAL_S,
        "send a keepalive ping on a msgpack connection silent this long",
    )


def instance_id(prefix: str, given: str) -> str:
    return given or f"{prefix}-{uuid.uuid4().hex[:8]}"


def split_host_port(addr: str, default_port: int = 8500) -> tuple[str, int]:
    addr = addr.removeprefix("http://").removeprefix("https://").rstrip("/")
    host, _, port = addr.rpartition(":")
    if not host:
        return addr, default_port
    return host, int(port)


def advertised(host: str, advertise_host: str) -> str:
    """The address other processes should dial: explicit, else the bind address, else our hostname."""
    if advertise_host:
        return advertise_host
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host
