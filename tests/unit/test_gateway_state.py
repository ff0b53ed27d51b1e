"""Unit tests for gateway.state: per-channel cursors, gaps, per-session floors and holds."""

from __future__ import annotations

import json

import pytest

from gateway.state import LIVE_ONLY, Effects, Fetch, GatewayState, Session, text_frame
from tests.support import FakeClock, Socket, unframe


def ev(channel: str, seq: int | None, **extra: object) -> bytes:
    return json.dumps({"ch": channel, "seq": seq, **extra}, separators=(",", ":")).encode()


def history(channel: str, first: int, last: int) -> list[tuple[int, bytes]]:
    return [(seq, ev(channel, seq)) for seq in range(first, last + 1)]


_sids = iter(range(1, 1_000_000))


def session(user: str = "U1", team: str = "T1", sock: Socket | None = None) -> tuple[Session, Socket]:
    sock = sock or Socket()
    return Session(sid=next(_sids), user=user, team=team, write=sock.write), sock


def deliver(state: GatewayState, channel: str, *seqs: int) -> list[Fetch | None]:
    return [state.deliver(channel, seq, ev(channel, seq)) for seq in seqs]


# -- framing -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 70000])
def test_text_frame_round_trip(size: int) -> None:
    payload = b"x" * size
    assert unframe(text_frame(payload)) == payload


# -- attach / detach -----------------------------------------------------------------


def test_attach_subscribes_with_bootstrap_seq() -> None:
    state = GatewayState()
    s1, _ = session()
    effects = state.attach(s1, [("C1", 5), ("U1", 0), ("T1", 12)])
    assert effects.subscribe == [("C1", 5), ("U1", 0), ("T1", 12)]
    assert effects.unsubscribe == [] and effects.fetch == []
    assert bool(effects)
    assert state.cursor == {"C1": 5, "U1": 0, "T1": 12}
    assert s1.channels == {"C1", "U1", "T1"}
    assert state.sessions == {s1.sid: s1}
    assert state.users == {"U1": {s1}}


def test_attach_to_a_channel_at_the_cursor_needs_nothing() -> None:
    state = GatewayState()
    s1, _ = session()
    s2, _ = session(user="U2")
    state.attach(s1, [("C1", 5)])
    effects = state.attach(s2, [("C1", 5)])
    assert not effects
    assert s2.floor == {} and s2.hold == {}
    assert state.channels["C1"] == {s1, s2}


def test_attach_with_a_repeated_channel_subscribes_once() -> None:
    state = GatewayState()
    s1, _ = session()
    assert state.attach(s1, [("C1", 1), ("C1", 1)]).subscribe == [("C1", 1)]


def test_detach_of_the_last_session_unsubscribes() -> None:
    state = GatewayState()
    s1, _ = session()
    s2, _ = session(user="U2")
    state.attach(s1, [("C1", 0), ("C2", 0)])
    state.attach(s2, [("C1", 0)])
    effects = state.detach(s1)
    assert effects.unsubscribe == ["C2"]
    assert effects.subscribe == [] and effects.fetch == []
    assert set(state.channels) == {"C1"}
    assert "C2" not in state.cursor
    assert "U1" not in state.users
    effects = state.detach(s2)
    assert effects.unsubscribe == ["C1"]
    assert state.channels == {} and state.cursor == {} and state.sessions == {} and state.users == {}


def test_detach_twice_is_a_no_op() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 0)])
    state.detach(s1)
    assert not state.detach(s1)


def test_detach_drops_an_open_gap() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 0)])
    assert deliver(state, "C1", 3) == [Fetch("C1", 0, 2)]
    state.detach(s1)
    assert state.gaps == {}
    assert state.fill("C1", history("C1", 1, 2)) is None  # a late fill does nothing
    assert sock.frames == []


# -- delivery order --------------------------------------------------------------------


def test_deliver_in_order_to_every_session() -> None:
    state = GatewayState()
    s1, sock1 = session()
    s2, sock2 = session(user="U2")
    state.attach(s1, [("C1", 2)])
    state.attach(s2, [("C1", 2)])
    assert deliver(state, "C1", 3, 4, 5) == [None, None, None]
    assert sock1.seqs() == [3, 4, 5]
    assert sock2.seqs() == [3, 4, 5]
    assert state.cursor["C1"] == 5
    assert state.stats.delivered == 6
    # The same bytes go to every socket.
    assert sock1.frames == sock2.frames == [text_frame(ev("C1", n)) for n in (3, 4, 5)]


