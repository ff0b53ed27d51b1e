"""The channels whose publish this admin server gave up on, and the later publishes held for them.

Sans-I/O (the caller passes the time). The problem it closes (docs/wire.md,
"Publishes refused mid-stream"): a publish that exhausts its route budget is
answered ``unavailable``, and the webapp resends it, in order, from the oldest
event it has not had acknowledged. But later publishes of the same channel may
reach the channel server first: those waiting behind it in its slot's slow lane
(their own budgets have not run out yet; :mod:`admin_server.slow_lane` fails them
with it), and those the webapp had already pipelined behind it, which arrive
after the give-up. Applied before it, they make the resend a duplicate
(``seq <= last``) at the channel server, which never fans it out.

The rule: once this admin server gives up publish seq *r* of channel *c*, it
answers every later publish of *c* with a seq above *r* ``unavailable`` at once,
so the webapp resends them after *r*, in order, until a publish of *c* with a seq
at or below *r* arrives (the webapp's resend: it starts at the oldest event not
acknowledged, which is *r* or earlier), or :data:`GIVEN_UP_HOLD_S` has passed (the
resend went to another admin server; holding longer would only delay the channel).
At most :data:`MAX_GIVEN_UP_CHANNELS` channels are held; beyond, the oldest is
forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

# Long enough for the webapp to see the unavailable, back off and resend (its backoff is
# capped at a few seconds: webapp_stub/handoff.py); short enough that a resend that went
# to another admin server does not hold this one's later publishes of the channel for long.
GIVEN_UP_HOLD_S = 30.0
MAX_GIVEN_UP_CHANNELS = 65_536


class GivenUpChannels:
    """Channel -> (the lowest seq given up, until when later publishes are held)."""

    __slots__ = ("hold_s", "max_channels", "held")

    def __init__(self, hold_s: float = GIVEN_UP_HOLD_S, max_channels: int = MAX_GIVEN_UP_CHANNELS) -> None:
        self.hold_s = hold_s
        self.max_channels = max_channels
        self.held: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.held)

    def give_up(self, channel: str, seq: int | None, now_s: float) -> None:
        """Publish ``seq`` of ``channel`` was answered ``unavailable``: hold the later ones."""
        if seq is None:
            return
        entry = self.held.pop(channel, None)
        lowest = seq if entry is None else min(entry[0], seq)
        while len(self.held) >= self.max_channels:
            self.held.popitem(last=False)
        self.held[channel] = (lowest, now_s + self.hold_s)

    def holds(self, channel: str, seq: int | None, now_s: float) -> bool:
        """Whether publish ``seq`` of ``channel`` must be answered ``unavailable`` now. A publish at
        or below the given-up seq (the resend) lifts the hold, and so does its expiry."""
        if seq is None or not self.held:
            return False
        entry = self.held.get(channel)
        if entry is None:
            return False
        lowest, until = entry
        if seq <= lowest or now_s >= until:
            del self.held[channel]
            return False
        return True
