"""webapp_stub.resume: resume records for connections the fleet moves (fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import FakeClock
from webapp_stub.errors import ApiError
from webapp_stub.resume import MemoryRows, ResumeBook, token_id
from webapp_stub.resume_table import ResumeTable
from webapp_stub.store import Store


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


def test_bounded_a_new_record_past_the_bound_is_refused_not_an_older_one_forgotten() -> None:
    """An older record's client was already told goodbye: forgetting it would start that client
    fresh, silently. The new one is refused instead (its gateway closes that connection 4010)."""
    book = ResumeBook(max_records=2, clock=FakeClock())
    oldest = book.add("U1", {})
    book.add("U2", {})
    with pytest.raises(ApiError) as refused:
        book.add("U3", {})
    assert refused.value.code == "too_many_resume_records" and len(book) == 2
    assert book.claim("U1") == oldest and book.claim("U2") and book.claim("U3") == ""
    assert book.take(oldest, "U1") is not None
    assert book.add("U3", {})  # room again


def test_records_per_user_are_bounded() -> None:
    book = ResumeBook(max_records_per_user=2, clock=FakeClock())
    book.add("U1", {}, token_id="a")
    second = book.add("U1", {}, token_id="b")
    with pytest.raises(ApiError):
        book.add("U1", {}, token_id="c")
    assert book.add("U2", {}, token_id="c")  # another user is not held up
    assert book.take(second, "U1") is not None
    assert book.add("U1", {}, token_id="c")


def test_records_are_per_token_so_one_device_cannot_claim_anothers() -> None:
    """Two devices of one user, two tokens, both moved by a drain: each rtm.connect gets the
    record of its own token, whichever reconnects first; a third token gets none."""
    book = ResumeBook(clock=FakeClock())
    laptop = book.add("U1", {"C1": 5}, token_id=token_id("xoxp-laptop"))
    phone = book.add("U1", {"C1": 9}, token_id=token_id("xoxp-phone"))
    assert book.claim("U1", token_id("xoxp-phone")) == phone  # the phone first: not the laptop's older record
    assert book.claim("U1", token_id("xoxp-other")) == ""
    assert book.claim("U1") == ""  # no token id: nothing
    assert book.claim("U1", token_id("xoxp-laptop")) == laptop
    assert book.claim("U1", token_id("xoxp-phone")) == phone  # the phone's retry: its own again
    # a taken record is handed out once more only to its own token
    assert book.take_record(phone, "U1", holder="n-phone") is not None
    assert book.claim("U1", token_id("xoxp-phone")) == phone
    assert book.take_record(laptop, "U1", holder="n-laptop") is not None
    assert book.claim("U1", token_id("xoxp-laptop")) == laptop
    assert book.claim("U1", token_id("xoxp-other")) == ""


def test_a_revoked_tokens_records_are_gone_pending_claimed_and_taken() -> None:
    """auth.revoke: no record of that user and token can be claimed or taken any more (a ticket
    minted before the revoke names one in vain), durably; other tokens' and users' stay."""
    rows = MemoryRows()
    book = ResumeBook(clock=FakeClock(), rows=rows)
    leaked, own = token_id("xoxp-leaked"), token_id("xoxp-own")
    pending = book.add("U1", {"C1": 5}, token_id=leaked)
    claimed = book.add("U1", {"C1": 6}, token_id=leaked)
    taken = book.add("U1", {"C1": 7}, token_id=leaked)
    kept = book.add("U1", {"C1": 8}, token_id=own)
    other = book.add("U2", {"C1": 9}, token_id=leaked)
    assert book.claim("U1", leaked) == pending and book.claim("U1", leaked) == claimed
    assert book.take_record(taken, "U1", holder="nonce-t") is not None
    assert book.revoke("U1", leaked) == 3
    assert book.claim("U1", leaked) == ""
    for rid in (pending, claimed):
        assert book.take_record(rid, "U1", holder="nonce-x") is None
    assert book.take_record(taken, "U1", holder="nonce-t") is None  # not even its holder's retry
    assert set(rows.rows) == {kept, other}  # forgotten durably: a restarted webapp has them no more
    assert book.claim("U1", own) == kept and book.claim("U2", leaked) == other
    assert book.revoke("U1", leaked) == 0


def test_a_token_id_is_a_hash_not_the_token() -> None:
    tid = token_id("xoxp-0123456789abcdef")
    assert tid == token_id("xoxp-0123456789abcdef") and tid != token_id("xoxp-0123456789abcdeg")
    assert "xoxp" not in tid and "0123456789abcdef" not in tid and len(tid) == 32


def test_a_book_on_the_same_rows_holds_the_same_records() -> None:
    """What a restarted webapp sees: pending, claimed and taken records, with their state."""
    clock, rows = FakeClock(1_700_000_000.0), MemoryRows()
    book = ResumeBook(clock=clock, rows=rows, retake_grace_s=60.0)
    pending = book.add("U1", {"C1": 5}, until={"C2": 8}, token_id="t1")
    claimed = book.add("U1", {"C1": 6}, token_id="t1")
    assert book.claim("U1", "t1") == pending
    taken = book.add("U2", {"C1": 7}, token_id="t2")
    assert book.take_record(taken, "U2", holder="n-2") is not None
    gone = book.add("U3", {"C1": 1}, token_id="t3")
    assert book.take(gone, "U3") is not None
    app = book.add("A1", {"C1": 3}, carried=[{"envelope_id": "e1"}])

    again = ResumeBook(clock=clock, rows=rows, retake_grace_s=60.0)
    assert len(again) == 3
    assert again.claim("U1", "t1") == claimed  # the pending one was claimed before the restart
    assert again.claim("U1", "t1") == pending  # every record claimed: the oldest again
    record = again.take_record(pending, "U1", holder="n-1")
    assert record is not None and record.channels == {"C1": 5} and record.until == {"C2": 8}
    assert again.take_record(taken, "U2", holder="n-2") is not None  # its holder's retry still works
    assert again.take_record(gone, "U3") is None
    app_record = again.take_record(app, "A1")
    assert app_record is not None and app_record.carried == [{"envelope_id": "e1"}]
    clock.advance(121.0)
    assert len(ResumeBook(clock=clock, rows=rows)) == 0 and rows.rows == {}  # expired: deleted at load


def test_the_sqlite_table_keeps_records_across_a_reopen(tmp_path: Path) -> None:
    """The webapp's own rows: a record written, the database closed (the process gone) and opened
    again is still claimable by its token, and its row holds the token's id, not the token."""
    clock = FakeClock(1_700_000_000.0)
    store = Store(tmp_path, clock=clock)
    book = ResumeBook(clock=clock, rows=ResumeTable(store))
    rid = book.add("U1", {"C1": 5, "U1": 2}, until={"C1": 9}, token_id=token_id("xoxp-secret-token"))
    other = book.add("U1", {"C1": 4}, token_id=token_id("xoxp-other-token"))
    assert book.take_record(other, "U1", holder="n-o") is not None
    store.close()
    raw = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("webapp.db"))
    assert b"xoxp-secret-token" not in raw and token_id("xoxp-secret-token").encode() in raw

    store = Store(tmp_path, clock=clock)
    reopened = ResumeBook(clock=clock, rows=ResumeTable(store))
    assert reopened.claim("U1", token_id("xoxp-secret-token")) == rid
    assert reopened.claim("U1", token_id("xoxp-other-token")) == other  # taken, unconfirmed: once more
    assert reopened.confirm(other, "U1", "n-o")
    record = reopened.take_record(rid, "U1", holder="n-1")
    assert record is not None and record.channels == {"C1": 5, "U1": 2} and record.until == {"C1": 9}
    store.close()
    store = Store(tmp_path, clock=clock)
    third = ResumeBook(clock=clock, rows=ResumeTable(store))
    assert third.claim("U1", token_id("xoxp-other-token")) == ""  # confirmed before the reopen
    assert third.take_record(rid, "U1", holder="n-1") is not None  # taken, its holder's retry
    clock.advance(3600)
    assert len(ResumeBook(clock=clock, rows=ResumeTable(store))) == 0
    assert store.conn.execute("SELECT count(*) FROM resume_records").fetchone()[0] == 0
    store.close()


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