def test_event_for_an_unwatched_channel_is_ignored() -> None:
    state = GatewayState()
    assert state.deliver("C9", 1, ev("C9", 1)) is None
    assert state.cursor == {}


def test_duplicate_is_dropped() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 2)])
    deliver(state, "C1", 3, 4)
    assert deliver(state, "C1", 4, 3, 2, 1) == [None] * 4
    assert sock.seqs() == [3, 4]
    assert state.stats.duplicates == 4
    assert state.cursor["C1"] == 4


def test_live_only_cursor_takes_the_first_seq() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", LIVE_ONLY)])
    assert deliver(state, "C1", 40, 41) == [None, None]
    assert sock.seqs() == [40, 41]
    assert state.expect("C1", 100) is not None


def test_transient_events_are_delivered_without_cursor_changes() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 2)])
    assert state.deliver("C1", None, ev("C1", None, type="user_typing")) is None
    assert state.cursor["C1"] == 2
    assert sock.seqs() == [None]
    deliver(state, "C1", 3)
    assert sock.seqs() == [None, 3]
    assert state.stats.duplicates == 0 and state.stats.gaps == 0


def test_transient_events_pass_an_open_gap() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 2)  # gap: 1 missing
    state.deliver("C1", None, ev("C1", None))
    assert sock.seqs() == [None]
    assert state.gaps["C1"] == [(2, ev("C1", 2))]


# -- gaps ----------------------------------------------------------------------------


def test_gap_opens_a_fetch_holds_later_events_and_fill_delivers_in_order_once() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 2)])
    deliver(state, "C1", 3)
    fetches = deliver(state, "C1", 6, 7, 5, 9, 8)
    assert fetches == [Fetch("C1", 3, 5), None, None, None, None]
    assert fetches[0].session is None
    assert state.stats.gaps == 1
    assert sock.seqs() == [3]  # everything after the hole is held
    assert state.cursor["C1"] == 3
    assert state.fill("C1", history("C1", 4, 5)) is None
    assert sock.seqs() == [3, 4, 5, 6, 7, 8, 9]
    assert state.cursor["C1"] == 9
    assert state.gaps == {}
    deliver(state, "C1", 9, 10)
    assert sock.seqs() == [3, 4, 5, 6, 7, 8, 9, 10]


def test_fill_that_overlaps_what_was_delivered_delivers_nothing_twice() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 2, 5)
    assert state.fill("C1", history("C1", 1, 5)) is None
    assert sock.seqs() == [1, 2, 3, 4, 5]


def test_fill_that_does_not_close_the_gap_fetches_again() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 10, 11)
    assert state.gaps["C1"] == [(10, ev("C1", 10)), (11, ev("C1", 11))]
    # History with a hole in it (5 and 6 missing): deliver up to the hole, fetch the hole.
    again = state.fill("C1", history("C1", 2, 4) + history("C1", 7, 9))
    assert again == Fetch("C1", 4, 6)
    assert sock.seqs() == [1, 2, 3, 4]
    deliver(state, "C1", 12)  # still held behind the remaining hole
    assert sock.seqs() == [1, 2, 3, 4]
    assert state.fill("C1", history("C1", 5, 6)) is None
    assert sock.seqs() == list(range(1, 13))


def test_fill_without_a_gap_is_ignored() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 0)])
    assert state.fill("C1", history("C1", 1, 3)) is None
    assert sock.frames == []
    assert state.cursor["C1"] == 0


def test_expect_opens_a_gap_when_behind() -> None:
    state = GatewayState()
    s1, sock = session()
    state.attach(s1, [("C1", 3)])
    assert state.expect("C1", 3) is None
    assert state.expect("C1", 2) is None
    assert state.expect("C9", 10) is None  # not watched here
    fetch = state.expect("C1", 6)
    assert fetch == Fetch("C1", 3, 6)
    assert state.expect("C1", 8) is None  # one gap at a time
    deliver(state, "C1", 7)  # held behind the gap
    assert sock.frames == []
    assert state.fill("C1", history("C1", 4, 6)) is None
    assert sock.seqs() == [4, 5, 6, 7]


