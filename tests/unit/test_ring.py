"""Unit tests for services.ring: slot placement, remaps, ring documents."""

from __future__ import annotations

from services.ring import HashRing, RingDocument, slot_names

KEYS = [f"C{i:06d}" for i in range(20_000)]


def doc_of(count: int, version: int = 1) -> RingDocument:
    return RingDocument(version=version, slots={slot: f"inst-{slot}" for slot in slot_names("cs", count)})


def placement(ring: HashRing) -> dict[str, str | None]:
    return {key: ring.slot_for(key) for key in KEYS}


def test_slot_names() -> None:
    assert slot_names("cs", 3) == ["cs-0", "cs-1", "cs-2"]
    assert slot_names("ps", 0) == []


def test_placement_is_stable_across_instances() -> None:
    first = HashRing(doc_of(3))
    second = HashRing(doc_of(3, version=9))
    # Slot order in the document does not matter either.
    reordered = RingDocument(version=2, slots=dict(reversed(list(doc_of(3).slots.items()))))
    third = HashRing(reordered)
    expected = placement(first)
    assert placement(second) == expected
    assert placement(third) == expected
    # Every slot gets a fair share, so this is a real spread, not one slot.
    counts = {slot: list(expected.values()).count(slot) for slot in slot_names("cs", 3)}
    assert all(4_000 < count < 9_500 for count in counts.values()), counts


def test_placement_is_stable_within_an_instance_and_cached() -> None:
    ring = HashRing(doc_of(3))
    before = placement(ring)
    assert placement(ring) == before


def test_owner_for_follows_the_slot_map() -> None:
    ring = HashRing(doc_of(3))
    for key in KEYS[:500]:
        assert ring.owner_for(key) == f"inst-{ring.slot_for(key)}"


def test_remap_moves_only_that_slots_keys_to_one_new_owner() -> None:
    ring = HashRing(doc_of(3))
    slots_before = placement(ring)
    owners_before = {key: ring.owner_for(key) for key in KEYS}
    new_doc = ring.doc.with_owner("cs-1", "spare-7")
    assert new_doc.version == ring.version + 1
    assert ring.update(new_doc) is True
    assert placement(ring) == slots_before  # a remap never changes a key's slot
    moved = {key for key in KEYS if ring.owner_for(key) != owners_before[key]}
    assert moved == {key for key, slot in slots_before.items() if slot == "cs-1"}
    assert moved  # the slot held keys
    assert {ring.owner_for(key) for key in moved} == {"spare-7"}


def test_with_owner_does_not_mutate_the_original_document() -> None:
    doc = doc_of(2, version=4)
    new = doc.with_owner("cs-0", None)
    assert doc.slots["cs-0"] == "inst-cs-0"
    assert doc.version == 4
    assert new.slots == {"cs-0": None, "cs-1": "inst-cs-1"}
    assert new.version == 5


def test_adding_a_slot_moves_about_one_nth_and_only_to_the_new_slot() -> None:
    ring = HashRing(doc_of(3))
    before = placement(ring)
    assert ring.update(ring.doc.with_owner("cs-3", "inst-cs-3"))
    after = placement(ring)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert 0.15 <= len(moved) / len(KEYS) <= 0.35, len(moved)
    assert {after[key] for key in moved} == {"cs-3"}


def test_unowned_slot_has_no_owner() -> None:
    ring = HashRing(doc_of(3).with_owner("cs-2", None))
    in_cs2 = [key for key in KEYS if ring.slot_for(key) == "cs-2"]
    assert in_cs2
    for key in in_cs2[:100]:
        assert ring.owner_for(key) is None
    other = next(key for key in KEYS if ring.slot_for(key) != "cs-2")
    assert ring.owner_for(other) is not None


def test_empty_ring_has_no_slot_and_no_owner() -> None:
    ring = HashRing()
    assert ring.version == 0
    assert ring.slot_for("C1") is None
    assert ring.owner_for("C1") is None


def test_older_or_equal_version_is_not_adopted() -> None:
    ring = HashRing(doc_of(3, version=5))
    assert ring.update(doc_of(4, version=4)) is False
    assert ring.update(RingDocument(version=5, slots={"cs-0": "x"})) is False
    assert ring.version == 5
    assert set(ring.doc.slots) == {"cs-0", "cs-1", "cs-2"}
    assert ring.update(doc_of(4, version=6)) is True
    assert ring.version == 6


def test_older_version_is_not_adopted_after_an_empty_document() -> None:
    ring = HashRing(RingDocument(version=5, slots={}))
    assert ring.version == 5
    assert ring.update(doc_of(3, version=3)) is False
    assert ring.version == 5
    assert ring.slot_for("C1") is None
    # Same after a ring that had slots was emptied by a newer document.
    ring = HashRing(doc_of(3, version=5))
    assert ring.update(RingDocument(version=6, slots={}))
    assert ring.update(doc_of(3, version=4)) is False
    assert ring.version == 6
    assert ring.slot_for("C1") is None


def test_first_document_is_adopted_even_at_version_zero() -> None:
    ring = HashRing()
    assert ring.update(doc_of(2, version=0)) is True
    assert ring.slot_for("C1") in {"cs-0", "cs-1"}


def test_removing_every_slot_empties_the_ring() -> None:
    ring = HashRing(doc_of(3, version=1))
    assert ring.slot_for("C1") is not None
    assert ring.update(RingDocument(version=2, slots={}))
    assert ring.slot_for("C1") is None
    assert ring.owner_for("C1") is None


def test_ring_document_json_round_trip() -> None:
    doc = RingDocument(version=7, slots={"cs-0": "cs-a1b2", "cs-1": "cs-c3d4", "cs-2": None})
    raw = doc.to_json()
    assert isinstance(raw, bytes)
    assert RingDocument.from_json(raw) == doc
    assert RingDocument.from_json(raw.decode()) == doc


def test_ring_document_from_nothing() -> None:
    assert RingDocument.from_json(None) == RingDocument(version=0, slots={})
    assert RingDocument.from_json(b"") == RingDocument(version=0, slots={})


def test_slots_of() -> None:
    doc = RingDocument(version=1, slots={"cs-0": "a", "cs-1": "b", "cs-2": "a", "cs-3": None})
    assert doc.slots_of("a") == ["cs-0", "cs-2"]
    assert doc.slots_of("zzz") == []
