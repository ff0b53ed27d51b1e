"""The webapp process: Web API + SQLite + the hand-off to Admin Servers.

:class:`WebappServer` wires the parts (``start``/``stop``, like every service);
``main(argv)`` is ``rtm webapp`` / ``python -m webapp_stub``.

Startup: open the store (``synchronous=FULL`` with group commit, see
:mod:`webapp_stub.commit`), start the outbox (requeueing what the last run may
not have handed off, from the store's hand-off mark, and the dead letters an
operator asked to redrive), watch ``admin-server``
and ``gateway`` in Consul, serve HTTP (API, ``/healthz``
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
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from services import regions, wire
from services.config import Parser, add_listen_backlog_flag, advertised, instance_id, service_parser
from services.connection import serve
from services.discovery import Discovery, Instance
from services.errors import ConfigError
from services.identity import ADMIN_SERVER, GATEWAY, WEBAPP
from services.metrics import ServiceMetrics, metrics_routes
from services.process import run_main
from services.secret_file import ensure_secret_file
from services.tls import cert_instance, refusal_kind, trust_from_args
from webapp_stub import methods  # noqa: F401  (importing it registers every Web API method)
from webapp_stub.api import DEFAULT_RATE_LIMIT_PER_MINUTE, MAX_BODY_BYTES, GatewayPicker, WebApi
from webapp_stub.args import BODY_PARSER_KEY, REQUEST_TIMEOUT_KEY, BodyThread
from webapp_stub.client import BrowserClient, add_browser_client_flags, public_base_url
from webapp_stub.commit import COMMIT_FSYNC_THREAD, GroupCommit, add_commit_flags, pacing_options
from webapp_stub.commit_pacer import handoff_interval_s
from webapp_stub.file_transfer import FileService, add_file_flags
from webapp_stub.fixed_discovery import FixedDiscovery  # noqa: F401  (re-exported: the tests import it from here)
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
from webapp_stub.http_front import HttpFront
from webapp_stub.http_limits import add_http_limit_flags
from webapp_stub.http_refusals import public_runner
from webapp_stub.internal import InternalEndpoints
from webapp_stub.methods.auth import MAX_REVOKE_FANOUT_WAIT_S, REVOKE_FANOUT_WAIT_S
from webapp_stub.models import Event
from webapp_stub.presence import PresenceClient
from webapp_stub.scheduler import Scheduler, add_scheduler_flags, open_scheduler_store, scheduler_options
from webapp_stub.store import MAX_EVENT_BYTES, SQLITE_SYNCHRONOUS, Store
from webapp_stub.team_join import NewPeople, announce_new_people
from webapp_stub.wal_fsync import wal_path_of

log = logging.getLogger("rtm.webapp")

SERVICE = WEBAPP
DEFAULT_PORT = 8080
SECRET_FILE = "secret"
# How long in-flight HTTP requests may take to finish when stopping.
HTTP_SHUTDOWN_TIMEOUT_S = 2.0
# The default of --lean-post-path (issue 17): plain chat.postMessage requests skip aiohttp.
LEAN_POST_PATH = True
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
    parser.add("--secret", "", "fleet secret: the websocket tickets' key is derived from it (empty: <data-dir>/secret)")
    parser.add(
        "--rate-limit-per-minute",
        DEFAULT_RATE_LIMIT_PER_MINUTE,
        "Web API calls per token per method per minute (0: unlimited)",
    )
    parser.add("--internal-port", 0, "port of the gateways' /internal/ endpoints (mutual TLS; 0: any free port)")
    parser.add("--region", "", "region whose gateways rtm.connect prefers (also per request: X-Rtm-Region or region=)")
    parser.add("--max-event-bytes", MAX_EVENT_BYTES, "largest event JSON stored and handed off (bigger: msg_too_long)")
    parser.add("--max-outbox-events", MAX_QUEUE_EVENTS, "hand-off queue bound: beyond it writes get ratelimited (429)")
    parser.add(
        "--revoke-fanout-wait-s",
        REVOKE_FANOUT_WAIT_S,
        "auth.revoke's wait for its event's fan-out",
        above=0,
        at_most=MAX_REVOKE_FANOUT_WAIT_S,
    )
    parser.add("--max-refusals", MAX_REFUSALS, "identical refusals of one event before it is parked as a dead letter")
    parser.add("--sqlite-synchronous", SQLITE_SYNCHRONOUS, "SQLite PRAGMA synchronous (FULL: survives power loss)")
    add_commit_flags(parser)
    add_listen_backlog_flag(parser)
    parser.add("--lean-post-path", LEAN_POST_PATH, "plain POST /api/chat.postMessage without aiohttp (http_front)")
    add_http_limit_flags(parser)
    parser.add(
        "--region-map",
        "",
        'fallback order per region as JSON, e.g. {"us-east": ["eu-west"]} (Consul\'s rtm/regions/map wins)',
    )
    add_browser_client_flags(parser)
    add_scheduler_flags(parser)
    add_file_flags(parser)
    return parser


class WebappServer:
    """The webapp process: its parts started in order by :meth:`start`, torn down in
    reverse by :meth:`stop` from one exit stack.

    ``discovery`` defaults to Consul at ``args.consul``; tests pass a
    :class:`FixedDiscovery`. The metrics port is the API port (``--metrics-port``
    is not used). After :meth:`start`, the live parts are attributes (``store``,
    ``handoff``, ``commits``, ``api``, ``discovery``) for in-process tests.
    """

    store: Store
    handoff: Handoff
    as_link: AdminServerLink
    commits: GroupCommit
    discovery: DiscoveryLike
    gateways: GatewayPicker
    api: WebApi
    metrics: ServiceMetrics
    front: HttpFront | None = None

    def __init__(self, args: argparse.Namespace, *, discovery: DiscoveryLike | None = None) -> None:
        self.args = args
        # Without --instance-id, the webapp is who its certificate says it is.
        self.instance_id = instance_id(SERVICE, getattr(args, "instance_id", "") or cert_instance(args))
        args.instance_id = self.instance_id
        self.trust = trust_from_args(args, SERVICE)
        self._given_discovery = discovery
        self._stack = AsyncExitStack()
        self._stopped = False
        self.public_url = ""  # --public-url, checked in start()
        self.body_parser: BodyThread | None = None  # large bodies' thread (args.LARGE_BODY_BYTES)

    async def start(self) -> dict[str, Any]:
        """Serve and register; return the ready info. On any failure, what started is stopped."""
        args = self.args
        limit = wire.DEFAULT_MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES
        if not 0 < args.max_event_bytes <= limit:
            raise ConfigError(
                f"--max-event-bytes must be between 1 and {limit} "
                f"(the wire frame limit less {FRAME_ENVELOPE_BYTES} bytes of envelope)"
            )
        self.public_url = public_base_url(getattr(args, "public_url", ""))
        os.makedirs(args.data_dir, exist_ok=True)
        secret = load_secret(args.secret, args.data_dir)
        try:
            self._open_store()
            self._start_handoff()
            self._spawn(self._mark_loop(), "handoff-mark-loop")
            self._spawn(self._redrive_loop(), "deadletter-redrive-loop")
            # Group commit: after the loops above, so it closes (commits) before they stop and the outbox flushes.
            self.commits = GroupCommit(
                self.store,
                self.handoff,
                self.metrics,
                window_s=args.group_commit_window_s,
                **pacing_options(args),
                wal_path=wal_path_of(self.store.path),
                # FULL's fsync on the thread, off the loop; NORMAL/OFF asked for no fsync at all
                fsync_thread=getattr(args, "commit_fsync_thread", COMMIT_FSYNC_THREAD)
                and args.sqlite_synchronous.upper() in ("FULL", "EXTRA"),
            )
            self._stack.callback(self.commits.close)
            self._watch_fleet()
            self._start_api(secret)
            people = NewPeople(self.store)  # rtm users add's people, announced (team_join.py)
            self._spawn(announce_new_people(people, self.api.publish, self.api.durable), "team-join-loop")
            port = await self._serve_http()
            internal_port = await self._serve_internal()
            address = advertised(args.host, args.advertise_host)
            if self.api.files is not None:  # the files' URLs that are stored: never from a request's Host
                self.api.files.own_url = f"http://{address}:{port}"
            meta = {"metrics_port": str(port), "internal_port": str(internal_port)}  # gateways find /internal/ there
            await self.discovery.register(SERVICE, self.instance_id, address, port, meta=meta, ttl_s=args.ttl_s)
            self._stack.push_async_callback(self.discovery.deregister)
        except BaseException:
            await self._stack.aclose()
            raise
        log.info("webapp %s serving on %s:%s (data in %s)", self.instance_id, address, port, args.data_dir)
        return {
            "service": SERVICE,
            "id": self.instance_id,
            "host": address,
            "port": port,
            "url": f"http://{address}:{port}",
            "internal_port": internal_port,
            "internal_url": f"{'https' if self.trust.enabled else 'http'}://{address}:{internal_port}",
            "data_dir": os.path.abspath(args.data_dir),
        }

    async def stop(self) -> None:
        """Deregister, stop accepting, finish in-flight requests, stop the watches and loops,
        flush the outbox for a bounded time, write the mark, close the database. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._stack.aclose()

    def _open_store(self) -> None:
        args = self.args
        self.store = Store(
            args.data_dir,
            background_checkpoints=True,  # checkpoints off the event loop
            synchronous=args.sqlite_synchronous,
            max_event_bytes=args.max_event_bytes,
        )
        self._stack.callback(self.store.close)
        self.metrics = ServiceMetrics(SERVICE, self.instance_id)

    def _handoff_interval_s(self) -> float:
        """The hand-off's pacing now: from the rate of writes that the group commit measures."""
        commits: GroupCommit | None = getattr(self, "commits", None)  # None before start() made it
        rate_per_s = commits.pacer.rate_per_s if commits is not None else 0.0
        args = self.args
        return handoff_interval_s(rate_per_s, args.handoff_pacing_base_rate_per_s, args.handoff_interval_cap_s)

    def _start_handoff(self) -> None:
        """The outbox, requeueing what the last run may not have handed off (from the mark)
        and the redrives it was doing; its flush is the stop step after the loops."""
        args, store = self.args, self.store
        self.as_link = AdminServerLink(self.trust)
        self.handoff = Handoff(
            self.as_link,
            self.metrics,
            dead_letters=store,
            max_refusals=args.max_refusals,
            max_event_bytes=args.max_event_bytes,
            max_queue_events=args.max_outbox_events,
            interval_s=self._handoff_interval_s,
            batch_events=args.handoff_batch_events,
        )
        replay_from_mark(store, self.handoff, time.time())
        if store.resume_redrives():
            log.info("redrives interrupted by the last stop are asked for again")
        self.handoff.start()
        self.metrics.gauge(
            "rtm_deadletter_parked", "Dead letters not delivered (parked or being redriven)"
        ).set_function(store.parked_count)
        self._stack.push_async_callback(self._flush_and_close)

    async def _flush_and_close(self) -> None:
        handoff = self.handoff
        # Waiting is pointless with no Admin Server known; the events are durable anyway.
        if len(handoff) and self.as_link.instances and not await handoff.flush(DEFAULT_FLUSH_TIMEOUT_S):
            log.warning("outbox not flushed within %ss", DEFAULT_FLUSH_TIMEOUT_S)
        await handoff.close()
        write_mark(self.store, handoff, time.time(), self._held_t0())

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task, cancelled (and awaited) at its place in the stop order."""
        task = asyncio.create_task(coro, name=name)

        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self._stack.push_async_callback(cancel)

    async def _mark_loop(self) -> None:
        while True:
            await asyncio.sleep(MARK_INTERVAL_S)
            write_mark(self.store, self.handoff, time.time(), self._held_t0())

    def _held_t0(self) -> float | None:
        """The oldest event the group commit holds back from the outbox (the mark stays below it)."""
        commits: GroupCommit | None = getattr(self, "commits", None)  # None before start() made it
        return commits.oldest_t0() if commits is not None else None

    async def _redrive_loop(self) -> None:
        while True:
            await asyncio.sleep(DEADLETTER_POLL_S)
            try:
                self.handoff.redrive(self.store.take_redrives())
            except Exception:  # a locked or failing database: try again next time
                log.exception("reading redrive requests failed")

    def _watch_fleet(self) -> None:
        """Consul watches: admin servers, gateways, the region map, drained regions; gateway load."""
        args = self.args
        given = self._given_discovery
        self.discovery = given if given is not None else Discovery(args.consul, args.consul_token)
        self._stack.push_async_callback(self.discovery.close)
        self.gateways = GatewayPicker(regions.parse_map(args.region_map) if args.region_map else None)
        self.discovery.watch_service(ADMIN_SERVER, self.as_link.set_instances)
        self.discovery.watch_service(GATEWAY, self.gateways.set_instances)
        self.discovery.watch_key(regions.REGION_MAP_KEY, self.gateways.set_region_map)
        self.discovery.watch_prefix(regions.DRAINED_PREFIX, self.gateways.set_drained)
        self._spawn(self.gateways.poll_load_loop(), "gateway-load")

    def _start_api(self, secret: bytes) -> None:
        args = self.args
        self.api = WebApi(
            self.store,
            self.handoff,
            self.gateways,
            self.metrics,
            secret=secret,
            rate_limit_per_minute=args.rate_limit_per_minute,
            region=getattr(args, "region", ""),
        )
        self.api.commits = self.commits
        self.api.public_url = self.public_url
        self.api.revoke_fanout_wait_s = args.revoke_fanout_wait_s
        # files (webapp_stub/files.py): their bytes under DATA_DIR/files, the sweep of those never completed
        self.api.files = files = FileService(
            self.api,
            args.data_dir,
            max_file_bytes=args.max_file_bytes,
            max_pending_per_user=args.max_pending_files_per_user,
            pending_ttl_s=args.pending_file_ttl_s,
            read_timeout_s=args.http_request_timeout_s,
            max_storage_per_user=args.max_file_storage_bytes_per_user,
            min_free_disk_bytes=args.min_free_disk_bytes,
        )
        self._spawn(files.sweep_loop(), "file-sweep-loop")
        # users.get/setPresence (webapp_stub/presence.py)
        presence = PresenceClient(self.discovery, self.store.manual_away_users, self.trust)
        self.api.presence = presence
        presence.start()
        self._stack.push_async_callback(presence.close)
        # scheduled messages and reminders (webapp_stub/scheduler.py): fired through a connection
        # of their own (no fsync per batch), behind live traffic
        webapp_store = self.store
        scheduler = Scheduler(
            open_scheduler_store(
                webapp_store.path, max_event_bytes=args.max_event_bytes, event_clock=webapp_store.event_clock
            ),
            self.publish_fired,
            self.metrics,
            outbox_backlog=self.scheduler_backlog,
            live_writing=lambda: webapp_store.in_batch,
            owns_store=True,
            **scheduler_options(args),
        )
        self.api.scheduler = scheduler
        scheduler.start()
        self._stack.push_async_callback(scheduler.close)

    def scheduler_backlog(self) -> int:
        """What the scheduler waits on: events in the outbox and fired events still waiting
        for their fsync (so a slow disk bounds them too, by --scheduler-outbox-backlog-max)."""
        return len(self.handoff) + (self.commits.unsynced if self.commits is not None else 0)

    def publish_fired(self, events: list[Event]) -> None:
        """The scheduler's committed events: its connection does not fsync, so they go out once
        the WAL is synced (webapp_stub/commit.py), never before they would survive a power loss."""
        if self.commits is not None:
            self.commits.publish_after_sync(events)
        else:
            self.api.publish(events)

    def health(self) -> dict[str, Any]:
        return {
            "handoff_queue": len(self.handoff),
            "dead_letters": self.store.parked_count(),
            "admin_server_connected": self.as_link.link.connected,
            "admin_servers": len(self.as_link.instances),
            "gateways": len(self.gateways.instances),
            "consul": self.discovery.consul_ok,
        }

    async def _serve_internal(self) -> int:
        """The gateways' ``/internal/`` endpoints on a listener of their own, behind the
        mutual TLS gate (gateway certificates only, docs/trust.md); returns the port."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(InternalEndpoints(self.api, check_callers=self.trust.enabled).routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        assert runner.server is not None
        server = await serve(
            self.args.host,
            self.args.internal_port,
            runner.server,
            trust=self.trust,
            on_refused=lambda _source, exc: self.metrics.error(refusal_kind(exc)),
        )
        self._stack.callback(server.close)
        return int(server.sockets[0].getsockname()[1])

    async def _serve_http(self) -> int:
        """API, ``/healthz``, ``/metrics`` and the browser client on the public port (never
        ``/internal/``: that is :meth:`_serve_internal`'s); returns the port."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(self.api.routes())
        app.add_routes(metrics_routes(self.metrics, self.health))
        if self.api.files is not None:  # uploads and downloads (webapp_stub/file_transfer.py)
            app.add_routes(self.api.files.routes())
        # the browser client at / (webapp_stub/client.py, docs/browser.md)
        app.add_routes(BrowserClient(self.store, self.metrics, demo=getattr(self.args, "demo", True)).routes())
        args = self.args
        app[REQUEST_TIMEOUT_KEY] = args.http_request_timeout_s  # a body's arrival (read_args)
        app[BODY_PARSER_KEY] = self.body_parser = BodyThread()
        self._stack.callback(self.body_parser.close)
        runner = public_runner(app, self.metrics.error, HTTP_SHUTDOWN_TIMEOUT_S)  # keep-alive; refusals counted
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        assert runner.server is not None
        # plain chat.postMessage requests skip aiohttp; other connections go to it (http_front.py),
        # all of them inside the front's limits
        self.front = HttpFront.from_args(self.api, runner.server, args, max_body_bytes=MAX_BODY_BYTES)
        port = await self.front.start(args.host, args.port, backlog=args.listen_backlog)
        self._stack.push_async_callback(self.front.stop)
        return port


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser().parse_args(argv), SERVICE, WebappServer)
