"""``rtm ring [show] | add-slot | remove-slot SLOT``: the operator's view of the rings.

``show`` reads the documents from Consul. Changes go through the CHARM
leader (found in Consul under the leader key), the only writer of the rings:
``add-slot`` gives a new slot to a spare (about 1/N of the keys move to it);
``remove-slot`` drops a slot (its keys move to the others; its instance tells
its gateways to resubscribe at the new owners, then serves as a spare).

Ring changes go over mutual TLS as the operator identity: the certificate in
``DATA_DIR/tls/operator.crt`` that ``rtm up`` made (or ``--tls-ca``,
``--tls-cert``, ``--tls-key``; env ``RTM_TLS_*``). CHARM refuses ring changes
from any other identity.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from charm.app import RINGS
from rtmctl.operator import add_consul_token_flag, leader_address, operator_client, read_ring, run_against_consul
from services import ops
from services.config import env_default
from services.connection import PeerConnection, connect
from services.errors import NotTrusted, PeerError
from services.identity import CHARM
from services.tls import WIRE_TLS_OFF, TrustConfigError, WireTrust

REQUEST_TIMEOUT_S = 10.0


def operator_trust(args: argparse.Namespace) -> WireTrust:
    """The operator's credentials: the flags, else ``DATA_DIR/tls/operator.*`` from ``rtm up``."""
    if args.wire_tls == WIRE_TLS_OFF:
        return WireTrust.off()
    tls_dir = Path(args.data_dir) / "tls"
    return WireTrust.load(
        args.tls_ca or tls_dir / "ca.crt",
        args.tls_cert or tls_dir / "operator.crt",
        args.tls_key or tls_dir / "operator.key",
    )


async def ask_leader(host: str, port: int, message: dict[str, Any], trust: WireTrust) -> dict[str, Any]:
    conn = await connect(host, port, lambda: PeerConnection(name="rtm-ring"), trust=trust, expect=CHARM)
    try:
        return await conn.request(message, REQUEST_TIMEOUT_S)
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    """``rtm ring``; Consul unreachable or refusing is a sentence, not a traceback (:func:`run_against_consul`)."""
    return run_against_consul("ring", lambda: _ring(argv))


def _ring(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtm ring", description=__doc__)
    parser.add_argument("action", nargs="?", default="show", choices=["show", "add-slot", "remove-slot"])
    parser.add_argument("slot", nargs="?", default="", help="the slot to remove (remove-slot)")
    parser.add_argument("--ring", choices=sorted(RINGS), default="channel")
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"))
    parser.add_argument("--consul", default="", help="Consul host:port (default: from DATA_DIR/fleet.json)")
    parser.add_argument("--tls-ca", default=env_default("--tls-ca", ""), help="fleet CA (default DATA_DIR/tls/ca.crt)")
    parser.add_argument("--tls-cert", default=env_default("--tls-cert", ""), help="operator certificate")
    parser.add_argument("--tls-key", default=env_default("--tls-key", ""), help="operator key")
    parser.add_argument("--wire-tls", default=env_default("--wire-tls", "on"), choices=["on", "off"])
    add_consul_token_flag(parser)
    args = parser.parse_args(argv)
    client = operator_client(args)
    key = RINGS[args.ring][1]
    if args.action == "show":
        doc = read_ring(client, key)
        print(f"{args.ring} ring v{doc.version}")
        for slot, owner in sorted(doc.slots.items()):
            print(f"  {slot:<8} -> {owner or '(none)'}")
        return 0
    if args.action == "remove-slot" and not args.slot:
        parser.error("remove-slot needs a SLOT")
    leader = leader_address(client)
    if leader is None:
        print("rtm ring: no CHARM leader right now; try again", file=sys.stderr)
        return 1
    request = (
        ops.RingAddSlot(ring=args.ring)
        if args.action == "add-slot"
        else ops.RingRemoveSlot(ring=args.ring, slot=args.slot)
    )
    try:
        trust = operator_trust(args)
    except TrustConfigError as exc:
        print(f"rtm ring: no operator credentials: {exc}", file=sys.stderr)
        return 1
    try:
        reply = asyncio.run(ask_leader(leader["host"], int(leader["port"]), request.to_message(), trust))
    except PeerError as exc:
        print(f"rtm ring: {args.action} {exc}", file=sys.stderr)  # exc: "<code>: <detail>", e.g. "refused: ..."
        return 1
    except (OSError, NotTrusted) as exc:
        print(f"rtm ring: cannot reach the CHARM leader over TLS: {exc}", file=sys.stderr)
        return 1
    print(f"{args.ring} ring now v{reply['version']} (via CHARM leader {leader['id']})")
    for slot, owner in sorted(reply["slots"].items()):
        print(f"  {slot:<8} -> {owner or '(none)'}")
    return 0
