"""Live views of the fleet kept up to date from Consul watches.

* :class:`RingFollower` holds the current :class:`services.ring.HashRing` for
  one ring document and calls back when its version changes.
* :class:`ServiceDirectory` holds the healthy instances of one service by id.

Both are thin: the watching is :class:`services.discovery.Discovery`'s, the
placement is :class:`services.ring.HashRing`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.discovery import Discovery, Instance
from services.errors import BadDocument
from services.ring import CHANNEL_RING_KEY, HashRing, RingDocument

log = logging.getLogger("rtm.directory")

RingCallback = Callable[[RingDocument, RingDocument], None]
BadDocumentCallback = Callable[[BadDocument], None]
InstancesCallback = Callable[[dict[str, Instance]], None]


class RingFollower:
    """The ring as Consul says it is; ``on_change(old, new)`` on each newer version.

    A value that is not a ring document, or a version older than the one
    applied, is logged, passed to ``on_bad_document`` (the process counts it
    as ``rtm_errors_total{kind="bad_kv"}``) and ignored: the last good ring
    stays. Nothing a value holds can raise out of :meth:`apply_raw`.
    """

    def __init__(
        self,
        discovery: Discovery,
        key: str = CHANNEL_RING_KEY,
        on_change: RingCallback | None = None,
        on_bad_document: BadDocumentCallback | None = None,
    ) -> None:
        self.discovery = discovery
        self.key = key
        self.ring = HashRing()
        self.on_change = on_change
        self.on_bad_document = on_bad_document
        self.bad_documents = 0
        self._ready = asyncio.Event()

    def start(self) -> None:
        self.discovery.watch_key(self.key, self.apply_raw)

    def apply_raw(self, raw: bytes | None) -> None:
        try:
            doc = RingDocument.from_json(raw, self.key)
            if doc.version < self.ring.version:
                raise BadDocument(self.key, f"version {doc.version} is older than the applied {self.ring.version}")
        except BadDocument as exc:
            self.refuse(exc)
            return
        self.apply(doc)

    def refuse(self, exc: BadDocument) -> None:
        self.bad_documents += 1
        log.error("ignoring a bad ring document (keeping v%s): %s", self.ring.version, exc)
        if self.on_bad_document is not None:
            self.on_bad_document(exc)

    def apply(self, doc: RingDocument) -> None:
        old = self.ring.doc
        if doc.slots and self.ring.update(doc):
            log.info("ring %s now at version %s: %s", self.key, doc.version, doc.slots)
            self._ready.set()
            if self.on_change is not None:
                self.on_change(old, doc)

    async def refresh(self) -> None:
        """Read the document now (after a ``not_owner``), without waiting for the watch."""
        _, raw = await self.discovery.get_key(self.key)
        self.apply_raw(raw)

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)


class ServiceDirectory:
    """Healthy instances of one service, by instance id."""

    def __init__(self, discovery: Discovery, service: str, on_change: InstancesCallback | None = None) -> None:
        self.discovery = discovery
        self.service = service
        self.instances: dict[str, Instance] = {}
        self.on_change = on_change
        self._ready = asyncio.Event()

    def start(self) -> None:
        self.discovery.watch_service(self.service, self._apply)

    def _apply(self, instances: list[Instance]) -> None:
        self.instances = {inst.id: inst for inst in instances}
        self._ready.set()
        if self.on_change is not None:
            self.on_change(self.instances)

    def address(self, instance_id: str) -> tuple[str, int] | None:
        inst = self.instances.get(instance_id)
        return None if inst is None else (inst.address, inst.port)

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)