# -- a second session behind the cursor -------------------------------------------------


def test_session_behind_the_cursor_is_held_until_fill_session() -> None:
    state = GatewayState()
    s1, sock1 = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 2, 3, 4, 5)
    s2, sock2 = session(user="U2")
    effects = state.attach(s2, [("C1", 2)])
    assert effects.subscribe == []
    assert effects.fetch == [Fetch("C1", 2, 5, s2)]
    deliver(state, "C1", 6, 7)
    assert sock1.seqs() == [1, 2, 3, 4, 5, 6, 7]
    assert sock2.frames == []  # held
    state.fill_session(s2, "C1", history("C1", 3, 5))
    assert sock2.seqs() == [3, 4, 5, 6, 7]
    assert s2.hold == {}
    assert state.uneven == {}  # level again: back on the fan-out's fast path
    deliver(state, "C1", 8)
    assert sock1.seqs() == list(range(1, 9))
    assert sock2.seqs() == [3, 4, 5, 6, 7, 8]


def test_fill_session_with_overlap_sends_each_seq_once() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 4)])
    deliver(state, "C1", 5)
    s2, sock2 = session(user="U2")
    (fetch,) = state.attach(s2, [("C1", 3)]).fetch
    deliver(state, "C1", 6)
    state.fill_session(s2, "C1", history("C1", 4, 6))
    assert sock2.seqs() == [4, 5, 6]


def test_held_session_only_holds_that_channel() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 5), ("C2", 0)])
    s2, sock2 = session(user="U2")
    state.attach(s2, [("C1", 3), ("C2", 0)])
    deliver(state, "C2", 1)
    deliver(state, "C1", 6)
    assert sock2.seqs() == [1]
    state.fill_session(s2, "C1", history("C1", 4, 5))
    assert sock2.events == [{"ch": "C2", "seq": 1}] + [{"ch": "C1", "seq": n} for n in (4, 5, 6)]


def test_held_events_keep_large_payloads_intact() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 1)])
    s2, sock2 = session(user="U2")
    state.attach(s2, [("C1", 0)])
    big = [ev("C1", 2, pad="a" * 200), ev("C1", 3, pad="b" * 70_000)]
    state.deliver("C1", 2, big[0])
    state.deliver("C1", 3, big[1])
    state.fill_session(s2, "C1", [(1, ev("C1", 1))])
    assert [unframe(f) for f in sock2.frames] == [ev("C1", 1)] + big


def test_fill_session_after_detach_does_nothing() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 5)])
    s2, sock2 = session(user="U2")
    state.attach(s2, [("C1", 1)])
    state.detach(s2)
    state.fill_session(s2, "C1", history("C1", 2, 5))
    assert sock2.frames == []


# -- a second session ahead of the cursor -----------------------------------------------


def test_session_ahead_of_the_cursor_skips_up_to_its_bootstrap() -> None:
    state = GatewayState()
    s1, sock1 = session()
    state.attach(s1, [("C1", 2)])
    s2, sock2 = session(user="U2")
    effects = state.attach(s2, [("C1", 5)])
    assert not effects
    assert s2.floor == {"C1": 5}
    deliver(state, "C1", 3, 4, 5, 6, 7)
    assert sock1.seqs() == [3, 4, 5, 6, 7]
    assert sock2.seqs() == [6, 7]
    assert s2.floor == {}
    assert state.uneven == {}


def test_floor_holds_across_a_gap_fill() -> None:
    state = GatewayState()
    s1, sock1 = session()
    state.attach(s1, [("C1", 2)])
    s2, sock2 = session(user="U2")
    state.attach(s2, [("C1", 4)])
    assert deliver(state, "C1", 6) == [Fetch("C1", 2, 5)]
    state.fill("C1", history("C1", 3, 5))
    assert sock1.seqs() == [3, 4, 5, 6]
    assert sock2.seqs() == [5, 6]


