"""Which channels a gateway must hold at which Channel Server, and what is still owed, sans I/O.

The gateway's local sockets watch channels (:mod:`gateway.state`); each such
channel must be subscribed at the Channel Server that owns it on the ring.
This class keeps, per channel, where it should be subscribed and how far that
got, and hands the asyncio layer (:mod:`gateway.app`) batches to send. It
never awaits and has no clock of its own: ``now`` is passed in.

Per channel, a :class:`Subscription` walks these phases::

    PENDING --take()--> SENT --confirmed()--> CONFIRMED
       ^                 |                        |
       |              failed() --> RETRY (backoff) |
       +-- link_up(): every channel of that server, whatever its phase

Guarantees (issue 13, "subscriptions cannot be lost silently"):

* Every connect of a link, the first one included, makes every channel that
  link should carry PENDING again (:meth:`link_up`): a server that restarted,
  or a connection that broke under a ``sub``, cannot leave a channel the
  gateway believes subscribed while the server does not know it. A channel
  that was already SENT or CONFIRMED there is marked ``catch_up``: the
  server may have come back empty, so once subscribed the gateway reads what
  it may have missed from the webapp.
* A ``sub`` that fails or times out is never dropped: its channels go to
  RETRY with exponential backoff (:data:`SUB_RETRY_INITIAL_S` doubling to
  :data:`SUB_RETRY_MAX_S`) and are sent again, for as long as the gateway
  wants them. Replies from a previous connection (an older ``epoch``) change
  nothing: :meth:`link_up` has already requeued their channels; a reply settles
  only the channels its own batch sent.
* A channel whose owner the ring does not name yet waits with no owner and is
  placed by :meth:`ring_changed`.
* :meth:`audit` lists the CONFIRMED channels of a server for the periodic
  reconciliation; :meth:`reconciled` requeues those the server says it does
  not hold for this gateway.

Unsubscribes are batched per server the same way; they are best effort (a
server forgets a gateway's subscriptions when its connection closes, and a
gateway ignores events for channels it no longer watches).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

# A failed sub is retried after 0.2 s, then 0.4, 0.8 ... up to 5 s between tries,
# for as long as a local socket watches the channel. Short at first (a ring
# change or a reconnect race resolves within a few hundred ms), capped so a
# server that is down for long is not hammered.
SUB_RETRY_INITIAL_S = 0.2
SUB_RETRY_MAX_S = 5.0
# Channels in one sub request: a gateway with 100k channels at one server sends
# them in batches, so one request never approaches the wire's frame limit.
MAX_SUB_BATCH_CHANNELS = 5000


class Phase(enum.Enum):
    PENDING = "pending"  # to be sent in the next batch
    SENT = "sent"  # in a sub request not answered yet
    RETRY = "retry"  # a sub failed; sent again at retry_at
    CONFIRMED = "confirmed"  # the server answered the sub and holds it


@dataclass(slots=True)
class Subscription:
    owner: str | None
    phase: Phase = Phase.PENDING
    batch: int = 0  # the number of the batch that last SENT it
    attempts: int = 0  # failed subs in a row
    retry_at: float = 0.0
    catch_up: bool = False  # once subscribed, read from the webapp what the owner may not hold


@dataclass
class Batch:
    """One round of requests to one server, on the link of ``epoch``."""

    owner: str
    epoch: int
    number: int = 0  # unique per gateway: a reply settles only the channels this very batch sent
    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


def _discard(index: dict[str | None, set[str]] | dict[str, set[str]], key: str | None, channel: str) -> None:
    held = index.get(key)  # type: ignore[arg-type]
    if held is not None:
        held.discard(channel)
        if not held:
            del index[key]  # type: ignore[arg-type]


def retry_delay_s(attempts: int) -> float:
    """Backoff before retry number ``attempts`` (1 = the first retry)."""
    return min(SUB_RETRY_MAX_S, SUB_RETRY_INITIAL_S * 2.0 ** max(0, attempts - 1))


class Subscriptions:
    """The gateway's channel subscriptions at Channel Servers (see the module docstring)."""

    def __init__(self, owner_for: Callable[[str], str | None], max_batch: int = MAX_SUB_BATCH_CHANNELS) -> None:
        self.owner_for = owner_for
        self.max_batch = max_batch
        self.channels: dict[str, Subscription] = {}
        self.by_owner: dict[str | None, set[str]] = {}
        self.unsubs: dict[str, set[str]] = {}
        # Indexes, so a flush costs what it sends, not the owner's whole channel set:
        self.pending: dict[str, set[str]] = {}  # owner -> its PENDING channels
        self.retrying: dict[str, set[str]] = {}  # owner -> its RETRY channels
        self.epochs: dict[str, int] = {}  # owner -> its link's connect count
        self.up: set[str] = set()  # owners whose link is connected
        self.batches = 0

    # -- what the gateway wants ---------------------------------------------------------
    def want(self, channel: str, catch_up: bool = False) -> str | None:
        """A local socket watches ``channel``: subscribe it at its owner. Returns the owner
        to flush (None: no owner on the ring yet, it waits for :meth:`ring_changed`)."""
        sub = self.channels.get(channel)
        if sub is None:
            sub = self.channels[channel] = Subscription(owner=None)
            self.by_owner.setdefault(None, set()).add(channel)
        return self._place(channel, sub, self.owner_for(channel), catch_up)

    def drop(self, channel: str) -> str | None:
        """No local socket watches ``channel`` any more. Returns the owner to flush, if any."""
        sub = self.channels.pop(channel, None)
        if sub is None:
            return None
        self._unindex(channel, sub)
        if sub.owner is not None and sub.phase is not Phase.PENDING:
            self.unsubs.setdefault(sub.owner, set()).add(channel)
            return sub.owner
        return None

    def resubscribe(self, channels: list[str]) -> set[str]:
        """Channels a server refused or moved away (after the ring was re-read): place each at
        its owner now, with a catch-up. Returns the owners to flush."""
        owners = set()
        for channel in channels:
            sub = self.channels.get(channel)
            if sub is not None:
                owner = self._place(channel, sub, self.owner_for(channel), True, force=True)
                if owner is not None:
                    owners.add(owner)
        return owners

    def ring_changed(self) -> tuple[list[str], set[str]]:
        """The ring changed: every channel whose owner differs moves there with a catch-up
        (the new owner may not hold what the old one had). Returns (moved channels, owners to flush)."""
        moved = []
        owners = set()
        for channel, sub in self.channels.items():
            owner = self.owner_for(channel)
            if owner != sub.owner:
                moved.append(channel)
        for channel in moved:
            owner = self._place(channel, self.channels[channel], self.owner_for(channel), True)
            if owner is not None:
                owners.add(owner)
        return moved, owners

    def _place(
        self, channel: str, sub: Subscription, owner: str | None, catch_up: bool, force: bool = False
    ) -> str | None:
        if owner != sub.owner:
            self._unindex(channel, sub)
            sub.owner = owner
            sub.phase = Phase.SENT  # placeholder outside the indexes; set to PENDING below
            self.by_owner.setdefault(owner, set()).add(channel)
            force = True
        if catch_up:
            sub.catch_up = True
        if owner is None:
            sub.phase = Phase.PENDING  # waits unindexed for a ring that names an owner
            return None
        self.unsubs.get(owner, set()).discard(channel)
        if force or sub.phase is Phase.PENDING:
            self._set(channel, sub, Phase.PENDING)
            sub.attempts = 0
            return owner
        return None  # already sent or held there: nothing new to send

    def _set(self, channel: str, sub: Subscription, phase: Phase) -> None:
        """Move ``sub`` to ``phase``, keeping the pending and retry indexes right."""
        if sub.owner is not None:
            if sub.phase is Phase.PENDING:
                _discard(self.pending, sub.owner, channel)
            elif sub.phase is Phase.RETRY:
                _discard(self.retrying, sub.owner, channel)
            if phase is Phase.PENDING:
                self.pending.setdefault(sub.owner, set()).add(channel)
            elif phase is Phase.RETRY:
                self.retrying.setdefault(sub.owner, set()).add(channel)
        sub.phase = phase

    def _unindex(self, channel: str, sub: Subscription) -> None:
        """Take ``channel`` out of every index of its current owner."""
        if sub.owner is not None:
            _discard(self.pending, sub.owner, channel)
            _discard(self.retrying, sub.owner, channel)
        _discard(self.by_owner, sub.owner, channel)

    # -- links -------------------------------------------------------------------------------
    def link_up(self, owner: str) -> int:
        """The link to ``owner`` (re)connected: everything it should carry is sent again.
        Returns the new epoch; replies from older epochs are ignored."""
        epoch = self.epochs[owner] = self.epochs.get(owner, 0) + 1
        self.up.add(owner)
        self.unsubs.pop(owner, None)  # a new connection holds no subscriptions of ours
        for channel in self.by_owner.get(owner, ()):
            sub = self.channels[channel]
            if sub.phase is not Phase.PENDING:
                sub.catch_up = True  # sent before: the server may have restarted empty
            self._set(channel, sub, Phase.PENDING)
            sub.attempts = 0
        return epoch

    def link_down(self, owner: str) -> None:
        """The link to ``owner`` dropped: hold its batches until :meth:`link_up`."""
        self.up.discard(owner)

    def epoch(self, owner: str) -> int:
        return self.epochs.get(owner, 0)

    # -- batches -------------------------------------------------------------------------------
    def take(self, owner: str, now: float) -> Batch | None:
        """The next batch for ``owner``: its PENDING channels and the RETRY ones that are due,
        at most ``max_batch`` subscribes, all marked SENT. None when its link is down or nothing is due."""
        if owner not in self.up:
            return None
        epoch = self.epochs.get(owner, 0)
        self.batches += 1
        batch = Batch(owner, epoch, self.batches, unsubscribe=sorted(self.unsubs.pop(owner, ())))
        due = [ch for ch in self.retrying.get(owner, ()) if self.channels[ch].retry_at <= now]
        for source in (due, self.pending.get(owner, ())):
            for channel in source:
                if len(batch.subscribe) >= self.max_batch:
                    break
                batch.subscribe.append(channel)
        batch.subscribe.sort()
        for channel in batch.subscribe:
            sub = self.channels[channel]
            self._set(channel, sub, Phase.SENT)
            sub.batch = batch.number
        return batch if batch else None

    def has_due(self, owner: str, now: float) -> bool:
        """Whether :meth:`take` would return a batch for ``owner`` now."""
        if owner not in self.up:
            return False
        if self.unsubs.get(owner) or self.pending.get(owner):
            return True
        return any(self.channels[ch].retry_at <= now for ch in self.retrying.get(owner, ()))

    def next_retry_at(self, owner: str) -> float | None:
        """When the earliest RETRY channel of ``owner`` is due (None: none waits)."""
        due = [self.channels[ch].retry_at for ch in self.retrying.get(owner, ())]
        return min(due) if due else None

    def confirmed(self, batch: Batch, refused: list[str]) -> list[str]:
        """The server answered ``batch``'s sub. Returns the channels now held there that owe
        a catch-up (their flag is cleared). ``refused`` stay SENT until :meth:`resubscribe`."""
        catch_ups = []
        refused_set = set(refused)
        for channel in batch.subscribe:
            sub = self._sent_in(batch, channel)
            if sub is None or channel in refused_set:
                continue
            self._set(channel, sub, Phase.CONFIRMED)
            sub.attempts = 0
            if sub.catch_up:
                sub.catch_up = False
                catch_ups.append(channel)
        return catch_ups

    def failed(self, batch: Batch, now: float) -> list[str]:
        """``batch``'s sub failed or timed out: its channels wait and are sent again.
        Returns the channels requeued (those still SENT in this batch's epoch)."""
        requeued = []
        for channel in batch.subscribe:
            sub = self._sent_in(batch, channel)
            if sub is None:
                continue
            sub.attempts += 1
            self._set(channel, sub, Phase.RETRY)
            sub.retry_at = now + retry_delay_s(sub.attempts)
            sub.catch_up = True  # the server may have applied it and replayed into a broken reply
            requeued.append(channel)
        return requeued

    def _sent_in(self, batch: Batch, channel: str) -> Subscription | None:
        sub = self.channels.get(channel)
        if sub is None or sub.owner != batch.owner or sub.phase is not Phase.SENT or sub.batch != batch.number:
            return None  # dropped, moved, requeued by a reconnect, or sent again since
        return sub

    # -- reconciliation -----------------------------------------------------------------------------
    def audit(self, owner: str) -> tuple[int, list[str]]:
        """(epoch, the CONFIRMED channels at ``owner``): what the reconciliation asks it about."""
        return self.epochs.get(owner, 0), sorted(
            ch for ch in self.by_owner.get(owner, ()) if self.channels[ch].phase is Phase.CONFIRMED
        )

    def reconciled(self, owner: str, epoch: int, missing: list[str]) -> list[str]:
        """``owner`` says it does not hold ``missing`` for us: those still CONFIRMED there in
        ``epoch`` are requeued with a catch-up. Returns them."""
        if epoch != self.epochs.get(owner, 0):
            return []
        repaired = []
        for channel in missing:
            sub = self.channels.get(channel)
            if sub is not None and sub.owner == owner and sub.phase is Phase.CONFIRMED:
                self._set(channel, sub, Phase.PENDING)
                sub.catch_up = True
                repaired.append(channel)
        return repaired

    # -- reading ---------------------------------------------------------------------------------
    def owner_of(self, channel: str) -> str | None:
        sub = self.channels.get(channel)
        return None if sub is None else sub.owner

    def count(self, phase: Phase) -> int:
        return sum(1 for sub in self.channels.values() if sub.phase is phase)

    def owners(self) -> list[str]:
        return [owner for owner in self.by_owner if owner is not None]
