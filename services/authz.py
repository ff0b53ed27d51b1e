"""Who may send what on the fleet's wire: one declared table, one check.

The sender is the identity of the certificate its connection presented
(:attr:`services.connection.PeerConnection.identity`), never what a message
says about itself. Each server asks :meth:`Authorizer.check` where it handles
an op, before anything changes state; a refusal is answered ``err`` with
:data:`services.errors.ErrorCode.FORBIDDEN` (a push, which has no reply, is
dropped), counted as ``rtm_errors_total{kind="forbidden"}``, and logged.

The table (also in docs/trust.md):

================  ==============  ===============================================
server            sender role     may send
================  ==============  ===============================================
admin-server      webapp          ``pub``, ``pubs``
channel-server    admin-server    ``pub``, ``pubs``
channel-server    gateway         ``sub``, ``unsub``, ``seqs``, transient ``pub``
                                  (seq nil, ``ctl`` just ``from``, ``json`` that
                                  user's ``user_typing`` in ``ch``:
                                  :func:`typing_json`), with ``gw`` = its own
                                  instance id
presence          gateway         ``lease``, ``release``, ``query``, ``online``,
                                  ``offline``, ``psub``, ``punsub``, ``synced``,
                                  with ``gw`` = its own instance id
presence          webapp          ``get_presence``, ``set_presence``
charm             operator        ``ring_add_slot``, ``ring_remove_slot``
any               any fleet role  ``ping``
================  ==============  ===============================================

With ``--wire-tls off`` there are no identities and nothing is checked
(:attr:`Authorizer.enforcing` is False): that mode exists for measurement
and debugging only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services import wire
from services.errors import ErrorCode
from services.identity import (
    ADMIN_SERVER,
    CHANNEL_SERVER,
    CHARM,
    GATEWAY,
    OPERATOR,
    PRESENCE,
    SERVICES,
    WEBAPP,
    PeerIdentity,
)
from services.tls import RefusalLog

log = logging.getLogger("rtm.authz")

ANY_ROLE_OPS = frozenset({"ping"})
# A gateway's ``pub`` to a channel server is allowed only transient (no seq): typing.
TRANSIENT_PUB = "pub:transient"
# The ctl keys a gateway's transient pub may carry: the typing user's id, whose own sockets skip it.
GATEWAY_CTL_KEYS = frozenset({"from"})
GATEWAY_PRESENCE_OPS = frozenset({"lease", "release", "query", "online", "offline", "psub", "punsub", "synced"})

TYPING_JSON_SEPARATORS = (",", ":")


def typing_json(channel: str, user: str) -> bytes:
    """The one event a gateway may publish: ``user`` typing in ``channel``, encoded as the gateway
    encodes it (gateway/client_messages.py); a channel server refuses any other bytes from a gateway."""
    event = {"type": "user_typing", "channel": channel, "user": user}
    return json.dumps(event, separators=TYPING_JSON_SEPARATORS).encode()


def is_typing_pub(msg: Mapping[str, Any]) -> bool:
    """Whether a transient ``pub`` is exactly ``ctl.from``'s typing indicator in ``ch``."""
    channel, ctl = msg.get("ch"), msg.get("ctl")
    user = ctl.get("from") if isinstance(ctl, dict) else None
    if not isinstance(channel, str) or not isinstance(user, str):
        return False
    return msg.get("json") == typing_json(channel, user)


# server service -> sender role -> ops it may send there
PERMISSIONS: Mapping[str, Mapping[str, frozenset[str]]] = {
    ADMIN_SERVER: {WEBAPP: frozenset({"pub", "pubs"})},
    CHANNEL_SERVER: {
        ADMIN_SERVER: frozenset({"pub", "pubs"}),
        GATEWAY: frozenset({"sub", "unsub", "seqs", TRANSIENT_PUB}),
    },
    PRESENCE: {
        GATEWAY: GATEWAY_PRESENCE_OPS,
        WEBAPP: frozenset({"get_presence", "set_presence"}),
    },
    CHARM: {OPERATOR: frozenset({"ring_add_slot", "ring_remove_slot"})},
}

# Roles whose messages name the sender in a ``gw`` field: it must be their own instance id.
CLAIMS_GW = frozenset({GATEWAY})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an op was refused: ``detail`` goes into the ``err`` reply and the log."""

    op: str
    sender: str
    detail: str


class Authorizer:
    """The check one server makes (``service``: which row of the table is its)."""

    def __init__(self, service: str, *, enforcing: bool, count: Callable[[str], None] | None = None) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}")
        self.service = service
        self.enforcing = enforcing
        self.table = PERMISSIONS.get(service, {})
        self.count = count  # ServiceMetrics.error: called with "forbidden"
        self.refusal_log = RefusalLog()
        self.refusals = 0

    def check(self, identity: PeerIdentity | None, msg: Mapping[str, Any]) -> Refusal | None:
        """None if ``identity`` may send ``msg`` here, else the :class:`Refusal`."""
        if not self.enforcing:
            return None
        op = str(msg.get("op"))
        if identity is None:  # a TLS server never hands over a connection without one
            return Refusal(op, "?", "no verified identity")
        if op in ANY_ROLE_OPS:
            return None
        allowed = self.table.get(identity.role, frozenset())
        wanted = op
        if op == "pub" and identity.role == GATEWAY:
            if msg.get("seq") is not None:
                return Refusal(op, str(identity), "a gateway may publish only transient events (seq nil)")
            ctl = msg.get("ctl")
            if ctl is not None and (not isinstance(ctl, dict) or not set(ctl) <= GATEWAY_CTL_KEYS):
                # join/leave in a ctl make every gateway holding the channel subscribe (or drop) the
                # user's connections: the webapp's word (a persisted event), never a gateway's
                return Refusal(op, str(identity), "a gateway's transient event may carry only ctl.from")
            if not is_typing_pub(msg):
                # anything else would go to every gateway's clients of the channel as if the fleet
                # said it (a message "from" anyone): a gateway relays typing, nothing more
                return Refusal(op, str(identity), "a gateway may publish only ctl.from's user_typing in ch")
            wanted = TRANSIENT_PUB
        if wanted not in allowed:
            return Refusal(op, str(identity), f"{identity.role} may not send {op} to a {self.service}")
        if identity.role in CLAIMS_GW and "gw" in msg and msg["gw"] != identity.instance:
            return Refusal(op, str(identity), f"gw {msg['gw']!r} is not this certificate's id {identity.instance!r}")
        return None

    def refuse(self, refusal: Refusal, request_id: int | None) -> dict[str, Any] | None:
        """Count and log ``refusal``; the ``err forbidden`` reply for a request (None for a push)."""
        self.refusals += 1
        if self.count is not None:
            self.count("forbidden")
        if self.refusal_log.should_log(refusal.sender, time.monotonic()):
            log.warning("forbidden: %s sent %s: %s", refusal.sender, refusal.op, refusal.detail)
        if request_id is None:
            return None
        return wire.reply_err(request_id, ErrorCode.FORBIDDEN, refusal.detail)