def test_uneven_sessions_are_tracked_per_channel_until_level_or_gone() -> None:
    state = GatewayState()
    s1, _ = session()
    state.attach(s1, [("C1", 5), ("C2", 5)])
    behind, _ = session(user="U2")
    ahead, _ = session(user="U3")
    state.attach(behind, [("C1", 3)])
    state.attach(ahead, [("C1", 7), ("C2", 9)])
    assert state.uneven == {"C1": {behind, ahead}, "C2": {ahead}}
    state.leave("U3", "C2")
    assert state.uneven == {"C1": {behind, ahead}}
    state.detach(behind)  # gone while held
    assert state.uneven == {"C1": {ahead}}
    deliver(state, "C1", 6, 7)
    assert state.uneven == {"C1": {ahead}}  # seq 7 is still at its floor
    deliver(state, "C1", 8)
    assert state.uneven == {}
    assert ahead.floor == {}


# -- join / leave ---------------------------------------------------------------------


def test_join_subscribes_every_session_of_the_user() -> None:
    state = GatewayState()
    a1, sock_a1 = session(user="U1")
    a2, sock_a2 = session(user="U1")
    b1, sock_b1 = session(user="U2")
    for s in (a1, a2, b1):
        state.attach(s, [("T1", 0)])
    effects = state.join("U1", "C9", 12)
    assert effects.subscribe == [("C9", 12)]  # once for the gateway
    assert effects.fetch == []
    assert state.channels["C9"] == {a1, a2}
    assert "C9" not in b1.channels
    deliver(state, "C9", 13)
    assert sock_a1.seqs() == sock_a2.seqs() == [13]
    assert sock_b1.frames == []
    assert not state.join("U1", "C9", 13)  # already there
    assert not state.join("U-nobody", "C9", 13)


def test_leave_unsubscribes_when_no_one_is_left() -> None:
    state = GatewayState()
    a1, sock_a1 = session(user="U1")
    a2, _ = session(user="U1")
    b1, sock_b1 = session(user="U2")
    state.attach(a1, [("C1", 0)])
    state.attach(a2, [("C1", 0)])
    state.attach(b1, [("C1", 0)])
    assert not state.leave("U1", "C1")  # U2 still watches C1
    assert state.channels["C1"] == {b1}
    assert a1.channels == set() and a2.channels == set()
    deliver(state, "C1", 1)
    assert sock_a1.frames == []
    assert sock_b1.seqs() == [1]
    assert state.leave("U2", "C1").unsubscribe == ["C1"]
    assert "C1" not in state.cursor
    assert not state.leave("U2", "C1")


def test_leave_a_channel_the_user_never_joined() -> None:
    state = GatewayState()
    a1, _ = session(user="U1")
    b1, _ = session(user="U2")
    state.attach(a1, [("C1", 0)])
    state.attach(b1, [("C2", 0)])
    assert not state.leave("U2", "C1")
    assert state.channels["C1"] == {a1}


def test_join_behind_the_cursor_fetches_for_that_session() -> None:
    state = GatewayState()
    b1, _ = session(user="U2")
    state.attach(b1, [("C1", 7)])
    a1, sock = session(user="U1")
    state.attach(a1, [("T1", 0)])
    effects = state.join("U1", "C1", 5)
    assert effects.fetch == [Fetch("C1", 5, 7, a1)]
    state.fill_session(a1, "C1", history("C1", 6, 7))
    assert sock.seqs() == [6, 7]


# -- failing sockets -----------------------------------------------------------------


def test_failed_write_is_counted_and_others_still_get_the_event() -> None:
    state = GatewayState()
    s1, sock1 = session()
    s2, _ = session(user="U2", sock=Socket(alive=False))
    state.attach(s1, [("C1", 0)])
    state.attach(s2, [("C1", 0)])
    deliver(state, "C1", 1)
    assert sock1.seqs() == [1]
    assert state.stats.delivered == 1
    assert state.stats.dropped_sessions == 1
    assert state.cursor["C1"] == 1


def test_effects_truthiness() -> None:
    assert not Effects()
    assert Effects(unsubscribe=["C1"])
    assert Effects(fetch=[Fetch("C1", 0, 1)])


# -- transient events that skip their sender ------------------------------------------------


