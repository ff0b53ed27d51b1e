"""The webapp process: Web API + SQLite + the hand-off to Admin Servers.

``start_webapp(args)`` wires the parts and returns ``(ready_info, stop)``;
``main(argv)`` is ``rtm webapp`` / ``python -m webapp_stub``.

Startup: open the store (``synchronous=FULL`` with group commit, see
:mod:`webapp_stub.commit`), start the outbox (requeueing what the last run may
not have handed off, from the store's hand-off mark, and the dead letters an
operator asked to redrive), watch ``admin-server``
and ``gateway`` in Consul, serve HTTP (API, internal endpoints, ``/healthz``
and ``/metrics`` on one port), then register as ``webapp``. Stop runs the
same steps backwards from an exit stack: deregister, stop accepting, finish
in-flight requests, stop the watches, flush the outbox for a bounded time,
write the mark, close the database.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from services import logs, regions, wire
from services.config import Parser, advertised, instance_id, service_parser
from services.discovery import Discovery, Instance
from services.metrics import ServiceMetrics, metrics_routes
from services.process import StopFn, run_service
from services.secret_file import ensure_secret_file
from webapp_stub.api import DEFAULT_RATE_LIMIT_PER_MINUTE, MAX_BODY_BYTES, GatewayPicker, WebApi
from webapp_stub.commit import GROUP_COMMIT_WINDOW_S, GroupCommit
from webapp_stub.handoff import (
    DEFAULT_FLUSH_TIMEOUT_S,
    MARK_INTERVAL_S,
    MAX_QUEUE_EVENTS,
    MAX_REFUSALS,
    AdminServerLink,
    Handoff,
    replay_from_mark,
    write_mark,
)
from webapp_stub.presence import PresenceClient
from webapp_stub.store import MAX_EVENT_BYTES, SQLITE_SYNCHRONOUS, Store

log = logging.getLogger("rtm.webapp")

SERVICE = "webapp"
DEFAULT_PORT = 8080
SECRET_FILE = "secret"
# How long in-flight HTTP requests may take to finish when stopping.
HTTP_SHUTDOWN_TIMEOUT_S = 2.0
# How often the webapp looks for dead letters an operator asked to redrive
# (``rtm deadletter redrive`` marks them in the database).
DEADLETTER_POLL_S = 1.0
# Room for the msgpack envelope (channel, seq, t0, ctl, ids) around an event's
# JSON in one wire frame: --max-event-bytes must leave at least this much.
FRAME_ENVELOPE_BYTES = 64 * 1024


class DiscoveryLike(Protocol):
    """The part of :class:`services.discovery.Discovery` the webapp uses."""

    consul_ok: bool

    async def register(
        self,
        service: str,
        instance_id: str,
        address: str,
        port: int,
        *,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        ttl_s: float,
        deregister_after_s: float = ...,
    ) -> None: ...

    def watch_service(self, service: str, on_change: Callable[[list[Instance]], Any]) -> Any: ...

    def watch_key(self, key: str, on_change: Callable[[Any], Any]) -> Any: ...

    def watch_prefix(self, prefix: str, on_change: Callable[[Any], Any]) -> Any: ...

    async def deregister(self) -> None: ...

    async def close(self) -> None: ...


class FixedDiscovery:
    """A test seam with Discovery's surface: fixed instance lists, changeable at will.

    ``set_instances(service, [...])`` calls every watcher of ``service`` like a
    Consul watch would. Registrations are recorded in :attr:`registered`.
    """

    def __init__(self, services: dict[str, list[Instance]] | None = None) -> None:
        self.services: dict[str, list[Instance]] = {k: list(v) for k, v in (services or {}).items()}
        self.watchers: dict[str, list[Callable[[list[Instance]], Any]]] = {}
        self.registered: dict[str, dict[str, Any]] = {}
        self.consul_ok = True

    async def register(self, service: str, instance_id: str, address: str, port: int, **kwargs: Any) -> None:
        self.registered[instance_id] = {"service": service, "address": address, "port": port, **kwargs}

    def watch_service(self, service: str, on_change: Callable[[list[Instance]], Any]) -> None:
        self.watchers.setdefault(service, []).append(on_change)
        on_change(list(self.services.get(service, [])))

    def watch_key(self, key: str, on_change: Callable[[Any], Any]) -> None:
        on_change(None)  # no KV here: the key is absent

    def watch_prefix(self, prefix: str, on_change: Callable[[Any], Any]) -> None:
        on_change({})

    def set_instances(self, service: str, instances: list[Instance]) -> None:
        self.services[service] = list(instances)
        for callback in self.watchers.get(service, []):
            callback(list(instances))

    async def deregister(self) -> None:
        self.registered.clear()

    async def close(self) -> None:
        await self.deregister()
        self.watchers.clear()


def load_secret(given: str, data_dir: str) -> bytes:
    """``--secret``/RTM_SECRET, else ``<data_dir>/secret`` (created with 0600 if missing)."""
    if given:
        return given.encode()
    path = os.path.join(data_dir, SECRET_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
        if value:
            return value.encode()
    except FileNotFoundError:
        pass
    value = ensure_secret_file(Path(path))  # 0600 from its first byte; a racing writer's value wins
    log.info("created a new secret in %s", path)
    return value.encode()


def build_parser() -> Parser:
    parser = service_parser(
        "rtm webapp", "Slack-style Web API with SQLite; hands events to Admin Servers", DEFAULT_PORT
    )
    parser.add("--data-dir", "./.rtm", "directory of webapp.db (and of the secret file if --secret is empty)")
    parser.add("--secret", "", "shared secret for websocket tickets and internal endpoints (empty: <data-dir>/secret)")
    parser.add(
        "--rate-limit-per-minute",
        DEFAULT_RATE_LIMIT_PER_MINUTE,
        "Web API calls per token per method per minute (0: unlimited)",
    )
    parser.add("--region", "", "region whose gateways rtm.connect prefers (also per request: X-Rtm-Region or region=)")
    parser.add(
        "--max-event-bytes",
        MAX_EVENT_BYTES,
        "largest event JSON stored and handed off (bigger posts/edits: msg_too_long)",
    )
    parser.add("--max-outbox-events", MAX_QUEUE_EVENTS, "hand-off queue bound: beyond it writes get ratelimited (429)")
    parser.add("--max-refusals", MAX_REFUSALS, "identical refusals of one event before it is parked as a dead letter")
    parser.add("--sqlite-synchronous", SQLITE_SYNCHRONOUS, "SQLite PRAGMA synchronous (FULL: survives power loss)")
    parser.add("--group-commit-window-s", GROUP_COMMIT_WINDOW_S, "how long a write batch stays open (0: one loop turn)")
    parser.add(
        "--region-map",
        "",
        'fallback order per region as JSON, e.g. {"us-east": ["eu-west"]} (Consul\'s rtm/regions/map wins)',
    )
    return parser


async def start_webapp(
    args: argparse.Namespace, *, discovery: DiscoveryLike | None = None
) -> tuple[dict[str, Any], StopFn]:
    """Serve the webapp; return the ready info and the stop function.

    ``discovery`` defaults to Consul at ``args.consul``; tests pass a
    :class:`FixedDiscovery`. The metrics port is the API port (``--metrics-port``
    is not used).
    """
    iid = instance_id(SERVICE, getattr(args, "instance_id", ""))
    if not 0 < args.max_event_bytes <= wire.DEFAULT_MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES:
        raise ValueError(
            f"--max-event-bytes must be between 1 and {wire.DEFAULT_MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES} "
            f"(the wire frame limit less {FRAME_ENVELOPE_BYTES} bytes of envelope)"
        )
    os.makedirs(args.data_dir, exist_ok=True)
    secret = load_secret(args.secret, args.data_dir)
    stack = AsyncExitStack()
    try:
        store = Store(
            args.data_dir,
            background_checkpoints=True,  # checkpoints off the event loop
            synchronous=args.sqlite_synchronous,
            max_event_bytes=args.max_event_bytes,
        )
        stack.callback(store.close)
        metrics = ServiceMetrics(SERVICE, iid)

        as_link = AdminServerLink()
        handoff = Handoff(
            as_link,
            metrics,
            dead_letters=store,
            max_refusals=args.max_refusals,
            max_event_bytes=args.max_event_bytes,
            max_queue_events=args.max_outbox_events,
        )
        replay_from_mark(store, handoff, time.time())
        if store.resume_redrives():
            log.info("redrives interrupted by the last stop are asked for again")
        handoff.start()
        metrics.gauge("rtm_deadletter_parked", "Dead letters not delivered (parked or being redriven)").set_function(
            store.parked_count
        )

        async def flush_and_close() -> None:
            # Waiting is pointless with no Admin Server known; the events are durable anyway.
            if len(handoff) and as_link.instances and not await handoff.flush(DEFAULT_FLUSH_TIMEOUT_S):
                log.warning("outbox not flushed within %ss", DEFAULT_FLUSH_TIMEOUT_S)
            await handoff.close()
            write_mark(store, handoff, time.time())

        stack.push_async_callback(flush_and_close)

        async def mark_loop() -> None:
            while True:
                await asyncio.sleep(MARK_INTERVAL_S)
                write_mark(store, handoff, time.time())

        mark_task = asyncio.create_task(mark_loop(), name="handoff-mark-loop")

        async def stop_mark_loop() -> None:
            mark_task.cancel()
            await asyncio.gather(mark_task, return_exceptions=True)

        stack.push_async_callback(stop_mark_loop)

        async def redrive_loop() -> None:
            while True:
                await asyncio.sleep(DEADLETTER_POLL_S)
                try:
                    handoff.redrive(store.take_redrives())
                except Exception:  # a locked or failing database: try again next time
                    log.exception("reading redrive requests failed")

        redrive_task = asyncio.create_task(redrive_loop(), name="deadletter-redrive-loop")

        async def stop_redrive_loop() -> None:
            redrive_task.cancel()
            await asyncio.gather(redrive_task, return_exceptions=True)

        stack.push_async_callback(stop_redrive_loop)
        # Group commit: after the loops above, so that at stop it is closed (committing
        # what is open) before they stop and the outbox flushes.
        commits = GroupCommit(store, handoff, metrics, window_s=args.group_commit_window_s)
        stack.callback(commits.close)

        disc: DiscoveryLike = discovery if discovery is not None else Discovery(args.consul, args.consul_token)
        stack.push_async_callback(disc.close)
        gateways = GatewayPicker(regions.parse_map(args.region_map) if args.region_map else None)
        disc.watch_service("admin-server", as_link.set_instances)
        disc.watch_service("gateway", gateways.set_instances)
        disc.watch_key(regions.REGION_MAP_KEY, gateways.set_region_map)
        disc.watch_prefix(regions.DRAINED_PREFIX, gateways.set_drained)
        load_task = asyncio.create_task(gateways.poll_load_loop(), name="gateway-load")

        async def stop_load_loop() -> None:
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)

        stack.push_async_callback(stop_load_loop)

        api = WebApi(
            store,
            handoff,
            gateways,
            metrics,
            secret=secret,
            rate_limit_per_minute=args.rate_limit_per_minute,
            region=getattr(args, "region", ""),
        )
        api.commits = commits
        api.presence = PresenceClient(disc, store.manual_away_users)  # users.get/setPresence (webapp_stub/presence.py)
        api.presence.start()
        stack.push_async_callback(api.presence.close)

        def health() -> dict[str, Any]:
            return {
                "handoff_queue": len(handoff),
                "dead_letters": store.parked_count(),
                "admin_server_connected": as_link.link.connected,
                "admin_servers": len(as_link.instances),
                "gateways": len(gateways.instances),
                "consul": disc.consul_ok,
            }

        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(api.routes())
        app.add_routes(metrics_routes(metrics, health))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        await site.start()
        stack.push_async_callback(site.stop)
        port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        address = advertised(args.host, args.advertise_host)
        await disc.register(SERVICE, iid, address, port, meta={"metrics_port": str(port)}, ttl_s=args.ttl_s)
        stack.push_async_callback(disc.deregister)
    except BaseException:
        await stack.aclose()
        raise
    info = {
        "service": SERVICE,
        "id": iid,
        "host": address,
        "port": port,
        "url": f"http://{address}:{port}",
        "data_dir": os.path.abspath(args.data_dir),
    }
    # Exposed for in-process tests (the store, the outbox, the API object).
    info_objects = {"store": store, "handoff": handoff, "api": api, "discovery": disc, "commits": commits}
    stop_fn = _Stop(stack, info_objects)
    log.info("webapp %s serving on %s:%s (data in %s)", iid, address, port, args.data_dir)
    return info, stop_fn


class _Stop:
    """The stop function; its attributes give in-process tests the live parts."""

    def __init__(self, stack: AsyncExitStack, parts: dict[str, Any]) -> None:
        self._stack = stack
        self.parts = parts
        self._done = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        await self._stack.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.instance_id = instance_id(SERVICE, args.instance_id)
    logs.configure(args.instance_id, args.log_level)
    return run_service(lambda: start_webapp(args))


if __name__ == "__main__":
    raise SystemExit(main())
