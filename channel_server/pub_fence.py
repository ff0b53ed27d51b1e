"""Per connection: the channels whose publish was refused, held until that publish comes back.

Sans-I/O. The problem it closes (docs/wire.md, "Publishes refused mid-stream"): an
admin server pipelines ``pub`` 5 and ``pub`` 6 of a channel on one connection. A
channel server that starts owning the channel's slot between the two refuses 5
(``not_owner``: it has not read the new ring yet) and applies 6; the admin server's
retry of 5 then finds ``5 <= last_seq`` and is dropped as a duplicate. Event 5 is
never fanned out here, never in this server's history, and the webapp is told it
was delivered (gateways that saw 6 after 4 fill 5 from the webapp's history: a
read per gateway, and every later ``sub since=4`` finds history without it).

The rule: after this server refuses ``pub`` seq *r* of channel *c* on a connection,
it applies *c*'s publishes from that connection only in seq order until it has
applied *r*: a ``pub`` whose seq is above both the lowest refused seq and the next
seq after the highest applied here (seqs are per channel and gapless: the webapp
allocates them) is refused ``not_owner`` too, and the admin server retries it
behind the refused one (its slow lane sends them in order: admin_server/slow_lane.py).
Once this server has applied the highest seq it refused (the admin server's retry,
or the same event by another connection), the fence lifts. Publishes at or below
the lowest refused seq pass (an earlier one still in flight; a resend is dropped as
a duplicate as before). Transient events (no seq) are never held. So a channel's
events are applied here in seq order even across a refusal, and none is taken for
a duplicate of a later one.

Only a refusal because this server is *behind* the sender (the publish carries a
newer ring version than this server has read: it is about to own the slot) starts a
fence. A refusal because the channel is another server's in a ring at least as new as
the sender's does not: that publish's retry goes to the other server and never comes
back here, so a fence would never lift, and if the slot later returned here, every
later publish of the channel on this connection would be refused for good.

Bounded: at most :data:`MAX_FENCED_CHANNELS_PER_CONNECTION` channels per connection;
beyond, the oldest is forgotten (counted: ``rtm_cs_pub_fence_evictions_total``), and
for that channel the gateways' gap fill from the webapp is the backstop again. And in
time: a fence lifts :data:`PUB_FENCE_HOLD_S` after its last refusal whatever happened
(its refused publish resent through another admin server to a later owner, ring changes
this server never saw as a loss of the slot), so no channel is held for good.
"""

from __future__ import annotations

from collections import OrderedDict

# Channels one connection may have refused publishes for at once. A refusal happens while
# a slot changes owner; one slot holds about 1/N of the channels, and only those published
# to during the moment of the change get an entry. ~100 bytes each: a few MiB at most.
MAX_FENCED_CHANNELS_PER_CONNECTION = 65_536
# Long enough for the admin server's slow lane to re-read the ring and retry the refused
# publish (its route budget is 10 s: admin_server/app.py); a fence older than that is stale.
PUB_FENCE_HOLD_S = 30.0


class PubFence:
    """The refused seqs of one connection, per channel: the lowest and the highest not yet
    applied, and until when the fence holds at most."""

    __slots__ = ("max_channels", "hold_s", "refused", "evictions")

    def __init__(
        self, max_channels: int = MAX_FENCED_CHANNELS_PER_CONNECTION, hold_s: float = PUB_FENCE_HOLD_S
    ) -> None:
        self.max_channels = max_channels
        self.hold_s = hold_s
        # channel -> (lowest, highest, until), oldest first
        self.refused: OrderedDict[str, tuple[int, int, float]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.refused)

    def holds(self, channel: str, seq: int | None, applied: int, now_s: float) -> bool:
        """Whether ``pub`` ``seq`` of ``channel`` must be refused because an earlier one was
        (``applied``: the highest seq of the channel applied here, -1 if none). Applying the
        highest refused seq lifts the fence, and so does its expiry."""
        if seq is None:
            return False
        entry = self.refused.get(channel)
        if entry is None:
            return False
        lowest, highest, until = entry
        if applied >= highest or now_s >= until:
            del self.refused[channel]
            return False
        return seq > max(lowest, applied + 1)

    def refuse(self, channel: str, seq: int | None, now_s: float) -> None:
        """This connection's ``pub`` ``seq`` of ``channel`` was refused: hold the later ones."""
        if seq is None:
            return
        until = now_s + self.hold_s
        entry = self.refused.get(channel)
        if entry is not None:
            self.refused[channel] = (min(entry[0], seq), max(entry[1], seq), until)
            return
        if len(self.refused) >= self.max_channels:
            self.refused.popitem(last=False)
            self.evictions += 1
        self.refused[channel] = (seq, seq, until)

    def forget(self, channels: set[str]) -> None:
        """The ring moved ``channels`` away: nothing of theirs is applied here any more."""
        for channel in [c for c in self.refused if c in channels]:
            del self.refused[channel]
