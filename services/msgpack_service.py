"""A msgpack server registered in Consul, with metrics: what channel, presence and admin servers and CHARM share.

Each of them opens its msgpack listener behind the mutual TLS gate, serves
``/metrics`` and ``/healthz`` on its metrics port, registers in Consul with
its TTL check, and answers its peers through a :class:`PeerConnection` each.
:class:`MsgpackService` holds that shape once; a subclass supplies its
handlers (``handle_request``, ``health``, ``make_connection``) and its own
steps through the hooks below, in this order:

start: listen (msgpack, then metrics) -> ``starting()`` -> ``register()`` -> ``started()``
stop:  ``stopping()`` -> Consul deregistration -> listener closed -> ``closing()`` -> metrics stopped

:class:`SlotService` adds what the channel and presence servers share on top:
ring slots held through a :class:`SlotOwner`, the slot gauges, the
``--debug-faults`` routes and the gateways' connections closed on stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from services import debug_faults
from services.authz import Authorizer
from services.config import advertised
from services.connection import PeerConnection, PeerLimits, serve
from services.discovery import Discovery
from services.errors import BadMessage
from services.metrics import ServiceMetrics, start_metrics_server
from services.process import StopFn
from services.ring import RingDocument
from services.slot_owner import SlotOwner
from services.tls import refusal_kind, trust_from_args


class MsgpackService:
    """One fleet server: msgpack listener, metrics endpoint, Consul registration; start/stop in one order."""

    def __init__(self, args: Any, service: str) -> None:
        self.args = args
        self.service = service
        self.instance_id: str = args.instance_id
        self.discovery = Discovery(args.consul, args.consul_token)
        self.metrics = ServiceMetrics(service, self.instance_id)
        self.trust = trust_from_args(args, service)
        self.authz = Authorizer(service, enforcing=self.trust.enabled, count=self.metrics.error)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.address = ""
        self._stop_metrics: StopFn | None = None

    # -- what a subclass supplies -------------------------------------------------------
    def make_connection(self) -> PeerConnection:
        """A connection for one accepted peer (see :meth:`peer_connection`)."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` body."""
        raise NotImplementedError

    def metrics_routes(self) -> list[web.RouteDef] | None:
        """Extra routes on the metrics port (the ``--debug-faults`` endpoints), or None."""
        return None

    async def starting(self) -> None:
        """After the listeners are open, before registering in Consul."""

    async def register(self) -> dict[str, Any]:
        """Register in Consul with the TTL check; return the process's ready info."""
        await self.discovery.register(
            self.service,
            self.instance_id,
            self.address,
            self.port,
            meta={"metrics_port": str(self.metrics_port)},
            ttl_s=self.args.ttl_s,
        )
        return {
            "service": self.service,
            "id": self.instance_id,
            "host": self.address,
            "port": self.port,
            "metrics_port": self.metrics_port,
        }

    async def started(self) -> None:
        """After registering in Consul."""

    async def stopping(self) -> None:
        """First thing on stop, while still registered and serving."""

    async def closing(self) -> None:
        """On stop, after deregistering and closing the listener, before the metrics endpoint stops."""

    # -- the shared shape ------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        args = self.args
        self.server = await serve(
            args.host,
            args.port,
            self.make_connection,
            trust=self.trust,
            on_refused=lambda _source, exc: self.metrics.error(refusal_kind(exc)),
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.metrics_port, self._stop_metrics = await start_metrics_server(
            args.host, args.metrics_port, self.metrics, self.health, self.metrics_routes()
        )
        await self.starting()
        self.address = advertised(args.host, args.advertise_host)
        info = await self.register()
        await self.started()
        return info

    async def stop(self) -> None:
        await self.stopping()
        await self.discovery.close()
        if self.server is not None:
            self.server.close()
        await self.closing()
        if self._stop_metrics is not None:
            await self._stop_metrics()

    def peer_connection(self, name: str, **extra: Any) -> PeerConnection:
        """A server-side connection: requests to ``handle_request``, bad input counted, limits from the flags."""
        return PeerConnection(
            name=name,
            on_request=self.handle_request,
            on_protocol_error=lambda conn, exc: self.metrics.error("protocol"),
            on_bad_message=self.count_bad_message,
            limits=PeerLimits.from_args(self.args),
            **extra,
        )

    def handle_request(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        """Answer one request (a subclass's handler table)."""
        raise NotImplementedError

    def count_bad_message(self, conn: PeerConnection, exc: BadMessage, was_request: bool) -> None:
        self.metrics.error(exc.kind if was_request else "bad_push")


class SlotService(MsgpackService):
    """A :class:`MsgpackService` that owns slots of a ring (channel and presence servers).

    ``noun`` names the server in logs and metric help ("channel server"), its first word the ring;
    ``metric_prefix`` starts its own gauges (``rtm_cs``). A subclass fills ``gateways`` and
    answers ring changes in :meth:`on_ring_change`.
    """

    gateways: Mapping[Any, PeerConnection]

    def __init__(
        self, args: Any, service: str, ring_key: str, *, noun: str, metric_prefix: str, log: logging.Logger
    ) -> None:
        super().__init__(args, service)
        self.noun = noun
        self.metric_prefix = metric_prefix
        self.log = log
        self.slots = SlotOwner(
            self.discovery,
            self.instance_id,
            ring_key,
            role=args.role,
            ttl_s=args.ttl_s,
            on_change=self.on_ring_change,
        )
        self.follower = self.slots.follower
        self.follower.on_bad_document = lambda exc: self.metrics.error("bad_kv")

    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        """The ring moved: drop or take over what changed owner (the subclass's state)."""
        raise NotImplementedError

    def slot_gauges(self) -> None:
        """The ring version, slots held and fenced gauges (call where the subclass lists its gauges)."""
        m, prefix, ring = self.metrics, self.metric_prefix, self.noun.split()[0]
        m.gauge("rtm_ring_version", f"Version of the {ring} ring this process acts on").set_function(
            lambda: self.follower.ring.version
        )
        m.gauge(f"{prefix}_slots", f"Ring slots this {self.noun} owns").set_function(
            lambda: len(self.follower.ring.doc.slots_of(self.instance_id))
        )
        m.gauge(
            f"{prefix}_fenced", "1 while this server refuses everything because its Consul lease lapsed"
        ).set_function(lambda: 1 if self.slots.is_fenced() else 0)

    # -- lifecycle -------------------------------------------------------------------------
    def metrics_routes(self) -> list[web.RouteDef] | None:
        args = self.args
        if not args.debug_faults:
            return None
        return debug_faults.fault_routes(self.discovery, args.host, args.operator_token, self.metrics)

    async def starting(self) -> None:
        self.slots.start()

    async def register(self) -> dict[str, Any]:
        return await self.slots.register(self.service, self.address, self.port, self.metrics_port)

    async def started(self) -> None:
        self.log.info("%s %s serving on %s:%s", self.noun, self.instance_id, self.address, self.port)

    async def closing(self) -> None:
        for conn in list(self.gateways.values()):
            conn.close()
