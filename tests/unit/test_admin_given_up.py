"""admin_server/given_up.py: after a publish is given up, later ones of its channel are held until it
is resent (or the hold expires), so the webapp's resend keeps the channel's order."""

from __future__ import annotations

from admin_server.given_up import GivenUpChannels


def test_later_publishes_are_held_until_the_given_up_one_is_resent() -> None:
    held = GivenUpChannels(hold_s=30.0, max_channels=2)
    held.give_up("C1", 5, now_s=0.0)
    assert held.holds("C1", 6, 1.0) and held.holds("C1", 9, 1.0)
    assert not held.holds("C2", 6, 1.0) and not held.holds("C1", None, 1.0)  # another channel; transient
    assert not held.holds("C1", 5, 2.0)  # the resend: lifts the hold
    assert not held.holds("C1", 6, 2.0) and len(held) == 0


def test_an_earlier_resend_lifts_the_hold_and_the_hold_expires() -> None:
    held = GivenUpChannels(hold_s=30.0)
    held.give_up("C1", 5, now_s=0.0)
    held.give_up("C1", 7, now_s=0.0)  # the lowest given up counts
    assert held.holds("C1", 6, 1.0)
    assert not held.holds("C1", 3, 1.0) and not held.holds("C1", 6, 1.0)  # the rewind starts earlier
    held.give_up("C2", 5, now_s=10.0)
    assert held.holds("C2", 6, 39.9) and not held.holds("C2", 6, 40.0)  # expired: the resend went elsewhere


def test_bounded_the_oldest_channel_goes_first() -> None:
    held = GivenUpChannels(max_channels=2)
    for n, channel in enumerate(("C1", "C2", "C3")):
        held.give_up(channel, 5, now_s=float(n))
    assert list(held.held) == ["C2", "C3"]
    assert not held.holds("C1", 6, 3.0) and held.holds("C3", 6, 3.0)