def test_transient_event_skips_the_sending_users_sessions_only() -> None:
    state = GatewayState()
    a1, a1_sock = session(user="UA")
    a2, a2_sock = session(user="UA")
    b1, b1_sock = session(user="UB")
    for s in (a1, a2, b1):
        state.attach(s, [("C1", 0)])
    typing = ev("C1", None, type="user_typing", user="UA")
    assert state.deliver("C1", None, typing, exclude_user="UA") is None
    assert a1_sock.frames == [] and a2_sock.frames == []  # none of the sender's connections
    assert b1_sock.events == [{"ch": "C1", "seq": None, "type": "user_typing", "user": "UA"}]
    assert state.stats.delivered == 1 and state.cursor["C1"] == 0


def test_exclude_user_does_not_touch_persisted_events() -> None:
    state = GatewayState()
    a1, a1_sock = session(user="UA")
    state.attach(a1, [("C1", 0)])
    state.deliver("C1", 1, ev("C1", 1), exclude_user="UA")  # ignored for events with a seq
    assert a1_sock.seqs() == [1]


# -- held events are bounded ---------------------------------------------------------------


def test_a_gap_holding_more_than_its_bound_is_reported_and_nothing_is_dropped_silently() -> None:
    state = GatewayState(max_held_per_channel=3)
    s1, sock = session()
    state.attach(s1, [("C1", 1)])
    assert deliver(state, "C1", 3)[0] == Fetch("C1", 1, 2)  # a gap: 3 is held
    deliver(state, "C1", 4, 5)
    assert state.take_overflows() == ([], [])  # 3 held: at the bound
    deliver(state, "C1", 6)
    assert state.take_overflows() == (["C1"], [])
    assert state.take_overflows() == ([], [])  # reported once
    assert sock.frames == []  # nothing skipped: the gateway ends the sessions instead (app.py)
    assert state.position(s1) == {"C1": 1}  # where a reconnect resumes


def test_a_held_session_past_its_bound_is_reported() -> None:
    state = GatewayState(max_held_per_session=2)
    s1, _ = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 2, 3)
    s2, sock2 = session(user="U2")
    state.attach(s2, [("C1", 1)])  # behind the cursor: held while (1, 3] is read
    deliver(state, "C1", 4, 5)
    assert state.take_overflows() == ([], [])
    deliver(state, "C1", 6)
    assert state.take_overflows() == ([], [s2])
    assert sock2.frames == []
    assert state.position(s2) == {"C1": 1}


def test_an_overflow_of_a_session_that_left_is_not_reported() -> None:
    state = GatewayState(max_held_per_session=1)
    s1, _ = session()
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 2)
    s2, _ = session(user="U2")
    state.attach(s2, [("C1", 0)])
    deliver(state, "C1", 3, 4)
    state.detach(s2)
    assert state.take_overflows() == ([], [])


def test_a_fill_that_leaves_a_hole_counts_what_it_holds_again() -> None:
    state = GatewayState(max_held_per_channel=2)
    s1, _ = session()
    state.attach(s1, [("C1", 1)])
    deliver(state, "C1", 9)
    assert state.fill("C1", history("C1", 2, 3) + history("C1", 5, 7)) == Fetch("C1", 3, 4)
    assert state.take_overflows() == (["C1"], [])  # 5, 6, 7, 9 held again: past 2


# -- a connection the fleet moved: joins and leaves replayed on resume (docs/design.md) ----------


def test_resumed_join_replayed_from_the_user_channel_starts_at_its_since() -> None:
    """Joined while away: the resumed bootstrap leaves the channel out and the user channel's
    replay joins it at the join's ``since``: the session gets every event after it, once."""
    state = GatewayState()
    other, _ = session(user="U2")
    state.attach(other, [("C5", 85)])
    deliver(state, "C5", 86, 87)
    moved, sock = session(user="U1")
    state.attach(moved, [("U1", 10)])  # the record's position in the user channel
    effects = state.join("U1", "C5", 85, at=11)  # channel_joined (U1 seq 11), replayed
    assert effects.fetch == [Fetch("C5", 85, 87, moved)]
    deliver(state, "C5", 88)
    state.fill_session(moved, "C5", history("C5", 86, 87))
    deliver(state, "C5", 89)
    assert sock.seqs() == [86, 87, 88, 89]


