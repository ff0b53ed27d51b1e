"""gateway/envelopes.py with a fake clock: one connection per event, acks, retries, waiting, hand-over."""

from __future__ import annotations

import pytest

from gateway.envelopes import ACK_TIMEOUT_S, MAX_RETRY_ATTEMPTS, EnvelopeBook, Send, acked_envelope


def event(n: int) -> dict[str, object]:
    return {"event": {"type": "message", "text": f"m{n}"}}


def texts(sends: list[Send]) -> list[tuple[int, str, int]]:
    return [(s.conn, s.envelope["payload"]["event"]["text"], s.envelope["retry_attempt"]) for s in sends]


def test_each_event_goes_to_one_connection_round_robin() -> None:
    book = EnvelopeBook()
    book.open(1, 0.0)
    book.open(2, 0.0)
    sends = [s for n in range(4) for s in book.add(event(n), 0.0)]
    assert texts(sends) == [(1, "m0", 0), (2, "m1", 0), (1, "m2", 0), (2, "m3", 0)]
    assert sends[0].envelope["type"] == "events_api" and sends[0].envelope["retry_reason"] == ""
    assert sends[0].envelope["accepts_response_payload"] is False


def test_ack_stops_redelivery_and_unacked_is_retried_with_attempt_and_reason() -> None:
    book = EnvelopeBook()
    book.open(1, 0.0)
    acked, unacked = book.add(event(0), 0.0)[0], book.add(event(1), 0.0)[0]
    assert book.ack(acked.envelope["envelope_id"])
    assert book.tick(ACK_TIMEOUT_S - 0.01) == []
    (retry,) = book.tick(ACK_TIMEOUT_S)
    assert retry.envelope["envelope_id"] == unacked.envelope["envelope_id"]
    assert retry.envelope["retry_attempt"] == 1 and retry.envelope["retry_reason"] == "timeout"
    assert book.stats.acked == 1 and book.stats.retried == 1


def test_retries_are_bounded_then_counted_undelivered() -> None:
    book = EnvelopeBook()
    book.open(1, 0.0)
    book.add(event(0), 0.0)
    now, attempts = 0.0, []
    for _ in range(MAX_RETRY_ATTEMPTS + 2):
        now += ACK_TIMEOUT_S
        attempts += [s.envelope["retry_attempt"] for s in book.tick(now)]
    assert attempts == list(range(1, MAX_RETRY_ATTEMPTS + 1))
    assert book.stats.undelivered == 1 and len(book) == 0


def test_a_closed_connections_unacked_envelopes_go_to_the_next_connection() -> None:
    book = EnvelopeBook()
    book.open(1, 0.0)
    first = book.add(event(0), 0.0)[0]
    book.close(1)
    assert book.tick(ACK_TIMEOUT_S) == []  # no connection: it waits
    (again,) = book.open(2, ACK_TIMEOUT_S + 1)
    assert again.conn == 2 and again.envelope["envelope_id"] == first.envelope["envelope_id"]
    assert again.envelope["retry_attempt"] == 1


def test_an_ack_from_another_connection_counts() -> None:
    book = EnvelopeBook()
    book.open(1, 0.0)
    sent = book.add(event(0), 0.0)[0]
    book.open(2, 0.0)
    book.close(1)
    assert book.ack(sent.envelope["envelope_id"]) and book.tick(10.0) == []


def test_events_wait_for_a_connection_then_expire() -> None:
    book = EnvelopeBook(pending_keep_s=10.0)
    book.add(event(0), 0.0)
    book.add(event(1), 5.0)
    assert texts(book.open(1, 12.0)) == [(1, "m1", 0)]  # m0 waited too long
    assert book.stats.expired == 1


def test_waiting_is_bounded() -> None:
    book = EnvelopeBook(max_envelopes=2)
    for n in range(3):
        book.add(event(n), 0.0)
    assert book.stats.overflow == 1 and texts(book.open(1, 0.0)) == [(1, "m1", 0), (1, "m2", 0)]


def test_hand_over_and_take_over_keep_ids_and_ack_deadlines() -> None:
    old = EnvelopeBook()
    old.open(1, 0.0)
    sent = old.add(event(0), 0.0)[0]
    old.close(1)
    old.add(event(1), 1.0)  # never sent
    carried = old.hand_over(1.0)
    assert len(old) == 0 and [c["attempts"] for c in carried] == [1, 0]
    new = EnvelopeBook()
    new.take_over(carried, 100.0)
    assert texts(new.open(7, 100.0)) == [(7, "m1", 0)]  # the unsent one at once
    assert new.tick(100.0 + ACK_TIMEOUT_S - 1.0 - 0.01) == []  # the sent one after its ack time is up
    assert new.ack(sent.envelope["envelope_id"])  # an ack for the old id counts here
    assert all(s.envelope["payload"]["event"]["text"] != "m0" for s in new.tick(200.0))


@pytest.mark.parametrize(
    "frame",
    ["[" * 64 * 1024, "not json", '["envelope_id"]', '{"envelope_id": 7}', "{}", b"\xff\xfe{", "null"],
)
def test_an_apps_frame_that_acknowledges_nothing_is_none(frame: str | bytes) -> None:
    """64 KiB of ``[`` used to raise RecursionError out of the app's read loop: a 1011 close."""
    assert acked_envelope(frame) is None


def test_an_acknowledgement_names_its_envelope() -> None:
    assert acked_envelope('{"envelope_id": "e-1", "payload": {"text": "hi"}}') == "e-1"
    assert acked_envelope(b'{"envelope_id": "e-2"}') == "e-2"
