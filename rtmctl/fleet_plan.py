"""The plan of ``rtm up``: which processes the fleet has, with their ports, flags and identities.

Pure apart from the certificates it issues: :func:`plan` turns ``rtm up``'s
arguments into one :class:`ProcessSpec` per process, each port derived from
``--port-base`` (so two fleets run side by side with different bases), each
process's identity kept across restarts by its stored certificate.
:mod:`rtmctl.fleet` starts and supervises them.
"""

from __future__ import annotations

import argparse
import datetime
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rtmctl.certs import RENEW_WITHIN_DAYS
from rtmctl.launcher import rtm_argv
from services import tls
from services.certs import CertPaths, FleetCertificates
from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, PRESENCE, WEBAPP, PeerIdentity


def tls_flags(paths: CertPaths) -> list[str]:
    return ["--tls-ca", str(paths.ca), "--tls-cert", str(paths.cert), "--tls-key", str(paths.key)]


# A stored certificate that expires within this is issued anew (same identity) when `rtm up` starts:
# a data directory older than a certificate's year must not start a fleet that refuses itself.
RENEW_WITHIN = datetime.timedelta(days=RENEW_WITHIN_DAYS)


def credentials(certs: FleetCertificates | None, name: str, service: str, make_id: str) -> tuple[str, list[str]]:
    """The instance id of the process at ``name`` in the plan and its TLS flags.

    The id is the one in its stored certificate (a restart is the same process),
    else ``make_id``; the certificate is reused unless it expires within
    :data:`RENEW_WITHIN` or is not from the issuing CA (then issued anew, same
    identity: a rotation's steps leave every leaf from the issuing CA, so a roll
    is not disturbed); without ``certs`` (``--wire-tls off``) there are no flags."""
    if certs is None:
        return make_id, ["--wire-tls", tls.WIRE_TLS_OFF]
    known = certs.existing_identity(name)
    iid = known.instance if known is not None and known.service == service else make_id
    return iid, tls_flags(certs.ensure(name, PeerIdentity(service, iid), RENEW_WITHIN))


@dataclass
class ProcessSpec:
    """How to start one fleet process (kept to restart it the same way)."""

    name: str
    service: str
    argv: list[str]
    port: int
    restarts: list[float] = field(default_factory=list)


# Each role's ports start at its offset from --port-base; a process's metrics port is its port + METRICS_PORT_OFFSET.
CONSUL_PORT_OFFSET = 0
WEBAPP_PORT_OFFSET = 1
WEBAPP_INTERNAL_PORT_OFFSET = 2
ADMIN_SERVER_PORT_OFFSET = 10
CHANNEL_SERVER_PORT_OFFSET = 20
CHARM_PORT_OFFSET = 30
GATEWAY_PORT_OFFSET = 40
PRESENCE_PORT_OFFSET = 50
METRICS_PORT_OFFSET = 100


def plan(
    args: argparse.Namespace, data_dir: Path, consul_addr: str, certs: FleetCertificates | None = None
) -> list[ProcessSpec]:
    """The processes of the fleet with their ports: base+0 Consul, +1 webapp (+2 its internal port),
    +10.. admin servers, +20.. channel servers (actives, then spares), +30..
    CHARMs, +40.. gateways, +50.. presence servers (actives, then spares); each
    process's metrics port is its port + 100. ``certs`` issues each its
    certificate (None: ``--wire-tls off``)."""
    common = ["--host", args.host, "--consul", consul_addr]
    return [
        *_channel_servers(args, common, certs),
        *_presence_servers(args, common, certs),
        *_charms(args, common, certs),
        *_admin_servers(args, common, certs),
        _webapp(args, common, certs, data_dir),
        *_gateways(args, common, certs, data_dir),
    ]


def _server(
    certs: FleetCertificates | None, common: list[str], service: str, name: str, make_id: str, port: int, *extra: str
) -> ProcessSpec:
    """A msgpack server at ``name`` in the plan: its identity, port, metrics port and ``extra`` flags."""
    iid, creds = credentials(certs, name, service, make_id)
    argv = rtm_argv(
        service,
        *common,
        *creds,
        "--port",
        str(port),
        "--metrics-port",
        str(port + METRICS_PORT_OFFSET),
        "--instance-id",
        iid,
        *extra,
    )
    return ProcessSpec(iid, service, argv, port)


