"""CHARM's pure decisions: failover, initial placement, operator slot changes."""

from __future__ import annotations

import pytest

from charm import state
from charm.state import Candidate, RingChangeRefused
from services.ring import HashRing, RingDocument

DOC = RingDocument(version=4, slots={"cs-0": "a", "cs-1": "b", "cs-2": "c"})


def alive(*ids: str, spares: tuple[str, ...] = ()) -> list[Candidate]:
    return [Candidate(i, spare=i in spares) for i in ids]


def test_initial_fills_slots_with_actives_before_spares() -> None:
    doc = state.initial("cs", 3, alive("d", "a", "b", "c", spares=("a",)))
    assert doc == RingDocument(version=1, slots={"cs-0": "b", "cs-1": "c", "cs-2": "d"})


def test_initial_with_too_few_instances_leaves_slots_empty() -> None:
    doc = state.initial("cs", 3, alive("a"))
    assert doc.slots == {"cs-0": "a", "cs-1": None, "cs-2": None}
    assert state.degraded_slots(doc, {"a"}) == ["cs-1", "cs-2"]


def test_nothing_to_do_when_every_owner_is_alive() -> None:
    assert state.reconcile(DOC, alive("a", "b", "c", "s", spares=("s",))) is None


def test_dead_owner_is_replaced_by_a_spare_and_only_its_slot_moves() -> None:
    new = state.reconcile(DOC, alive("a", "c", "s", spares=("s",)))
    assert new == RingDocument(version=5, slots={"cs-0": "a", "cs-1": "s", "cs-2": "c"})
    old_ring, new_ring = HashRing(DOC), HashRing(new)
    keys = [f"C{i}" for i in range(5000)]
    moved = [k for k in keys if old_ring.owner_for(k) != new_ring.owner_for(k)]
    assert moved and all(old_ring.owner_for(k) == "b" and new_ring.owner_for(k) == "s" for k in moved)
    assert all(old_ring.slot_for(k) == new_ring.slot_for(k) for k in keys)


def test_registered_spares_are_preferred_then_ids_in_order() -> None:
    new = state.reconcile(DOC, alive("a", "c", "z", "x", spares=("z",)))
    assert new is not None and new.slots["cs-1"] == "z"
    new = state.reconcile(DOC, alive("a", "c", "z", "x"))
    assert new is not None and new.slots["cs-1"] == "x"


def test_an_instance_never_serves_two_slots() -> None:
    new = state.reconcile(DOC, alive("s", spares=("s",)))  # three dead, one spare
    assert new is not None
    state.check_invariants(new)
    assert list(new.slots.values()).count("s") == 1
    assert state.degraded_slots(new, {"s"}) == ["cs-1", "cs-2"]


def test_no_spare_keeps_the_old_owner_and_reports_degraded() -> None:
    assert state.reconcile(DOC, alive("a", "c")) is None
    assert state.degraded_slots(DOC, {"a", "c"}) == ["cs-1"]


def test_check_invariants_catches_a_double_mapping() -> None:
    with pytest.raises(AssertionError):
        state.check_invariants(RingDocument(1, {"cs-0": "a", "cs-1": "a"}))


def test_add_slot_takes_a_spare_and_moves_about_a_quarter_of_keys() -> None:
    new = state.add_slot(DOC, "cs", alive("a", "b", "c", "s"))
    assert new.version == 5 and new.slots["cs-3"] == "s"
    keys = [f"C{i}" for i in range(20000)]
    old_ring, new_ring = HashRing(DOC), HashRing(new)
    moved = [k for k in keys if old_ring.owner_for(k) != new_ring.owner_for(k)]
    assert 0.15 < len(moved) / len(keys) < 0.35
    assert all(new_ring.owner_for(k) == "s" for k in moved)


def test_add_slot_without_a_spare_is_refused() -> None:
    with pytest.raises(RingChangeRefused):
        state.add_slot(DOC, "cs", alive("a", "b", "c"))


def test_add_slot_reuses_the_lowest_free_slot_number() -> None:
    doc = RingDocument(2, {"cs-0": "a", "cs-2": "c"})
    assert "cs-1" in state.add_slot(doc, "cs", alive("a", "c", "s")).slots


def test_remove_slot_moves_its_keys_and_frees_its_instance() -> None:
    new = state.remove_slot(DOC, "cs-2")
    assert new == RingDocument(version=5, slots={"cs-0": "a", "cs-1": "b"})
    assert [c.id for c in state.spares(new, alive("a", "b", "c"))] == ["c"]


@pytest.mark.parametrize("slot", ["cs-9", ""])
def test_remove_unknown_slot_is_refused(slot: str) -> None:
    with pytest.raises(RingChangeRefused):
        state.remove_slot(DOC, slot)


def test_remove_last_slot_is_refused() -> None:
    with pytest.raises(RingChangeRefused):
        state.remove_slot(RingDocument(1, {"cs-0": "a"}), "cs-0")
