"""A presence server's in-memory model, sans I/O: commands in, pushes out.

Per user (:class:`UserPresence`): the gateways where the user has at least one
connection (each entry tagged with the *sync epoch* it was reported in), the
manual presence (``auto`` or ``away``, set through ``users.setPresence``),
and when the effective presence last changed. The effective presence is
``active`` when the user is online on some gateway and manual is ``auto``,
else ``away``. Gateways count their own connections and report a user once:
online at the first connection, offline after the last.

Per gateway (:class:`Lease`): when its lease expires unless renewed, its
current sync epoch, the users it reported online and the users it watches.
A gateway that stops renewing (it died, or is cut off) loses every user it
reported when :meth:`PresenceTable.expire` finds the lease past its expiry.

Sync epochs: a gateway that (re)connects to a presence server, or sees the
ring change, re-reports everything: ``lease(gw, epoch=E)``, then ``online`` and
``subscribe`` batches tagged ``E``, then ``synced(gw, E)``, which drops that
gateway's entries from any other epoch (users that went offline, or watches
that ended, while the link was down). Nothing flaps: an entry re-reported in
the new epoch never leaves.

Watchers: user -> gateways subscribed. Every command returns :data:`Pushes`,
gateway id -> ``[[user, presence], ...]``: changes of effective presence for
users that gateway watches. The I/O layer writes each list as one
``presence`` frame.

Rebuilding: a server that just took over a slot starts empty and learns its
state from the gateways and the webapp within a moment. While
:attr:`PresenceTable.rebuilding` is set no change is pushed (so watchers do not
see a user flap to away and back while the reports arrive);
:meth:`PresenceTable.end_rebuild` then pushes every watched user's state once,
and gateways forward only what differs from what their clients last saw.

Teams (docs/authz-review.md, finding 5): each user's team, as the gateway that reported
the user online said it (:meth:`PresenceTable.online` with ``teams``). The table keeps it
and says it (:meth:`PresenceTable.team_of`); it decides nothing with it: gateways show a
user's presence only to sessions of the user's team, with the team the pushes and query
answers carry. A user no gateway reported with a team (never online, or reported by a
gateway older than the field) has none (None).

The clock is injected (``time.monotonic`` by default); tests use a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

ACTIVE = "active"
AWAY = "away"
AUTO = "auto"
MANUAL_VALUES = (AUTO, AWAY)
# A gateway's lease: how long a gateway that stopped renewing keeps its users
# online. Gateways renew four times per TTL, so one late renewal (a busy event
# loop, a GC pause) never drops anybody, and a dead gateway's users go away
# within this many seconds.
LEASE_TTL_S = 5.0
NO_EPOCH = 0  # entries reported outside any sync (a lease granted implicitly)

Pushes = dict[str, list[list[str]]]  # gateway id -> [[user, presence], ...]
Clock = Callable[[], float]


@dataclass(slots=True)
class UserPresence:
    online: dict[str, int] = field(default_factory=dict)  # gateway id -> epoch of its report
    manual: str = AUTO
    changed_at: float = 0.0  # clock time of the last change of effective presence
    team: str | None = None  # the user's team, as a gateway reported it; None: not said yet

    @property
    def presence(self) -> str:
        return ACTIVE if self.online and self.manual == AUTO else AWAY


@dataclass(slots=True)
class Lease:
    expires_at: float
    epoch: int = NO_EPOCH
    online: set[str] = field(default_factory=set)  # users this gateway reported online
    watching: dict[str, int] = field(default_factory=dict)  # user -> epoch of the subscription


@dataclass
class TableStats:
    changes: int = 0  # changes of effective presence
    expired_leases: int = 0
    dropped_entries: int = 0  # online entries removed by expiry, release or a sync


class PresenceTable:
    def __init__(self, clock: Clock = time.monotonic, lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.clock = clock
        self.lease_ttl_s = lease_ttl_s
        self.users: dict[str, UserPresence] = {}
        self.leases: dict[str, Lease] = {}
        self.watchers: dict[str, set[str]] = {}  # user -> gateway ids
        self.rebuilding = False
        self.stats = TableStats()

    # -- reading ------------------------------------------------------------------------
    def presence_of(self, user: str) -> str:
        entry = self.users.get(user)
        return AWAY if entry is None else entry.presence

    def query(self, users: Iterable[str]) -> list[list[str]]:
        return [[u, self.presence_of(u)] for u in users]

    def team_of(self, user: str) -> str | None:
        """The user's team as a gateway reported it, or None (never reported with one)."""
        entry = self.users.get(user)
        return None if entry is None else entry.team

    def details(self, user: str) -> dict[str, object]:
        """What ``users.getPresence`` shows for ``user``."""
        entry = self.users.get(user)
        if entry is None:
            return {"presence": AWAY, "online": False, "manual_away": False, "gateways": 0, "changed_at": None}
        return {
            "presence": entry.presence,
            "online": bool(entry.online),
            "manual_away": entry.manual == AWAY,
            "gateways": len(entry.online),
            "changed_at": entry.changed_at or None,
        }

    @property
    def online_users(self) -> int:
        return sum(1 for e in self.users.values() if e.online)

    @property
    def subscriptions(self) -> int:
        """(user, gateway) watch pairs."""
        return sum(len(g) for g in self.watchers.values())

    # -- leases ------------------------------------------------------------------------------
    def lease(self, gw: str, epoch: int | None = None) -> tuple[int, Pushes]:
        """Grant or renew ``gw``'s lease; with ``epoch``, start a sync in that epoch.

        Returns the lease's epoch (a gateway whose epoch differs from the one it
        synced in was forgotten meanwhile and must sync again) and the pushes
        caused by dropping an expired lease first.
        """
        now = self.clock()
        pushes: Pushes = {}
        lease = self.leases.get(gw)
        if lease is not None and lease.expires_at < now:
            self._drop_gateway(gw, pushes)
            self.stats.expired_leases += 1
            lease = None
        if lease is None:
            lease = self.leases[gw] = Lease(expires_at=now + self.lease_ttl_s)
        else:
            lease.expires_at = now + self.lease_ttl_s
        if epoch is not None:
            lease.epoch = epoch
        return lease.epoch, pushes

    def _lease(self, gw: str) -> Lease:
        """The gateway's lease; one is granted implicitly (epoch 0) to a gateway that
        reports without holding one, and its next renewal tells it to sync."""
        lease = self.leases.get(gw)
        if lease is None:
            lease = self.leases[gw] = Lease(expires_at=self.clock() + self.lease_ttl_s)
        return lease

    def expire(self) -> tuple[list[str], Pushes]:
        """Drop every gateway whose lease has expired; return them and the pushes."""
        now = self.clock()
        pushes: Pushes = {}
        gone = [gw for gw, lease in self.leases.items() if lease.expires_at < now]
        for gw in gone:
            self._drop_gateway(gw, pushes)
        self.stats.expired_leases += len(gone)
        return gone, pushes

    def release(self, gw: str) -> Pushes:
        """The gateway says it is gone: drop it now."""
        pushes: Pushes = {}
        self._drop_gateway(gw, pushes)
        return pushes

    def _drop_gateway(self, gw: str, pushes: Pushes) -> None:
        lease = self.leases.pop(gw, None)
        if lease is None:
            return
        for user in lease.online:
            self._set_offline(gw, user, pushes)
        self.stats.dropped_entries += len(lease.online)
        for user in lease.watching:
            self._unwatch(gw, user)

    # -- reports -------------------------------------------------------------------------------
    def online(
        self, gw: str, users: Iterable[str], epoch: int = NO_EPOCH, teams: Mapping[str, str | None] | None = None
    ) -> Pushes:
        """``gw`` has a connection of each of ``users``; ``teams`` (user -> team) says their
        teams (a user's team never changes, so a missing or None team keeps the one known)."""
        lease = self._lease(gw)
        pushes: Pushes = {}
        now = self.clock()
        for user in users:
            entry = self.users.get(user)
            if entry is None:
                entry = self.users[user] = UserPresence()
            if teams is not None:
                team = teams.get(user)
                if team is not None:
                    entry.team = team
            before = entry.presence
            entry.online[gw] = epoch
            lease.online.add(user)
            self._changed(user, entry, before, now, pushes)
        return pushes

    def offline(self, gw: str, users: Iterable[str]) -> Pushes:
        lease = self.leases.get(gw)
        pushes: Pushes = {}
        for user in users:
            if lease is not None:
                lease.online.discard(user)
            self._set_offline(gw, user, pushes)
        return pushes

    def _set_offline(self, gw: str, user: str, pushes: Pushes) -> None:
        entry = self.users.get(user)
        if entry is None or gw not in entry.online:
            return
        before = entry.presence
        del entry.online[gw]
        self._changed(user, entry, before, self.clock(), pushes)

    def set_manual(self, user: str, manual: str) -> Pushes:
        """``users.setPresence``: ``auto`` or ``away``. Raises ValueError otherwise."""
        if manual not in MANUAL_VALUES:
            raise ValueError(f"manual presence must be one of {MANUAL_VALUES}, not {manual!r}")
        pushes: Pushes = {}
        entry = self.users.get(user)
        if entry is None:
            if manual == AUTO:
                return pushes
            entry = self.users[user] = UserPresence()
        before = entry.presence
        entry.manual = manual
        self._changed(user, entry, before, self.clock(), pushes)
        return pushes

    def _changed(self, user: str, entry: UserPresence, before: str, now: float, pushes: Pushes) -> None:
        after = entry.presence
        if after == before:
            return
        entry.changed_at = now
        self.stats.changes += 1
        if self.rebuilding:
            return
        for gw in self.watchers.get(user, ()):
            pushes.setdefault(gw, []).append([user, after])

    # -- watches -----------------------------------------------------------------------------------
    def subscribe(self, gw: str, users: Iterable[str], epoch: int = NO_EPOCH) -> list[list[str]]:
        """``gw`` watches ``users`` from now on; returns their current presence (to
        answer the clients that asked), or nothing while rebuilding (the state is
        pushed once the rebuild ends)."""
        lease = self._lease(gw)
        state: list[list[str]] = []
        for user in users:
            lease.watching[user] = epoch
            self.watchers.setdefault(user, set()).add(gw)
            if not self.rebuilding:
                state.append([user, self.presence_of(user)])
        return state

    def unsubscribe(self, gw: str, users: Iterable[str]) -> None:
        lease = self.leases.get(gw)
        for user in users:
            if lease is not None:
                lease.watching.pop(user, None)
            self._unwatch(gw, user)

    def _unwatch(self, gw: str, user: str) -> None:
        gateways = self.watchers.get(user)
        if gateways is not None:
            gateways.discard(gw)
            if not gateways:
                del self.watchers[user]

    def synced(self, gw: str, epoch: int) -> Pushes:
        """The gateway has re-reported everything in ``epoch``: drop its entries
        from other epochs. Ignored unless ``epoch`` is the lease's current one
        (a newer sync has started and will finish with its own ``synced``)."""
        pushes: Pushes = {}
        lease = self.leases.get(gw)
        if lease is None or lease.epoch != epoch:
            return pushes
        stale = [
            u for u in lease.online if self.users.get(u) is not None and self.users[u].online.get(gw, epoch) != epoch
        ]
        for user in stale:
            lease.online.discard(user)
            self._set_offline(gw, user, pushes)
        self.stats.dropped_entries += len(stale)
        for user in [u for u, e in lease.watching.items() if e != epoch]:
            del lease.watching[user]
            self._unwatch(gw, user)
        return pushes

    # -- ownership and rebuilding ----------------------------------------------------------------------
    def forget(self, keep: Callable[[str], bool]) -> int:
        """Drop every user for whom ``keep(user)`` is false (the ring moved them away);
        return how many users were dropped."""
        gone = [u for u in self.users if not keep(u)]
        for user in gone:
            del self.users[user]
        for user in [u for u in self.watchers if not keep(u)]:
            del self.watchers[user]
        for lease in self.leases.values():
            lease.online = {u for u in lease.online if keep(u)}
            lease.watching = {u: e for u, e in lease.watching.items() if keep(u)}
        return len(gone)

    def start_rebuild(self) -> None:
        self.rebuilding = True

    def end_rebuild(self) -> Pushes:
        """Stop suppressing changes and push every watched user's state to its watchers."""
        self.rebuilding = False
        pushes: Pushes = {}
        for user, gateways in self.watchers.items():
            presence = self.presence_of(user)
            for gw in gateways:
                pushes.setdefault(gw, []).append([user, presence])
        return pushes


def merge(into: dict[str, dict[str, str]], pushes: Pushes) -> None:
    """Fold ``pushes`` into per-gateway pending changes (the last presence of a user wins)."""
    for gw, changes in pushes.items():
        pending = into.setdefault(gw, {})
        for user, presence in changes:
            pending[user] = presence