def test_a_join_already_reflected_in_a_sessions_bootstrap_is_not_replayed_to_it() -> None:
    state = GatewayState()
    fresh, _ = session(user="U1")
    state.attach(fresh, [("U1", 12), ("C5", 90)])  # its bootstrap came after the join (U1 seq 11)
    assert not state.join("U1", "C5", 85, at=11)
    assert not state.leave("U1", "C5", upto=95, at=11)  # an older leave: not this session's business
    assert fresh.channels == {"U1", "C5"}


def test_resumed_leave_delivers_up_to_the_leave_then_stops() -> None:
    """Left while away: the session follows the channel from the record; the replayed leave
    names the channel's seq of the leave; events up to it are delivered, none after."""
    state = GatewayState()
    moved, sock = session(user="U1")
    state.attach(moved, [("U1", 10), ("C7", 82)])
    effects = state.leave("U1", "C7", upto=87, at=11)  # the leave is replayed before C7 caught up
    assert not effects
    assert "C7" in moved.channels
    deliver(state, "C7", 83, 84, 85, 86, 87, 88)
    assert sock.seqs() == [83, 84, 85, 86, 87]
    assert state.settle().unsubscribe == ["C7"]
    assert "C7" not in moved.channels and state.uneven == {}
    deliver(state, "C7", 89)
    assert sock.seqs() == [83, 84, 85, 86, 87]


def test_leave_during_catch_up_delivers_the_catch_up_up_to_the_leave() -> None:
    """Left during the catch-up: the session is held in C8 (history in flight) when the leave
    arrives; the fetched events up to the leave are still delivered, then it stops."""
    state = GatewayState()
    other, _ = session(user="U2")
    state.attach(other, [("C8", 107)])
    deliver(state, "C8", 108)
    moved, sock = session(user="U1")
    effects = state.attach(moved, [("U1", 10), ("C8", 107)])
    assert effects.fetch == [Fetch("C8", 107, 108, moved)]
    deliver(state, "C8", 109, 110)  # held meanwhile
    assert not state.leave("U1", "C8", upto=109, at=11)
    state.fill_session(moved, "C8", history("C8", 108, 108))
    assert sock.seqs() == [108, 109]
    assert not state.settle()  # U2 still watches C8
    assert "C8" not in moved.channels and state.channels["C8"] == {other}
    deliver(state, "C8", 111)
    assert sock.seqs() == [108, 109]


def test_leave_already_reached_is_immediate() -> None:
    state = GatewayState()
    s1, sock = session(user="U1")
    state.attach(s1, [("C1", 0)])
    deliver(state, "C1", 1, 2, 3)
    assert state.leave("U1", "C1", upto=3).unsubscribe == ["C1"]
    assert s1.channels == set()


def test_rejoin_before_the_leave_was_reached_skips_only_what_happened_in_between() -> None:
    state = GatewayState()
    moved, sock = session(user="U1")
    state.attach(moved, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    state.join("U1", "C7", 9, at=12)  # back in at seq 9 (member_joined_channel)
    deliver(state, "C7", 6, 7, 8, 9, 10)
    assert not state.settle()
    assert sock.seqs() == [6, 7, 10]
    assert "C7" in moved.channels and state.uneven == {}


def test_a_pending_leave_moves_with_the_session() -> None:
    """Moved again before the leave was reached: the position carries the channel and where it ends."""
    state = GatewayState()
    moved, _ = session(user="U1")
    state.attach(moved, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    assert state.position(moved) == {"U1": 10, "C7": 5}
    assert state.pending_leaves(moved) == {"C7": 7}
    again, sock = session(user="U1")
    state2 = GatewayState()
    state2.attach(again, [("U1", 11), ("C7", 5)], until={"C7": 7})
    deliver(state2, "C7", 6, 7, 8)
    assert sock.seqs() == [6, 7]


# -- a leave whose ``upto`` never arrives is bounded (docs/hardening-gateway.md) ------------------


def test_a_pending_leave_takes_effect_after_its_time_bound() -> None:
    """The channel's event ``upto`` never reaches this gateway: after ``leave_timeout_s`` the
    session leaves anyway (unsubscribed, counted) and gets nothing of the channel after that."""
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=60.0)
    left, sock = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    assert not state.leave("U1", "C7", upto=7, at=11)
    assert "C7" in left.channels
    clock.advance(59.9)
    assert not state.expire_leaves()
    assert "C7" in left.channels and state.stats.forced_leaves == 0
    clock.advance(0.2)
    assert state.expire_leaves().unsubscribe == ["C7"]
    assert "C7" not in left.channels and left.until == {} and state.uneven == {}
    assert state.stats.forced_leaves == 1
    assert state.pending_leaves(left) == {} and "C7" not in state.position(left)
    deliver(state, "C7", 6, 7, 8)
    assert sock.seqs() == []
    assert not state.expire_leaves()


def test_a_forced_leave_keeps_the_channel_for_its_other_members() -> None:
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    other, other_sock = session(user="U2")
    state.attach(other, [("C7", 5)])
    left, sock = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=9, at=11)
    clock.advance(10.0)
    assert not state.expire_leaves()  # U2 still watches C7: nothing to unsubscribe
    assert state.stats.forced_leaves == 1
    deliver(state, "C7", 6)
    assert other_sock.seqs() == [6] and sock.seqs() == []


