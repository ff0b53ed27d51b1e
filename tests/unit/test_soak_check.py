"""bench.soak_check: the chaos soak's verdict on synthetic streams (no fleet, no sockets)."""

from __future__ import annotations

import json

from bench.soak_check import DbEvent, HistoryRead, Session, Verdict, check, event_key

USER, TEAM, OTHER = "U1", "T1", "U2"
CH = "C1"
S = 1_000_000  # µs per second


def msg(seq: int, t_s: float, ch: str = CH) -> DbEvent:
    ts = f"{1000 + seq}.000000"
    body = {"type": "message", "channel": ch, "user": OTHER, "text": f"m{seq}", "ts": ts}
    return DbEvent(ch, seq, int(t_s * S), json.dumps(body, separators=(",", ":")))


def member(kind: str, seq: int, t_s: float, user: str = USER) -> DbEvent:
    body = {"type": kind, "user": user, "channel": CH, "channel_type": "C", "team": TEAM}
    return DbEvent(CH, seq, int(t_s * S), json.dumps(body, separators=(",", ":")))


def frames(sid: int, events: list[DbEvent]) -> list[tuple[int, int]]:
    return [(sid, event_key(e.json.encode())) for e in events]


def run(
    events: list[DbEvent],
    sessions: list[Session],
    received: list[tuple[int, int]],
    history: dict[int, dict[str, HistoryRead]] | None = None,
    initial: set[str] | None = None,
) -> Verdict:
    return check(
        events, sessions, received, {0: (USER, TEAM)}, {0: initial if initial is not None else {CH}}, history or {}
    )


def test_a_complete_stream_passes_and_every_pair_is_accounted() -> None:
    events = [msg(s, s) for s in range(1, 11)]  # one event per second
    sess = [Session(1, 0, t_ws_us=3 * S + S // 2, t_hello_us=4 * S + S // 2)]
    # bootstrap between ws and hello: it may start after seq 3 or 4; it got 5..10
    v = run(events, sess, frames(1, events[4:]))
    assert v.ok, v.as_dict()
    assert v.pairs["delivered"] == 6
    assert v.pairs["bootstrap_race"] == 1  # seq 4: created between the websocket and hello


def test_loss_in_the_middle_duplicates_and_reordering_are_found() -> None:
    events = [msg(s, s) for s in range(1, 11)]
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1)]
    got = events[:4] + events[5:]  # seq 5 lost
    v = run(events, sess, frames(1, got))
    assert v.failures["lost"] == 1 and v.examples["lost"][0]["seq"] == 5
    v = run(events, sess, frames(1, events + events[9:]))
    assert v.failures["duplicated"] == 1
    swapped = events[:3] + [events[4], events[3]] + events[5:]
    v = run(events, sess, frames(1, swapped))
    assert v.failures["reordered"] == 1 and not v.ok


def test_a_loss_at_the_start_is_not_hidden_by_the_bootstrap_window() -> None:
    events = [msg(s, s) for s in range(1, 11)]
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S)]  # hello at 1 s: seq 2.. required
    v = run(events, sess, frames(1, events[3:]))  # 2 and 3 never arrived
    assert v.failures["lost"] == 2


def test_a_moved_connection_must_resume_exactly_where_it_stopped() -> None:
    events = [msg(s, s) for s in range(1, 11)]
    old = Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1, t_close_us=5 * S + 1)
    new = Session(2, 0, t_ws_us=7 * S, t_hello_us=7 * S + 1, start="moved")
    ok = frames(1, events[:5]) + frames(2, events[5:])
    assert run(events, [old, new], ok).ok
    gap = frames(1, events[:5]) + frames(2, events[7:])  # 6 and 7 (sent while away) not replayed
    v = run(events, [old, new], gap)
    assert v.failures["lost"] == 2


