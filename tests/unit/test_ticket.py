"""Unit tests for services.ticket: signed, short-lived, single-use websocket tickets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import deque

import pytest

from services.ticket import (
    TICKET_TTL_S,
    InvalidTicket,
    NonceStore,
    Ticket,
    TicketVerifier,
    mint,
    new_incarnation,
)

SECRET = b"s3cret-for-tests"
NOW_S = 1_700_000_000.0


def verifier(gateway: str = "gw-1") -> TicketVerifier:
    return TicketVerifier(SECRET, gateway)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_valid_ticket() -> None:
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    ticket = verifier().verify(token, now_s=NOW_S + 1)
    assert isinstance(ticket, Ticket)
    assert (ticket.user, ticket.team, ticket.gateway) == ("U1", "T1", "gw-1")
    assert ticket.expires_at == pytest.approx(NOW_S + TICKET_TTL_S)
    assert ticket.nonce


def test_ticket_is_url_safe() -> None:
    token = mint(SECRET, "U/1+x", "T=1", "gw-1", now_s=NOW_S)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_each_mint_has_its_own_nonce() -> None:
    v = verifier()
    first = v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S)
    second = v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S)
    assert first.nonce != second.nonce


def test_wrong_secret_is_a_bad_signature() -> None:
    token = mint(b"another-secret", "U1", "T1", "gw-1", now_s=NOW_S)
    with pytest.raises(InvalidTicket, match="bad signature"):
        verifier().verify(token, now_s=NOW_S)


def test_forged_payload_keeps_the_old_signature() -> None:
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    _, signature = token.split(".")
    forged_payload = json.dumps(
        {"u": "U_ADMIN", "t": "T1", "g": "gw-1", "exp": NOW_S + 30, "n": "abcd"}, separators=(",", ":")
    ).encode()
    with pytest.raises(InvalidTicket, match="bad signature"):
        verifier().verify(b64(forged_payload) + "." + signature, now_s=NOW_S)


def test_tampered_signature() -> None:
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    flipped = b64(bytes([raw[0] ^ 1]) + raw[1:])
    with pytest.raises(InvalidTicket, match="bad signature"):
        verifier().verify(payload + "." + flipped, now_s=NOW_S)


def test_a_ticket_used_before_a_gateway_restart_is_refused_after_it() -> None:
    """Nonces live in the gateway process: a restart forgets them. The ticket names the
    incarnation (start) it was minted for, so a replay on the restarted process fails."""
    before = new_incarnation()
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S, incarnation=before)
    assert TicketVerifier(SECRET, "gw-1", incarnation=before).verify(token, now_s=NOW_S).incarnation == before
    restarted = TicketVerifier(SECRET, "gw-1", incarnation=new_incarnation())  # same id, fresh nonce store
    with pytest.raises(InvalidTicket, match="earlier start"):
        restarted.verify(token, now_s=NOW_S + 1)  # well within its TTL


def test_a_ticket_minted_after_a_restart_on_a_stale_view_is_accepted() -> None:
    """The webapp still saw the previous incarnation in Consul when it minted: the ticket
    was issued after this start, so it is not a replay."""
    started_at = NOW_S
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=started_at + 0.5, incarnation="previous")
    verifier = TicketVerifier(SECRET, "gw-1", incarnation=new_incarnation(), started_at=started_at)
    assert verifier.verify(token, now_s=started_at + 1).issued_at == started_at + 0.5
    replayed = mint(SECRET, "U1", "T1", "gw-1", now_s=started_at - 0.5, incarnation="previous")
    with pytest.raises(InvalidTicket, match="earlier start"):  # issued before this start: a replay
        verifier.verify(replayed, now_s=started_at + 1)


def test_a_ticket_without_an_incarnation_is_refused_by_a_gateway_that_has_one() -> None:
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    with pytest.raises(InvalidTicket, match="earlier start"):
        TicketVerifier(SECRET, "gw-1", incarnation=new_incarnation()).verify(token, now_s=NOW_S)


def test_incarnations_are_unique_per_start() -> None:
    assert len({new_incarnation() for _ in range(1000)}) == 1000


def test_wrong_gateway() -> None:
    token = mint(SECRET, "U1", "T1", "gw-2", now_s=NOW_S)
    with pytest.raises(InvalidTicket, match="another gateway"):
        verifier("gw-1").verify(token, now_s=NOW_S)
    # The refusal did not burn the ticket for its own gateway.
    assert verifier("gw-2").verify(token, now_s=NOW_S).gateway == "gw-2"


def test_expired() -> None:
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S, ttl_s=10.0)
    assert verifier().verify(token, now_s=NOW_S + 10.0).user == "U1"  # the last valid instant
    with pytest.raises(InvalidTicket, match="expired"):
        verifier().verify(token, now_s=NOW_S + 10.001)


def test_reused() -> None:
    v = verifier()
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    v.verify(token, now_s=NOW_S)
    with pytest.raises(InvalidTicket, match="already used"):
        v.verify(token, now_s=NOW_S + 1)


def test_reuse_is_still_refused_after_many_other_tickets() -> None:
    v = verifier()
    token = mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S)
    v.verify(token, now_s=NOW_S)
    for _ in range(1100):  # past the size where expired nonces are swept
        v.verify(mint(SECRET, "U2", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S + 1)
    with pytest.raises(InvalidTicket, match="already used"):
        v.verify(token, now_s=NOW_S + 2)


def test_expired_nonces_are_forgotten() -> None:
    v = verifier()
    for _ in range(1100):
        v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S, ttl_s=1.0), now_s=NOW_S)
    v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S + 100), now_s=NOW_S + 100)
    assert len(v._used) == 1


@pytest.mark.parametrize(
    "token",
    ["", "no-dot-at-all", "a.b", "!!!.???", "é.é", ".", "abc."],
    ids=["empty", "no-dot", "bad-base64", "punctuation", "non-ascii", "just-dot", "no-signature"],
)
def test_malformed(token: str) -> None:
    with pytest.raises(InvalidTicket):
        verifier().verify(token, now_s=NOW_S)


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"u":"U1"}', b'{"u":"U1","t":"T1","g":"gw-1","exp":"soon","n":"x"}', b"\xff\xfe"],
    ids=["not-json", "list", "missing-fields", "bad-exp", "not-utf8"],
)
def test_correctly_signed_but_malformed_payload(payload: bytes) -> None:
    token = b64(payload) + "." + b64(hmac.new(SECRET, payload, hashlib.sha256).digest())
    with pytest.raises(InvalidTicket, match="malformed"):
        verifier().verify(token, now_s=NOW_S)


# -- the nonce store ---------------------------------------------------------------------


def test_nonce_store_forgets_in_expiry_order_and_only_what_is_due() -> None:
    store = NonceStore()
    for i in range(5):
        assert store.add(f"n{i}", NOW_S + i)
    store.forget_expired(NOW_S + 2.5)
    assert [n for n in ("n0", "n1", "n2", "n3", "n4") if n in store] == ["n3", "n4"]
    store.forget_expired(NOW_S + 100)
    assert len(store) == 0


def test_nonce_store_keeps_an_out_of_order_nonce_until_the_one_before_it() -> None:
    store = NonceStore()
    store.add("late", NOW_S + 30)
    store.add("early", NOW_S + 10)  # a clock skew between webapps: expires before the one ahead of it
    store.forget_expired(NOW_S + 20)
    assert "early" in store  # kept longer than needed, which is safe: the ticket itself has expired
    store.forget_expired(NOW_S + 31)
    assert "early" not in store and "late" not in store


def test_nonce_store_refuses_a_known_nonce_and_a_full_store() -> None:
    store = NonceStore(max_nonces=2)
    assert store.add("a", NOW_S)
    assert not store.add("a", NOW_S + 1)
    assert store.add("b", NOW_S)
    assert not store.add("c", NOW_S)
    store.forget_expired(NOW_S + 1)
    assert store.add("c", NOW_S + 5)


def test_a_full_verifier_refuses_until_nonces_expire() -> None:
    v = TicketVerifier(SECRET, "gw-1", max_nonces=3)
    for _ in range(3):
        v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S, ttl_s=5.0), now_s=NOW_S)
    with pytest.raises(InvalidTicket, match="too many"):
        v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S)
    assert v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S + 6), now_s=NOW_S + 6).user == "U1"


def test_verify_touches_only_the_expired_nonces() -> None:
    """O(1) amortized: a verify with many live nonces pops only what expired (none here)."""
    v = verifier()
    for _ in range(5000):
        v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S)
    popped = 0
    original = v._used._by_expiry

    class Counting(deque):  # type: ignore[type-arg]
        def popleft(self) -> tuple[float, str]:
            nonlocal popped
            popped += 1
            return super().popleft()  # type: ignore[no-any-return]

    v._used._by_expiry = Counting(original)
    for _ in range(100):
        v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S), now_s=NOW_S + 1)
    assert popped == 0
    v.verify(mint(SECRET, "U1", "T1", "gw-1", now_s=NOW_S + 40), now_s=NOW_S + 40)
    assert popped == 5100