def _debug_faults(args: argparse.Namespace) -> list[str]:
    return ["--debug-faults"] if args.debug_faults else []


def _channel_servers(args: argparse.Namespace, common: list[str], certs: FleetCertificates | None) -> list[ProcessSpec]:
    """The channel servers: ``--channel-servers`` actives, then ``--spares`` spares."""
    specs: list[ProcessSpec] = []
    for i in range(args.channel_servers + args.spares):
        role = "active" if i < args.channel_servers else "spare"
        port = args.port_base + CHANNEL_SERVER_PORT_OFFSET + i
        make_id = f"cs-{uuid.uuid4().hex[:6]}"
        history = ["--history-events", str(args.history_events)]
        extra = [*history, "--role", role, "--ttl-s", str(args.ttl_s), *_debug_faults(args)]
        specs.append(_server(certs, common, CHANNEL_SERVER, f"{CHANNEL_SERVER}-{i}", make_id, port, *extra))
    return specs


def _presence_servers(
    args: argparse.Namespace, common: list[str], certs: FleetCertificates | None
) -> list[ProcessSpec]:
    """The presence servers: ``--presence-servers`` actives, then ``--presence-spares`` spares."""
    specs: list[ProcessSpec] = []
    for i in range(args.presence_servers + args.presence_spares):
        role = "active" if i < args.presence_servers else "spare"
        port = args.port_base + PRESENCE_PORT_OFFSET + i
        make_id = f"ps-{uuid.uuid4().hex[:6]}"
        extra = ["--role", role, "--ttl-s", str(args.ttl_s), *_debug_faults(args)]
        specs.append(_server(certs, common, PRESENCE, f"{PRESENCE}-{i}", make_id, port, *extra))
    return specs


def _charms(args: argparse.Namespace, common: list[str], certs: FleetCertificates | None) -> list[ProcessSpec]:
    """The CHARMs (one leads), each told how many channel and presence slots the rings have."""
    slots = ["--channel-slots", str(args.channel_servers), "--presence-slots", str(args.presence_servers)]
    return [
        _server(certs, common, CHARM, f"{CHARM}-{i}", f"{CHARM}-{i}", args.port_base + CHARM_PORT_OFFSET + i, *slots)
        for i in range(args.charms)
    ]


def _admin_servers(args: argparse.Namespace, common: list[str], certs: FleetCertificates | None) -> list[ProcessSpec]:
    port_base = args.port_base + ADMIN_SERVER_PORT_OFFSET
    return [
        _server(certs, common, ADMIN_SERVER, f"{ADMIN_SERVER}-{i}", f"as-{i}", port_base + i)
        for i in range(args.admin_servers)
    ]


def regions_of(args: argparse.Namespace) -> list[str]:
    """The gateway regions ``--regions`` names, in order."""
    return [r.strip() for r in args.regions.split(",") if r.strip()]


def _webapp(
    args: argparse.Namespace, common: list[str], certs: FleetCertificates | None, data_dir: Path
) -> ProcessSpec:
    """The webapp: its public port, its internal port for gateways, the fleet's data directory."""
    port = args.port_base + WEBAPP_PORT_OFFSET
    iid, creds = credentials(certs, f"{WEBAPP}-0", WEBAPP, f"{WEBAPP}-0")
    argv = rtm_argv(
        WEBAPP,
        *common,
        *creds,
        "--port",
        str(port),
        "--internal-port",
        str(args.port_base + WEBAPP_INTERNAL_PORT_OFFSET),
        "--instance-id",
        iid,
        "--data-dir",
        str(data_dir),
        "--region",
        args.default_region or regions_of(args)[0],
    )
    return ProcessSpec(WEBAPP, WEBAPP, argv, port)


def _gateways(
    args: argparse.Namespace, common: list[str], certs: FleetCertificates | None, data_dir: Path
) -> list[ProcessSpec]:
    """``--gateways-per-region`` gateways in each region, ports in region order."""
    specs: list[ProcessSpec] = []
    for region in regions_of(args):
        for j in range(args.gateways_per_region):
            port = args.port_base + GATEWAY_PORT_OFFSET + len(specs)
            name = f"gw-{region}-{j}"
            extra = ["--region", region, "--data-dir", str(data_dir)]
            specs.append(_server(certs, common, GATEWAY, name, name, port, *extra))
    return specs
