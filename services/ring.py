"""The consistent-hash ring, pure: no I/O, no clock.

Ring nodes are *slot names* (``cs-0``, ``cs-1``, ...), never instances, so
replacing a failed instance only rewrites one entry of the slot map and moves
exactly that slot's channels to exactly one new owner. The hash is ketama
(uhashring), the placement memcached clients use.

The ring document lives in Consul KV (``rtm/ring/channel``, and
``rtm/ring/presence`` for users on presence servers)::

    {"version": 7, "slots": {"cs-0": "cs-a1b2", "cs-1": "cs-c3d4", "cs-2": null}}

``version`` only ever grows; a ``null`` instance means the slot has no owner
right now. CHARM's leader is its only writer (with CAS); everyone else reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from uhashring import HashRing as _Ketama

CHANNEL_RING_KEY = "rtm/ring/channel"
PRESENCE_RING_KEY = "rtm/ring/presence"
# The CHARM leader's lock; its value names the leader: {"id", "host", "port"}.
CHARM_LEADER_KEY = "rtm/charm/leader"
# Lookups are cached per key until the version changes; the bound keeps a
# gateway that sees millions of distinct channels from growing without limit.
MAX_CACHED_LOOKUPS = 200_000


@dataclass(frozen=True)
class RingDocument:
    """What the ring says at one version: slot name -> instance id (or None)."""

    version: int
    slots: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "slots": self.slots}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> RingDocument:
        if not raw:
            return cls(version=0, slots={})
        data: dict[str, Any] = json.loads(raw)
        slots = {str(k): (None if v is None else str(v)) for k, v in dict(data.get("slots", {})).items()}
        return cls(version=int(data.get("version", 0)), slots=slots)

    def slots_of(self, instance_id: str) -> list[str]:
        return [slot for slot, owner in self.slots.items() if owner == instance_id]

    def with_owner(self, slot: str, instance_id: str | None) -> RingDocument:
        """A new document, one version later, with ``slot`` mapped to ``instance_id``."""
        slots = dict(self.slots)
        slots[slot] = instance_id
        return RingDocument(version=self.version + 1, slots=slots)


def slot_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


class HashRing:
    """Maps keys (channel or user ids) to slots and owners for one ring document.

    ``update(doc)`` swaps the document; the per-key cache is dropped only when
    the set of slots changes (a remap of a slot to a new instance keeps every
    key's slot, so only the owner lookup, a dict access, changes).
    """

    def __init__(self, doc: RingDocument | None = None) -> None:
        self.doc = RingDocument(version=0, slots={})
        self._ketama: _Ketama | None = None
        self._slot_cache: dict[str, str] = {}
        self._adopted = False  # the first document is adopted whatever its version
        if doc is not None:
            self.update(doc)

    @property
    def version(self) -> int:
        return self.doc.version

    def update(self, doc: RingDocument) -> bool:
        """Adopt ``doc`` if it is newer; return True when it was adopted."""
        if doc.version <= self.doc.version and self._adopted:
            return False
        if set(doc.slots) != set(self.doc.slots) or self._ketama is None:
            self._ketama = _Ketama(nodes=sorted(doc.slots), hash_fn="ketama") if doc.slots else None
            self._slot_cache = {}
        self.doc = doc
        self._adopted = True
        return True

    def slot_for(self, key: str) -> str | None:
        slot = self._slot_cache.get(key)
        if slot is not None:
            return slot
        if self._ketama is None:
            return None
        slot = str(self._ketama.get_node(key))
        if len(self._slot_cache) >= MAX_CACHED_LOOKUPS:
            self._slot_cache.clear()
        self._slot_cache[key] = slot
        return slot

    def owner_for(self, key: str) -> str | None:
        """The instance id serving ``key`` in this version, or None."""
        slot = self.slot_for(key)
        return None if slot is None else self.doc.slots.get(slot)
