"""Every error type rtm raises, and the codes it puts on the wire.

Class tree::

    RtmError
    ├── ProtocolError            a peer broke the msgpack framing
    │   ├── FrameTooLarge        declared length above the frame limit
    │   ├── MalformedFrame       not msgpack, or not a map with an ``op``
    │   ├── FrameTimeout         a frame begun and not finished in time
    │   └── IdleTimeout          nothing received for too long
    ├── BadMessage               a well-framed op whose fields break services.ops
    ├── BadDocument              a Consul KV document of the wrong shape or version
    ├── ConnectionLost           the TCP connection closed under a request
    ├── RequestTimeout           no reply within the request's deadline
    ├── SendBufferFull           the bounded send buffer overflowed (slow peer)
    ├── NotTrusted               a TLS peer's certificate names no fleet identity, or the wrong one
    ├── HandshakeRateLimited     a source started more TLS handshakes than its rate allows
    ├── PeerError                the peer answered a request with an error code
    │   └── NotOwner             a channel server does not own the channel
    ├── NoOwner                  the ring has no live owner for a channel
    └── DebugFaultsRefused       --debug-faults asked for off loopback or without an operator token

Error codes (``ErrorCode``) travel in ``{"op": "err", "code": ...}`` replies;
websocket close codes (``CloseCode``) tell a client why it was disconnected.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode:
    """Codes carried by msgpack error replies."""

    NOT_OWNER = "not_owner"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NO_OWNER = "no_owner"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    FORBIDDEN = "forbidden"  # the sender's role may not send this op (services/authz.py)


class CloseCode(IntEnum):
    """Websocket close codes the gateway uses (RFC 6455 plus the 4000 private range)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # gateway shutting down: reconnect through rtm.connect
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # binary frame or non-JSON text
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # gateway at --max-connections: reconnect through rtm.connect
    INVALID_TICKET = 4001  # missing, forged, expired or reused ticket: do not retry the URL
    BOOTSTRAP_FAILED = 4002  # the webapp could not be reached for the user's channels
    # The token the connection was opened with was revoked (auth.revoke): do not reconnect with
    # it (rtm.connect answers invalid_auth); after the ``tokens_revoked`` event (docs/authz-review.md).
    TOKEN_REVOKED = 4003
    SLOW_CONSUMER = 4008  # the client did not read fast enough; reconnect and catch up
    # The gateway could not deliver this connection's events exactly once in order (a gap it
    # could not fill within its budget, or more held events than its bound): reconnect
    # through rtm.connect and catch up. Sent after Slack's goodbye (docs/hardening-gateway.md).
    RESYNC = 4010
    # Past the gateway's per-user or per-address connection limit: close another connection
    # first; retrying at once is refused again (docs/hardening-gateway.md).
    TOO_MANY_CONNECTIONS = 4029


class RtmError(Exception):
    """Base class of every rtm error."""


class ConfigError(RtmError, ValueError):
    """A flag or ``RTM_*`` value a process cannot start with. ``run_main`` prints it as one line,
    without a traceback, and the process exits with :data:`CONFIG_ERROR_EXIT_CODE`."""


CONFIG_ERROR_EXIT_CODE = 2  # as argparse exits for a bad flag


class ProtocolError(RtmError):
    """A peer broke the wire protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class MalformedFrame(ProtocolError):
    pass


class FrameTimeout(ProtocolError):
    """A peer began a frame and did not finish it within the frame timeout."""


class IdleTimeout(ProtocolError):
    """A peer sent nothing (not even a keepalive) for the idle timeout."""


class BadMessage(RtmError):
    """A frame whose op or fields break the declared table (:mod:`services.ops`).

    A request is answered ``err bad_request`` with :attr:`detail`; a push is
    dropped and counted. The connection stays up.
    """

    def __init__(self, op: str, detail: str, kind: str = "bad_request") -> None:
        super().__init__(f"bad {op}: {detail}")
        self.op = op
        self.detail = detail
        self.kind = kind  # what a refused request counts as in rtm_errors_total{kind}


class BadDocument(RtmError, ValueError):
    """A Consul KV document that is unreadable, of the wrong shape, or not newer
    than the one applied. It is logged, counted and ignored; the last good one stays."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


class ConnectionLost(RtmError):
    pass


class RequestTimeout(RtmError):
    pass


class SendBufferFull(RtmError):
    def __init__(self, pending_bytes: int, limit_bytes: int) -> None:
        super().__init__(f"send buffer holds {pending_bytes} bytes, limit {limit_bytes}")
        self.pending_bytes = pending_bytes
        self.limit_bytes = limit_bytes


class NotTrusted(RtmError):
    """The peer completed TLS but is not who it must be (no fleet identity, or another service)."""


class HandshakeRateLimited(RtmError):
    """A source address started TLS handshakes faster than ``--tls-handshake-rate-per-s`` allows
    (after its ``--tls-handshake-burst``): its connection is closed before any TLS work is done."""


class PeerError(RtmError):
    """An ``err`` reply: ``code`` is one of :class:`ErrorCode`, ``reply`` the whole map."""

    def __init__(self, code: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{code}: {reply.get('detail', '')}".rstrip(": "))
        self.code = code
        self.reply = reply


class NotOwner(PeerError):
    """The channel server does not own the channel in ring ``version``."""

    @property
    def version(self) -> int:
        return int(self.reply.get("version", 0))


class NoOwner(RtmError):
    """The ring maps the channel to a slot with no live instance."""


class ResumeLost(RtmError):
    """A moved connection's ticket names a resume record the webapp no longer has (the webapp
    restarted, the record expired, or an earlier attempt's bootstrap took it): the connection
    cannot resume, and is closed with 4010 so that the client catches up from history."""


class DebugFaultsRefused(RtmError):
    """``--debug-faults`` asked for where it may not run: a non-loopback host, or no operator token."""


def error_from_reply(reply: dict[str, Any]) -> PeerError:
    code = str(reply.get("code", ErrorCode.INTERNAL))
    if code == ErrorCode.NOT_OWNER:
        return NotOwner(code, reply)
    return PeerError(code, reply)