def test_a_record_whose_connection_closed_before_goodbye_is_withdrawn_unless_claimed(tmp_path: Path) -> None:
    """The client closed its socket itself while its gateway was leaving the record: its next
    rtm.connect started fresh (the record did not exist yet). Left pending, the record would be
    claimed by that token's *next* move and replay, from the old position, what the client already
    had. Withdrawn, the next move claims its own record. One already claimed is kept."""
    clock = FakeClock(1_700_000_000.0)
    store = Store(tmp_path, clock=clock)
    book = ResumeBook(clock=clock, rows=ResumeTable(store))
    tid = token_id("xoxp-one-device")
    stale = book.add("U1", {"C1": 3}, token_id=tid)
    assert not book.withdraw(stale, "U2")  # another user's id: nothing changes
    assert book.withdraw(stale, "U1")
    assert not book.withdraw(stale, "U1")  # gone
    newer = book.add("U1", {"C1": 9}, token_id=tid)
    assert book.claim("U1", tid) == newer
    assert not book.withdraw(newer, "U1")  # claimed: the connection holding it resumes from it
    store.close()
    store = Store(tmp_path, clock=clock)
    reopened = ResumeBook(clock=clock, rows=ResumeTable(store))
    assert len(reopened) == 1 and reopened.claim("U1", tid) == newer  # the withdrawn row is gone too
    store.close()
