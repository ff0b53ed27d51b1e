"""CHARM's decisions, sans I/O: given a ring document and who is alive, what
the next document is.

Pure functions over :class:`services.ring.RingDocument`; every change bumps
the version by exactly one. Invariants (checked by :func:`check_invariants`
and the unit tests):

* no instance serves two slots;
* a slot never points at a dead instance while an unmapped live one (a
  spare) exists;
* only the slots that need it change, so a failover moves exactly the failed
  slot's keys, each to exactly one new owner.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.ring import RingDocument


class RingChangeRefused(Exception):
    """An operator change that cannot be made (no spare, unknown slot, last slot)."""


@dataclass(frozen=True)
class Candidate:
    """A live instance that could serve a slot; ``spare`` if it registered as one."""

    id: str
    spare: bool = False


def spares(doc: RingDocument, alive: list[Candidate]) -> list[Candidate]:
    """Live instances that serve no slot, registered spares first, then by id."""
    mapped = {owner for owner in doc.slots.values() if owner}
    free = [c for c in alive if c.id not in mapped]
    return sorted(free, key=lambda c: (not c.spare, c.id))


def degraded_slots(doc: RingDocument, alive_ids: set[str]) -> list[str]:
    return sorted(slot for slot, owner in doc.slots.items() if owner is None or owner not in alive_ids)


def initial(slot_prefix: str, slot_count: int, alive: list[Candidate]) -> RingDocument:
    """The first document: slots ``prefix-0..n-1``, filled with non-spares first."""
    order = sorted(alive, key=lambda c: (c.spare, c.id))
    slots: dict[str, str | None] = {}
    for i in range(slot_count):
        slots[f"{slot_prefix}-{i}"] = order[i].id if i < len(order) else None
    return RingDocument(version=1, slots=slots)


def reconcile(doc: RingDocument, alive: list[Candidate]) -> RingDocument | None:
    """Promote spares into slots whose owner is dead or missing; None if nothing changes.

    A slot with no spare to take it keeps its old owner (it may come back);
    :func:`degraded_slots` reports it.
    """
    alive_ids = {c.id for c in alive}
    available = spares(doc, alive)
    slots = dict(doc.slots)
    changed = False
    for slot in degraded_slots(doc, alive_ids):
        if not available:
            break
        slots[slot] = available.pop(0).id
        changed = True
    if not changed:
        return None
    return RingDocument(version=doc.version + 1, slots=slots)


def add_slot(doc: RingDocument, slot_prefix: str, alive: list[Candidate]) -> RingDocument:
    """A new slot served by a spare; raises :class:`RingChangeRefused` with no spare."""
    available = spares(doc, alive)
    if not available:
        raise RingChangeRefused("no spare instance to serve a new slot")
    taken = {int(s.rsplit("-", 1)[1]) for s in doc.slots if s.rsplit("-", 1)[-1].isdigit()}
    index = next(i for i in range(len(taken) + 1) if i not in taken)
    slots = dict(doc.slots)
    slots[f"{slot_prefix}-{index}"] = available[0].id
    return RingDocument(version=doc.version + 1, slots=slots)


def remove_slot(doc: RingDocument, slot: str) -> RingDocument:
    """Drop ``slot``: its keys move to the remaining slots, its instance becomes a spare."""
    if slot not in doc.slots:
        raise RingChangeRefused(f"no slot {slot!r} in the ring")
    if len(doc.slots) == 1:
        raise RingChangeRefused("cannot remove the last slot")
    slots = {s: owner for s, owner in doc.slots.items() if s != slot}
    return RingDocument(version=doc.version + 1, slots=slots)


def check_invariants(doc: RingDocument) -> None:
    owners = [owner for owner in doc.slots.values() if owner]
    if len(owners) != len(set(owners)):
        raise AssertionError(f"an instance serves two slots: {doc.slots}")
