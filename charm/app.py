"""CHARM: the leader-elected manager of the consistent-hash rings.

Several CHARMs run; exactly one leads, by holding the Consul lock
``rtm/charm/leader`` with a session that is tied to its own TTL check (so a
dead leader's session dies with its check, a few seconds, and the lock-delay
after it is short). A CHARM restarted under the same id while it led ends
its previous incarnation's session at once. The leader:

* keeps the channel ring (``rtm/ring/channel``, slots ``cs-N`` ->
  ``channel-server`` instances) and the presence ring (``rtm/ring/presence``,
  slots ``ps-N`` -> ``presence`` instances);
* watches each service's healthy instances with blocking queries, and also
  holds a TCP probe to every slot owner, so a process that dies is noticed at
  once (its socket closes and the port refuses) rather than after its TTL;
* when a slot's owner is dead it promotes a live spare into the slot and
  writes the document, version + 1, with CAS; with no spare left it reports
  the slot degraded (log, ``rtm_charm_degraded_slots``, ``rtm status``) and
  keeps trying;
* serves operator requests on its msgpack port (``rtm ring add-slot`` /
  ``remove-slot``); a standby answers ``not_leader`` naming the leader.

The decisions themselves are pure functions in :mod:`charm.state`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

from charm import state
from services import ops, wire
from services.config import Parser, service_parser
from services.connection import KEEPALIVE_FRAME, KEEPALIVE_INTERVAL_S, PeerConnection
from services.discovery import Instance
from services.errors import BadDocument, ErrorCode
from services.identity import CHANNEL_SERVER, CHARM, PRESENCE
from services.msgpack_service import MsgpackService
from services.process import run_main
from services.ring import (
    CHANNEL_RING_KEY,
    CHANNEL_SLOT_PREFIX,
    PRESENCE_RING_KEY,
    PRESENCE_SLOT_PREFIX,
    RingDocument,
)
from services.ring import CHARM_LEADER_KEY as LEADER_KEY
from services.tasks import Tasks

log = logging.getLogger("rtm.charm")

SERVICE = CHARM
DEFAULT_PORT = 7300
# The leader's session has no TTL of its own: it is bound to our service's
# TTL check (and serfHealth), so it dies when we stop passing that check, a
# few seconds after we die, instead of Consul's minimum session TTL of 10 s.
LEADER_CHECK_S = 10  # blocking wait on the leader key, both leading and campaigning
LOCK_DELAY_S = 1  # how long Consul keeps a dead leader's lock from being taken (Consul's default is 15)
RECONCILE_INTERVAL_S = 5  # also reconcile this often, whatever the watches say
PROBE_CONFIRM_ATTEMPTS = 3  # reconnects refused in a row before a closed probe means "dead"
PROBE_RETRY_DELAY_S = 0.1
PROBE_CONNECT_TIMEOUT_S = 1.0
WRITE_RETRY_DELAY_S = 0.2
NOT_LEADER = "not_leader"

RINGS = {
    "channel": (CHANNEL_SERVER, CHANNEL_RING_KEY, CHANNEL_SLOT_PREFIX),
    "presence": (PRESENCE, PRESENCE_RING_KEY, PRESENCE_SLOT_PREFIX),
}


class RingManager:
    """The leader's keeper of one ring."""

    def __init__(self, charm: Charm, name: str, slot_count: int) -> None:
        self.charm = charm
        self.name = name
        self.service, self.key, self.prefix = RINGS[name]
        self.slot_count = slot_count
        self.healthy: list[Instance] = []
        self.dead: set[str] = set()  # owners whose probe says the process is gone
        self.probes: dict[str, asyncio.Task[None]] = {}
        self.checks = Tasks(f"{name} ring")  # revive checks, held until they end
        self.doc = RingDocument(version=0, slots={})
        self.wake = asyncio.Event()
        self.seen = asyncio.Event()  # set once the first health answer arrived
        self.lock = asyncio.Lock()
        self.reconciles = 0  # reconcile passes run while leading (tests watch it go on)

    def alive(self) -> list[state.Candidate]:
        return [state.Candidate(i.id, i.tag("role") == "spare") for i in self.healthy if i.id not in self.dead]

    async def run(self) -> None:
        """Lead this ring until cancelled. Nothing read from Consul ends it: a failed
        reconcile is logged and counted, and the next one comes at the next wake or interval."""
        watch = asyncio.create_task(self.watch_loop())
        try:
            await self.seen.wait()  # decide nothing before we know who is alive
            while True:
                try:
                    await self.reconcile()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Consul unreachable, a CAS race, a bug: lead on
                    log.warning("%s ring: reconcile failed: %s; again in %ss", self.name, exc, RECONCILE_INTERVAL_S)
                    self.charm.metrics.error("reconcile_failed")
                self.reconciles += 1
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), RECONCILE_INTERVAL_S)
                except TimeoutError:
                    pass
        finally:
            watch.cancel()
            for probe in self.probes.values():
                probe.cancel()
            self.probes.clear()

    async def watch_loop(self) -> None:
        index: int | None = None
        while True:
            try:
                index, instances = await self.charm.discovery.healthy(self.service, index=index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching %s failed: %s", self.service, exc)
                index = None
                await asyncio.sleep(WRITE_RETRY_DELAY_S)
                continue
            self.seen.set()
            if instances != self.healthy:
                self.healthy = instances
                live = {i.id: i for i in instances}
                self.dead = {d for d in self.dead if d in live}
                for owner in self.dead:  # registered again: a restarted process, or still the dead one?
                    self.checks.spawn(self.revive_check(owner, live[owner].address, live[owner].port))
                self.wake.set()

    async def read(self) -> tuple[int, RingDocument, bool]:
        """(ModifyIndex, the document to decide on, whether Consul's value needs repair).

        A value that is not a ring document, or older than the one we last read
        or wrote, is logged and counted, and we decide on our last good one; the
        next write (CAS over the bad value, version above both) repairs the key.
        With no good document yet, :class:`BadDocument` is raised: nothing is written.
        """
        modify_index, raw = await self.charm.discovery.key_modify_index(self.key)
        try:
            doc = RingDocument.from_json(raw, self.key)
            if doc.version < self.doc.version:
                raise BadDocument(self.key, f"version {doc.version} is older than the applied {self.doc.version}")
            return modify_index, doc, False
        except BadDocument as exc:
            self.charm.metrics.error("bad_kv")
            if not self.doc.slots:
                log.error("%s ring: %s; no good ring known yet, writing nothing", self.name, exc)
                raise
            log.error("%s ring: %s; deciding on v%s and repairing the key", self.name, exc, self.doc.version)
            return modify_index, self.doc, True

    async def reconcile(self) -> None:
        async with self.lock:
            modify_index, doc, repair = await self.read()
            alive = self.alive()
            if not doc.slots:
                new = state.initial(self.prefix, self.slot_count, alive) if alive else None
                if new is not None and doc.version:
                    new = RingDocument(version=doc.version + 1, slots=new.slots)
            else:
                new = state.reconcile(doc, alive)
            if new is None and repair:
                new = RingDocument(version=doc.version + 1, slots=dict(doc.slots))
            if new is not None:
                reason = "repair" if repair and new.slots == doc.slots else "failover" if doc.slots else "initial"
                await self.write(doc, new, modify_index, reason)
            else:
                self.doc = doc
            self.after_change()

    async def write(self, old: RingDocument, new: RingDocument, modify_index: int, reason: str) -> bool:
        state.check_invariants(new)
        ok = await self.charm.discovery.put_key(self.key, new.to_json(), cas=modify_index)
        self.charm.ring_writes.labels(self.name, "ok" if ok else "cas_conflict").inc()
        if not ok:
            self.wake.set()  # somebody else wrote: read again
            return False
        moved = {s: (old.slots.get(s), o) for s, o in new.slots.items() if old.slots.get(s) != o}
        if reason == "failover":
            self.charm.failovers.labels(self.name).inc(len(moved))
        log.warning("%s ring v%s -> v%s (%s): %s", self.name, old.version, new.version, reason, moved or new.slots)
        self.doc = new
        return True

    def after_change(self) -> None:
        alive_ids = {c.id for c in self.alive()}
        degraded = state.degraded_slots(self.doc, alive_ids) if self.doc.slots else []
        self.charm.degraded.labels(self.name).set(len(degraded))
        self.charm.ring_version.labels(self.name).set(self.doc.version)
        if degraded:
            log.error(
                "%s ring v%s DEGRADED: slots %s have no live owner and no spare is left",
                self.name,
                self.doc.version,
                degraded,
            )
        owners = {o for o in self.doc.slots.values() if o}
        for gone in [o for o in self.probes if o not in owners]:
            self.probes.pop(gone).cancel()
        by_id = {i.id: i for i in self.healthy}
        for owner in owners:
            if owner not in self.probes and owner in by_id:
                inst = by_id[owner]
                self.probes[owner] = asyncio.create_task(self.probe(owner, inst.address, inst.port))

    async def dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a probe connection: mutual TLS as this CHARM (the owner's server refuses anything else).

        A failed TLS handshake raises :class:`ssl.SSLError`; the process answered,
        so the probe counts it as alive (a certificate problem is not a death)."""
        trust = self.charm.trust
        tls: dict[str, Any] = (
            {"ssl": trust.client, "ssl_handshake_timeout": trust.handshake_timeout_s} if trust.enabled else {}
        )
        return await asyncio.wait_for(asyncio.open_connection(host, port, **tls), PROBE_CONNECT_TIMEOUT_S)

    async def probe(self, owner: str, host: str, port: int) -> None:
        """Hold a TCP (TLS) connection to ``owner``; when it closes and the port refuses, it is dead."""
        try:
            while True:
                try:
                    reader, writer = await self.dial(host, port)
                except ssl.SSLError as exc:
                    log.warning("%s owner %s at %s:%s refused our probe's TLS: %s", self.name, owner, host, port, exc)
                    await asyncio.sleep(PROBE_RETRY_DELAY_S * 10)
                    continue
                except (TimeoutError, OSError):
                    refused = 1
                else:
                    await self.hold_open(reader, writer)  # returns when the peer closes
                    writer.close()
                    refused = 0
                while refused < PROBE_CONFIRM_ATTEMPTS:
                    await asyncio.sleep(PROBE_RETRY_DELAY_S)
                    try:
                        _, writer = await self.dial(host, port)
                    except ssl.SSLError:
                        break  # it answered: alive
                    except (TimeoutError, OSError):
                        refused += 1
                        continue
                    writer.close()
                    break
                if refused >= PROBE_CONFIRM_ATTEMPTS:
                    log.warning("%s owner %s at %s:%s is gone (probe refused)", self.name, owner, host, port)
                    self.dead.add(owner)
                    self.wake.set()
                    return
        finally:
            self.probes.pop(owner, None)

    async def hold_open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read until the peer closes, sending the wire keepalive whenever we were silent
        for a keepalive interval, so the peer's idle timeout never takes the probe for a dead peer."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + KEEPALIVE_INTERVAL_S
        while True:
            try:
                data = await asyncio.wait_for(reader.read(64 * 1024), max(0.0, next_ping - loop.time()))
            except TimeoutError:
                data = None
            except OSError:  # reset (or a TLS error) by the peer: it is gone, like a close
                return
            if data == b"":
                return
            if loop.time() >= next_ping:
                writer.write(KEEPALIVE_FRAME)
                next_ping = loop.time() + KEEPALIVE_INTERVAL_S

    async def revive_check(self, owner: str, host: str, port: int) -> None:
        """A process marked dead is registered and healthy again: if it accepts
        connections it was restarted, and may serve as a spare."""
        try:
            _, writer = await self.dial(host, port)
        except (TimeoutError, OSError):
            return
        writer.close()
        if owner in self.dead:
            log.info("%s instance %s is back (restarted); it can serve as a spare", self.name, owner)
            self.dead.discard(owner)
            self.wake.set()

    # -- operator changes --------------------------------------------------------
    async def change(self, op: str, slot: str = "") -> RingDocument:
        async with self.lock:
            try:
                modify_index, doc, _ = await self.read()
            except BadDocument as exc:
                raise state.RingChangeRefused(f"the ring in Consul is unreadable: {exc}") from None
            if op == "add_slot":
                new = state.add_slot(doc, self.prefix, self.alive())
            else:
                new = state.remove_slot(doc, slot)
            if not await self.write(doc, new, modify_index, op):
                raise state.RingChangeRefused("the ring changed meanwhile; try again")
            self.after_change()
            return new


class Charm(MsgpackService):
    def __init__(self, args: Any) -> None:
        super().__init__(args, SERVICE)
        self.managers = {
            "channel": RingManager(self, "channel", args.channel_slots),
            "presence": RingManager(self, "presence", args.presence_slots),
        }
        self.leading = False
        self.leader_info: dict[str, Any] = {}
        m = self.metrics
        self.is_leader = m.gauge("rtm_charm_is_leader", "1 while this CHARM leads")
        self.failovers = m.counter(
            "rtm_charm_failovers_total", "Slots moved to a spare because their owner died", ["ring"]
        )
        for ring in self.managers:  # the series exist at 0, so increase() counts the first failover
            self.failovers.labels(ring)
        self.degraded = m.gauge("rtm_charm_degraded_slots", "Slots with no live owner and no spare", ["ring"])
        self.ring_version = m.gauge(
            "rtm_charm_ring_version", "Ring version as last read or written by the leader", ["ring"]
        )
        self.ring_writes = m.counter(
            "rtm_charm_ring_writes_total", "Ring document writes by outcome", ["ring", "outcome"]
        )
        self._tasks = Tasks("charm")
        self._session: str | None = None

    # -- lifecycle (services/msgpack_service.py: the order) --------------------------------
    async def started(self) -> None:
        self._tasks.spawn(self.leadership_loop(), "leadership-loop")

    async def stopping(self) -> None:
        await self._tasks.cancel_all()
        if self._session is not None:  # hand leadership over at once
            try:
                await self.discovery.client.kv.put(LEADER_KEY, "", release=self._session)
                await self.discovery.client.session.destroy(self._session)
            except Exception as exc:
                log.warning("releasing leadership failed: %s", exc)

    def health(self) -> dict[str, Any]:
        return {"leader": self.leading, "consul": self.discovery.consul_ok}

    # -- leadership ----------------------------------------------------------------
    async def leadership_loop(self) -> None:
        client = self.discovery.client
        me = json.dumps({"id": self.instance_id, "host": self.address, "port": self.port})
        while True:
            try:
                self._session = await client.session.create(
                    name=self.session_name,
                    checks=["serfHealth", f"service:{self.instance_id}"],
                    lock_delay=self.args.lock_delay_s,
                    behavior="release",
                )
                await self.campaign(self._session, me)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership: %s; retrying", exc)
            self._set_leading(False)
            await asyncio.sleep(WRITE_RETRY_DELAY_S * 5)

    async def campaign(self, session: str, me: str) -> None:
        client = self.discovery.client
        while True:
            if await client.kv.put(LEADER_KEY, me, acquire=session):
                break
            index, data = await client.kv.get(LEADER_KEY)
            holder = data.get("Session") if data else None
            if data is not None and data.get("Value"):
                self.leader_info = json.loads(data["Value"])
            if holder is None:  # free but within the lock-delay of a dead leader's session
                await asyncio.sleep(self.args.lock_delay_s / 4)
                continue
            if await self.is_my_previous_session(holder):
                # We were restarted under the same id while leading: our old
                # session's checks pass again (we re-registered), so it would
                # only die with its TTL. It is ours; end it now.
                log.warning("destroying the leader session of our previous incarnation")
                await client.session.destroy(holder)
                continue
            await client.kv.get(LEADER_KEY, index=index, wait=f"{LEADER_CHECK_S}s")
        log.warning("%s is now the CHARM leader", self.instance_id)
        self.leader_info = json.loads(me)
        self._set_leading(True)
        leading = [asyncio.create_task(m.run()) for m in self.managers.values()]
        try:
            held_index: int | None = None
            while True:  # lead until the lock is no longer ours (our session died with our check)
                held_index, data = await client.kv.get(LEADER_KEY, index=held_index, wait=f"{LEADER_CHECK_S}s")
                if data is None or data.get("Session") != session:
                    raise RuntimeError("lost the leader lock")
        finally:
            for task in leading:
                task.cancel()
            await asyncio.gather(*leading, return_exceptions=True)
            log.warning("%s stopped leading", self.instance_id)

    async def is_my_previous_session(self, session_id: str) -> bool:
        _, info = await self.discovery.client.session.info(session_id)
        return bool(info) and info.get("Name") == self.session_name and session_id != self._session

    @property
    def session_name(self) -> str:
        return f"rtm-charm-{self.instance_id}"

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        self.is_leader.set(1 if leading else 0)

    # -- operator requests ------------------------------------------------------------
    def make_connection(self) -> PeerConnection:
        return self.peer_connection(f"{self.instance_id}<-operator")

    def handle_request(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        request_id = ops.request_id(msg)
        op = msg["op"]
        refusal = self.authz.check(conn.identity, msg)  # services/authz.py: only the operator changes rings
        if refusal is not None:
            return self.authz.refuse(refusal, request_id)
        if op == "ping":
            return wire.reply_ok(request_id, leader=self.leading)
        if op not in ("ring_add_slot", "ring_remove_slot"):
            self.metrics.error("unknown_op")
            return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, f"unknown op {str(op)[:40]!r}")
        record = ops.parse(msg, (ops.RingAddSlot, ops.RingRemoveSlot))  # BadMessage: answered bad_request
        assert isinstance(record, ops.RingAddSlot | ops.RingRemoveSlot)
        if not self.leading:
            return wire.reply_err(request_id, NOT_LEADER, "ask the leader", leader=self.leader_info)
        manager = self.managers[record.ring]
        return self.change(request_id, manager, op.removeprefix("ring_"), record.slot or "")

    async def change(self, request_id: int, manager: RingManager, op: str, slot: str) -> dict[str, Any]:
        try:
            doc = await manager.change(op, slot)
        except state.RingChangeRefused as exc:
            return wire.reply_err(request_id, "refused", str(exc))
        return wire.reply_ok(request_id, version=doc.version, slots=doc.slots)


def build_parser() -> Parser:
    parser = service_parser("rtm charm", "Run one CHARM (ring manager); several may run, one leads.", DEFAULT_PORT)
    parser.add("--channel-slots", 3, "slots of the channel ring when CHARM creates it")
    parser.add("--presence-slots", 2, "slots of the presence ring when CHARM creates it")
    parser.add("--lock-delay-s", LOCK_DELAY_S, "Consul lock-delay of the leader session, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(args, SERVICE, Charm)
