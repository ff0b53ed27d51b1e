"""webapp_stub.resume: resume records for connections the fleet moves (fake clock)."""

from __future__ import annotations

from tests.support import FakeClock
from webapp_stub.resume import ResumeBook


def test_claim_hands_out_the_oldest_record_once_and_take_consumes_it() -> None:
    book = ResumeBook(ttl_s=120, clock=FakeClock())
    first = book.add("U1", {"C1": 5, "U1": 2})
    second = book.add("U1", {"C1": 7})
    assert first != second and len(book) == 2
    assert book.claim("U1") == first
    assert book.claim("U1") == second
    # Every record claimed, none taken: a retry (the first ticket failed) gets the oldest again.
    assert book.claim("U1") == first
    assert book.take(first, "U2") is None  # not that user's record
    assert book.take(first, "U1") == {"C1": 5, "U1": 2}
    assert book.take(first, "U1") is None  # used once
    assert len(book) == 1
    assert book.claim("U1") == second  # only the untaken one is left
    assert book.take(second, "U1") == {"C1": 7}
    assert book.claim("U1") == ""  # nothing left to claim


def test_records_expire_claimed_or_not() -> None:
    clock = FakeClock()
    book = ResumeBook(ttl_s=120, clock=clock)
    claimed = book.add("U1", {"C1": 1})
    book.add("U2", {"C1": 1})
    assert book.claim("U1") == claimed
    clock.now += 120.5
    assert book.take(claimed, "U1") is None
    assert book.claim("U2") == ""
    assert len(book) == 0


def test_unclaimed_records_can_be_taken_directly_and_are_no_longer_claimable() -> None:
    book = ResumeBook(clock=FakeClock())
    rid = book.add("U1", {"C1": 3})
    assert book.take(rid, "U1") == {"C1": 3}
    assert book.claim("U1") == ""


def test_bounded_the_oldest_go_first() -> None:
    book = ResumeBook(max_records=2, clock=FakeClock())
    oldest = book.add("U1", {})
    book.add("U2", {})
    book.add("U3", {})
    assert len(book) == 2
    assert book.take(oldest, "U1") is None and book.claim("U1") == ""
    assert book.claim("U2") and book.claim("U3")


def test_a_record_keeps_the_leaves_its_connection_had_not_reached() -> None:
    book = ResumeBook(ttl_s=120, clock=FakeClock())
    rid = book.add("U1", {"U1": 3, "C1": 5}, until={"C1": 7})
    record = book.take_record(rid, "U1")
    assert record is not None and record.channels == {"U1": 3, "C1": 5} and record.until == {"C1": 7}
    assert book.take_record(rid, "U1") is None


def test_the_holder_of_a_taken_record_may_take_it_again_within_the_grace() -> None:
    """A gateway's bootstrap call timed out after the webapp had taken the record: its retry, with
    the same ticket nonce, gets the same record; no other connection can, and not after the grace."""
    clock = FakeClock()
    book = ResumeBook(clock=clock, retake_grace_s=60.0)
    rid = book.add("U1", {"C1": 5}, until={"C2": 9})
    assert book.claim("U1") == rid
    first = book.take_record(rid, "U1", holder="nonce-a")
    assert first is not None and first.channels == {"C1": 5}
    assert len(book) == 0
    again = book.take_record(rid, "U1", holder="nonce-a")
    assert again is not None and again.channels == {"C1": 5} and again.until == {"C2": 9}
    assert book.take_record(rid, "U1", holder="nonce-b") is None  # another connection's ticket
    assert book.take_record(rid, "U2", holder="nonce-a") is None  # another user
    assert book.take_record(rid, "U1") is None  # no holder: used once
    clock.advance(60.5)
    assert book.take_record(rid, "U1", holder="nonce-a") is None  # past the grace


def test_a_record_taken_without_a_holder_is_not_kept() -> None:
    book = ResumeBook(clock=FakeClock())
    rid = book.add("U1", {"C1": 5})
    assert book.take(rid, "U1") == {"C1": 5}
    assert book.take_record(rid, "U1", holder="") is None
    assert book._taken == {}


def test_a_taken_record_is_claimable_once_more_so_that_a_failed_bootstrap_fails_loudly() -> None:
    """The gateway took the record but its bootstrap failed for good (every attempt timed out, or
    the client left before hello): the client's next rtm.connect names the taken record again, its
    bootstrap (another ticket) is refused, and the gateway closes with 4010, so the client catches
    up from history instead of silently starting at a fresh bootstrap. Refused once, it is handed
    out no more (the client's next connection is fresh)."""
    clock = FakeClock()
    book = ResumeBook(clock=clock, retake_grace_s=60.0)
    rid = book.add("U1", {"C1": 5})
    assert book.claim("U1") == rid
    assert book.take_record(rid, "U1", holder="nonce-a") is not None
    assert book.claim("U2") == ""  # another user's
    assert book.claim("U1") == rid  # the retry's ticket names it: its bootstrap will be refused
    assert book.claim("U1") == rid  # until a bootstrap of another ticket was refused
    assert book.take_record(rid, "U1", holder="nonce-b") is None
    assert book.claim("U1") == ""  # the 4010 was said: the next connection is fresh
    assert book.take_record(rid, "U1", holder="nonce-a") is not None  # the holder's own retry still works
    # a newer record of the user comes first; a taken one stops being claimable after the grace
    rid2 = book.add("U1", {"C1": 9})
    assert book.take_record(rid2, "U1", holder="nonce-c") is not None
    newer = book.add("U1", {"C1": 12})
    assert book.claim("U1") == newer
    assert book.take_record(newer, "U1") is not None  # no holder: not kept
    assert book.claim("U1") == rid2
    clock.advance(60.5)
    assert book.claim("U1") == "" and book._reclaimable == {}


def test_a_confirmed_taken_record_is_not_handed_out_again() -> None:
    """The gateway sent hello to the connection that took the record: the user's next connection (a
    second device, or the same client later) is unrelated to that move and must not be refused."""
    book = ResumeBook(clock=FakeClock(), retake_grace_s=60.0)
    rid = book.add("U1", {"C1": 5})
    assert book.take_record(rid, "U1", holder="nonce-a") is not None
    assert not book.confirm(rid, "U1", "nonce-b")  # not its holder
    assert not book.confirm(rid, "U2", "nonce-a")  # not its user
    assert not book.confirm("unknown", "U1", "nonce-a")
    assert book.claim("U1") == rid  # unconfirmed: claimable once more
    assert book.confirm(rid, "U1", "nonce-a")
    assert book.claim("U1") == ""
    assert book.take_record(rid, "U1", holder="nonce-a") is not None  # the holder's own retry still works