def test_a_leave_reached_in_time_is_not_forced_later() -> None:
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    other, _ = session(user="U2")
    state.attach(other, [("C7", 5)])
    left, sock = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=6, at=11)
    deliver(state, "C7", 6)
    state.settle()
    state.join("U1", "C7", 8, at=12)  # back in later, at seq 8
    clock.advance(11.0)
    assert not state.expire_leaves()
    assert state.stats.forced_leaves == 0 and "C7" in left.channels
    deliver(state, "C7", 7, 8, 9)
    assert sock.seqs() == [6, 9]


def test_a_rejoin_before_the_bound_cancels_the_forced_leave() -> None:
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    moved, sock = session(user="U1")
    state.attach(moved, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    state.join("U1", "C7", 9, at=12)
    clock.advance(30.0)
    assert not state.expire_leaves()
    assert "C7" in moved.channels and state.stats.forced_leaves == 0
    deliver(state, "C7", 6, 7, 8, 9, 10)
    assert sock.seqs() == [6, 7, 10]


def test_a_second_leave_restarts_the_bound() -> None:
    """Left, back in, left again: the bound counts from the latest leave, not the first."""
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    moved, _ = session(user="U1")
    state.attach(moved, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    clock.advance(6.0)
    state.join("U1", "C7", 9, at=12)
    state.leave("U1", "C7", upto=12, at=13)
    clock.advance(6.0)
    assert not state.expire_leaves() and "C7" in moved.channels
    clock.advance(4.0)
    state.expire_leaves()
    assert "C7" not in moved.channels and state.stats.forced_leaves == 1


def test_a_resumed_sessions_pending_leave_is_bounded_too() -> None:
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    again, sock = session(user="U1")
    state.attach(again, [("U1", 11), ("C7", 5)], until={"C7": 7})
    clock.advance(10.0)
    assert state.expire_leaves().unsubscribe == ["C7"]
    assert "C7" not in again.channels


def test_a_detached_session_has_nothing_to_force() -> None:
    clock = FakeClock()
    state = GatewayState(clock=clock, leave_timeout_s=10.0)
    left, _ = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    state.detach(left)
    clock.advance(10.0)
    assert not state.expire_leaves() and state.stats.forced_leaves == 0


def test_no_transient_event_reaches_a_session_after_its_leave() -> None:
    """Typing in a channel the user left never reaches them, even while the leave waits for ``upto``."""
    state = GatewayState()
    other, other_sock = session(user="U2")
    state.attach(other, [("C7", 5)])
    left, sock = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    state.leave("U1", "C7", upto=7, at=11)
    typing = ev("C7", None, type="user_typing", user="U3")
    state.deliver("C7", None, typing, exclude_user="U3")
    assert sock.frames == []
    assert other_sock.events == [{"ch": "C7", "seq": None, "type": "user_typing", "user": "U3"}]
    state.join("U1", "C7", 9, at=12)  # back in: typing reaches them again
    state.deliver("C7", None, typing, exclude_user="U3")
    assert len(sock.frames) == 1


def test_member_of_is_false_while_a_leave_is_pending() -> None:
    state = GatewayState()
    left, _ = session(user="U1")
    state.attach(left, [("U1", 10), ("C7", 5)])
    assert left.member_of("C7")
    state.leave("U1", "C7", upto=7, at=11)
    assert not left.member_of("C7") and "C7" in left.channels
    state.join("U1", "C7", 9, at=12)
    assert left.member_of("C7")


def test_pending_leave_deadlines_are_bounded_in_a_join_leave_storm() -> None:
    """A user toggling membership of a channel whose events lag: every leave waits for its upto
    and leaves a deadline; stale ones (the user came back) are dropped past MAX_PENDING_LEAVES,
    and when the pending ones themselves pass it, the oldest take effect at once (counted)."""
    state = GatewayState(clock=FakeClock(), leave_timeout_s=60.0, max_pending_leaves=8)
    toggler, _ = session(user="U1")
    state.attach(toggler, [("U1", 10), ("C7", 5)])
    at = 11
    for n in range(1000):  # leave at upto 7+n (not reached: C7 stands at 5), back in at once
        state.leave("U1", "C7", upto=7 + 2 * n, at=at)
        state.join("U1", "C7", 8 + 2 * n, at=at + 1)
        at += 2
        assert len(state.leave_deadlines) <= 8
    assert state.stats.forced_leaves == 0 and "C7" in toggler.channels  # only stale ones were dropped
    # many sessions with a leave pending each: past the bound the oldest are forced
    sessions = []
    for n in range(20):
        pending, _ = session(user=f"V{n}")
        state.attach(pending, [(f"V{n}", 10), ("C8", 5)])
        state.leave(f"V{n}", "C8", upto=9, at=11)
        sessions.append(pending)
        assert len(state.leave_deadlines) <= 8
    assert state.stats.forced_leaves > 0
    assert all("C8" not in s.channels for s in sessions[: state.stats.forced_leaves])  # the oldest went first
    assert all("C8" in s.channels for s in sessions[-5:])  # the newest still wait for their upto


# -- revoked tokens --------------------------------------------------------------------


def test_a_revoke_names_the_users_sessions_of_that_token_only() -> None:
    """auth.revoke of one token (event 11 of U1's channel): the sessions of U1 opened with it, whose
    stream holds the event; U1's other token, another user with the same token id (impossible,
    but not this revoke's business) and a Socket Mode session (no token id) are left alone."""
    state = GatewayState()
    thief, _ = session(user="U1")
    thief.token_id = "a" * 32
    second, _ = session(user="U1")
    second.token_id = "a" * 32
    own, _ = session(user="U1")
    own.token_id = "b" * 32
    app, _ = session(user="U1")
    stranger, _ = session(user="U2")
    stranger.token_id = "a" * 32
    for s in (thief, second, own, app):
        state.attach(s, [("U1", 10), ("C5", 3)])
    state.attach(stranger, [("U2", 4)])
    assert set(state.revoked("U1", "a" * 32, at=11)) == {thief, second}
    assert state.revoked("U1", "", at=11) == []  # no token id: nothing (a Socket Mode session has none)
    assert state.revoked("U9", "a" * 32, at=11) == []
    assert state.revoked_session(thief, "a" * 32) and not state.revoked_session(own, "a" * 32)
    state.detach(thief)
    assert not state.revoked_session(thief, "a" * 32)  # gone already: nothing to close


def test_a_revoke_before_a_sessions_bootstrap_is_not_its_business() -> None:
    """A session whose user channel starts at or past the revoke's event did not see it: it was
    bootstrapped after the revoke, which the webapp refuses for that token, so it holds another."""
    state = GatewayState()
    earlier, _ = session(user="U1")
    earlier.token_id = "b" * 32
    state.attach(earlier, [("U1", 10)])  # the gateway's stream of U1 is at 10
    later, _ = session(user="U1")
    later.token_id = "a" * 32
    state.attach(later, [("U1", 12)])  # bootstrapped at 12: it skips up to 12 (a floor)
    assert state.revoked("U1", "a" * 32, at=11) == []
    assert state.revoked("U1", "a" * 32, at=13) == [later]
