"""Sans-I/O model of the Consul subset the rtm fleet uses.

:class:`ConsulState` holds one node (``rtm-dev`` in ``dc1``) with its agent
services and TTL checks, the KV store, and sessions. It never awaits, never
reads a real clock (the clock is injected) and never touches a socket: the
aiohttp layer in :mod:`consul_dev.app` decodes HTTP into calls on it
and encodes what it returns. Every public method first applies whatever expired
by the clock (TTL checks, critical-service reaping, session TTLs), so the model
is correct however rarely :meth:`ConsulState.tick` is called.

Indexes follow Consul's state store: one raft-like index advances on every
write that changes something, every record carries ``CreateIndex`` /
``ModifyIndex``, and each query answers with the index of the data it read
(the key's ``ModifyIndex``; the highest index under a KV prefix, tombstones
included; a per-service-name index for health and catalog service queries;
table indexes otherwise). A blocking query therefore wakes only when its own
result changes.

Request bodies are decoded as Go's ``encoding/json`` decodes them into
Consul's structs (:mod:`consul_dev.go_json`, :mod:`consul_dev.definitions`).
Errors are typed, each with the HTTP status and body text real Consul sends
(:mod:`consul_dev.errors`).

How it is built: one class per domain, each in its own module and each
building on the ones it needs, all sharing one index (a session's
invalidation releases KV locks; a check going critical invalidates sessions):

* :mod:`consul_dev.store` (:class:`~consul_dev.store.StateStore`): the clock,
  the index and table indexes, the records (:mod:`consul_dev.records`);
* :mod:`consul_dev.kv` (:class:`~consul_dev.kv.KVState`): KV, locks, tombstones;
* :mod:`consul_dev.sessions` (:class:`~consul_dev.sessions.SessionState`): sessions;
* :mod:`consul_dev.agent` (:class:`~consul_dev.agent.AgentState`): service and
  check registration, TTL updates;
* :mod:`consul_dev.catalog` (:class:`~consul_dev.catalog.CatalogState`): agent,
  catalog and health views;
* this module: :class:`ConsulState`, which applies expiries across them all.
"""

from __future__ import annotations

from consul_dev.catalog import CatalogState
from consul_dev.node import (
    DEREGISTER_CRITICAL_MIN_S,
    HEALTH_CRITICAL,
    NS_PER_S,
    TOMBSTONE_TTL_S,
    TTL_EXPIRED_OUTPUT,
)


class ConsulState(CatalogState):
    """The dev agent's whole state: one node, its services and checks, KV, sessions.

    Not thread-safe and not async: the caller serialises calls. ``now_s`` is
    the clock (seconds, any epoch, never going backwards); every public method
    reads it once to apply expiries first. Query methods return
    ``(index, result)`` where ``index`` is the index a blocking query on that
    result compares against (always >= 1); ``result`` is already in the JSON
    shape Consul replies with.
    """

    def tick(self) -> None:
        """Apply everything that has expired by the clock: TTL checks, reaping, session TTLs."""
        self._expire()

    def _due_events(self, now: float) -> list[tuple[float, int, str, str]]:
        events: list[tuple[float, int, str, str]] = []
        for check in self._checks.values():
            if check.ttl_deadline_s is not None and check.ttl_deadline_s <= now:
                events.append((check.ttl_deadline_s, 0, "check", check.check_id))
            if check.deregister_after_ns and check.service_id and check.critical_since_s is not None:
                after_s = max(check.deregister_after_ns / NS_PER_S, DEREGISTER_CRITICAL_MIN_S)
                due = check.critical_since_s + after_s
                if due <= now:
                    events.append((due, 1, "reap", check.check_id))
        for session in self._sessions.values():
            if session.deadline_s is not None and session.deadline_s <= now:
                events.append((session.deadline_s, 2, "session", session.id))
        return events

    def _expire(self) -> None:
        now = self._now_s()
        # One event at a time, earliest first: an event may cause others
        # (a check going critical starts its reap timer, invalidates sessions).
        while True:
            events = self._due_events(now)
            if not events:
                break
            due, _, kind, ident = min(events)
            self._begin()
            if kind == "check":
                check = self._checks[ident]
                check.ttl_deadline_s = None
                output = TTL_EXPIRED_OUTPUT
                if check.last_output:
                    output = f"{TTL_EXPIRED_OUTPUT} (last output before timeout follows): {check.last_output}"
                self._set_check_status(check, HEALTH_CRITICAL, output, at_s=due)
            elif kind == "reap":
                service_id = self._checks[ident].service_id
                if service_id in self._services:
                    self._remove_service(service_id, at_s=due)
                else:  # orphaned check: stop considering it
                    self._checks[ident].critical_since_s = None
            else:
                self._invalidate_session(ident, at_s=due)
        for key, stone in list(self._tombstones.items()):
            if now - stone.deleted_at_s >= TOMBSTONE_TTL_S:
                del self._tombstones[key]
        for key, until in list(self._lock_delay_until_s.items()):
            if until <= now:
                del self._lock_delay_until_s[key]

    def next_deadline_s(self) -> float | None:
        """The earliest clock time at which something will expire, if any."""
        deadlines = [c.ttl_deadline_s for c in self._checks.values() if c.ttl_deadline_s is not None]
        deadlines += [s.deadline_s for s in self._sessions.values() if s.deadline_s is not None]
        for check in self._checks.values():
            if check.deregister_after_ns and check.service_id and check.critical_since_s is not None:
                after_s = max(check.deregister_after_ns / NS_PER_S, DEREGISTER_CRITICAL_MIN_S)
                deadlines.append(check.critical_since_s + after_s)
        return min(deadlines, default=None)

    # ---- agent: services and checks --------------------------------------------