def test_a_fresh_reconnect_owes_its_gap_to_history() -> None:
    events = [msg(s, s) for s in range(1, 11)]
    old = Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1, t_close_us=5 * S + S // 2)
    new = Session(2, 0, t_ws_us=7 * S + S // 2, t_hello_us=7 * S + S // 2 + 1, start="after_close_1006")
    received = frames(1, events[:4]) + frames(2, events[7:])  # 5 was in flight at the close; 6, 7 while away
    read = HistoryRead(read_us=8 * S, oldest_us=0, ts={"1005.000000", "1006.000000", "1007.000000"})
    v = run(events, [old, new], received, history={2: {CH: read}})
    assert v.ok, v.as_dict()
    assert v.pairs["tail_at_close"] == 1 and v.pairs["away"] == 2
    assert v.history["found"] == 3
    read.ts.discard("1006.000000")
    v = run(events, [old, new], received, history={2: {CH: read}})
    assert v.failures["lost_from_history"] == 1 and not v.ok


def test_membership_windows_follow_the_join_and_leave_events() -> None:
    events = [msg(1, 1), member("member_joined_channel", 2, 2), msg(3, 3), msg(4, 4)]
    events += [member("member_left_channel", 5, 5), msg(6, 6)]
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1)]
    # not a member for seq 1; the join (2) and the leave (5) and after it (6) may go either way
    v = run(events, sess, frames(1, [events[2], events[3], events[4]]), initial=set())
    assert v.ok, v.as_dict()
    assert v.pairs["not_member"] == 2 and v.pairs["delivered"] == 2  # seq 1 (before the join), 6 (after the leave)
    v = run(events, sess, frames(1, [events[2]]), initial=set())  # seq 4 lost while a member
    assert v.failures["lost"] == 1
    v = run(events, sess, frames(1, [events[0], events[2], events[3]]), initial=set())
    assert v.failures["delivered_to_non_member"] == 1 and not v.ok


def test_a_frame_matching_no_event_fails_the_check() -> None:
    events = [msg(1, 1)]
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1)]
    v = run(events, sess, frames(1, events) + [(1, 12345)])
    assert v.unmatched == 1 and not v.ok


def test_after_a_leave_events_may_race_it_but_not_follow_it() -> None:
    events = [msg(1, 1), msg(2, 2), member("member_left_channel", 3, 3), msg(4, 4)]
    left = DbEvent(USER, 1, int(3 * S), json.dumps({"type": "channel_left", "channel": CH}, separators=(",", ":")))
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1)]
    before = frames(1, events[:3] + [events[3]]) + frames(1, [left])  # seq 4 arrived before the leave did
    v = run([*events, left], sess, before)
    assert v.ok, v.as_dict()
    assert v.pairs["delivered_membership_race"] == 2  # the leave event itself and seq 4
    after = frames(1, events[:3]) + frames(1, [left]) + frames(1, [events[3]])
    v = run([*events, left], sess, after)
    assert v.failures["delivered_to_non_member"] == 1 and not v.ok


def test_a_loss_while_the_user_joined_during_a_move_is_named_as_such() -> None:
    events = [msg(1, 1), msg(2, 2), member("member_joined_channel", 3, 5), msg(4, 5.5), msg(5, 8)]
    old = Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1, t_close_us=7 * S)
    new = Session(2, 0, t_ws_us=7 * S + S // 4, t_hello_us=7 * S + S // 2, start="moved")
    v = run(events, [old, new], frames(2, [events[4]]), initial=set())  # seq 4 (after the join) never came
    assert v.failures["lost"] == 1 and v.lost_by_cause == {"membership_changed_during_move": 1}
    events[2] = member("member_joined_channel", 3, 0.9)  # joined long before the move: any other loss
    v = run(events, [old, new], frames(1, [events[1]]) + frames(2, [events[4]]), initial=set())
    assert v.lost_by_cause == {"during_move": 1}


def test_a_leave_identical_to_an_earlier_one_is_matched_where_the_user_was_a_member() -> None:
    """Another user's second leave of the channel is byte for byte its first (Slack's
    member_left_channel has no ts). Our user joined between the two: the frame it got is the
    second, not a delivery to a non-member plus a loss (the smoke soak's false failure)."""
    first_leave = member("member_left_channel", 2, 2, user=OTHER)
    events = [msg(1, 1), first_leave, member("member_joined_channel", 3, 3, user=OTHER)]
    events += [member("member_joined_channel", 4, 4), member("member_left_channel", 5, 5, user=OTHER), msg(6, 6)]
    assert events[1].json == events[4].json
    sess = [Session(1, 0, t_ws_us=S // 2, t_hello_us=S // 2 + 1)]
    # it starts in the channel after its join (the join itself comes on its own user channel)
    v = run(events, sess, frames(1, events[4:]), initial=set())  # the second leave, seq 6
    assert v.ok, v.as_dict()
    v = run(events, sess, frames(1, events[5:]), initial=set())  # the second leave lost
    assert v.failures["lost"] == 1 and v.examples["lost"][0]["seq"] == 5
