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
Readers parse strictly (:meth:`RingDocument.from_json`: an object, an
integer version in ``[0, 2**53)``, at most :data:`MAX_RING_SLOTS` slots of
non-empty names, each owned by an instance id or ``null``) and adopt only a
newer version (:class:`HashRing`); anything else is a
:class:`services.errors.BadDocument`, logged, counted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from uhashring import HashRing as _Ketama

from services.errors import BadDocument
from services.kv_document import expect_object, expect_version, load_json

CHANNEL_RING_KEY = "rtm/ring/channel"
PRESENCE_RING_KEY = "rtm/ring/presence"
# The slot names of each ring: "<prefix>-<n>" (slot_names); `rtm kill` and `rtm logs` take them.
CHANNEL_SLOT_PREFIX = "cs"
PRESENCE_SLOT_PREFIX = "ps"
# The CHARM leader's lock; its value names the leader: {"id", "host", "port"}.
CHARM_LEADER_KEY = "rtm/charm/leader"
# Lookups are cached per key until the version changes; the bound keeps a
# gateway that sees millions of distinct channels from growing without limit.
MAX_CACHED_LOOKUPS = 200_000
MAX_RING_SLOTS = 4096  # a ring with more slots than this is not one CHARM wrote
MAX_SLOT_NAME_CHARS = 64
MAX_OWNER_ID_CHARS = 128


@dataclass(frozen=True)
class RingDocument:
    """What the ring says at one version: slot name -> instance id (or None)."""

    version: int
    slots: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "slots": self.slots}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None, key: str = "ring") -> RingDocument:
        """The document in ``raw``; an absent or empty value is version 0 with no slots.

        Raises :class:`services.errors.BadDocument` (a ``ValueError``) for anything
        else that is not a ring document, and nothing else.
        """
        if not raw:
            return cls(version=0, slots={})
        data = expect_object(key, load_json(key, raw))
        version = expect_version(key, data.get("version"))
        slots = data.get("slots", {})
        if type(slots) is not dict:
            raise BadDocument(key, f"slots must be an object, not {type(slots).__name__}")
        if len(slots) > MAX_RING_SLOTS:
            raise BadDocument(key, f"{len(slots)} slots is above MAX_RING_SLOTS ({MAX_RING_SLOTS})")
        for slot, owner in slots.items():
            if not 0 < len(slot) <= MAX_SLOT_NAME_CHARS:
                raise BadDocument(key, f"slot name {slot[:40]!r} is empty or too long")
            if owner is not None and (type(owner) is not str or not 0 < len(owner) <= MAX_OWNER_ID_CHARS):
                raise BadDocument(key, f"owner of {slot} must be an instance id or null, not {owner!r:.60}")
        return cls(version=version, slots=dict(slots))

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
