"""``FixedDiscovery``: a test seam with the surface of :class:`services.discovery.Discovery` that the
webapp uses: fixed instance lists, changeable at will (``webapp_stub.app`` re-exports it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.discovery import Instance


class FixedDiscovery:
    """A test seam with Discovery's surface: fixed instance lists, changeable at will.

    ``set_instances(service, [...])`` calls every watcher of ``service`` like a
    Consul watch would. Registrations are recorded in :attr:`registered`.
    """

    def __init__(self, services: dict[str, list[Instance]] | None = None) -> None:
        self.services: dict[str, list[Instance]] = {k: list(v) for k, v in (services or {}).items()}
        self.watchers: dict[str, list[Callable[[list[Instance]], Any]]] = {}
        self.registered: dict[str, dict[str, Any]] = {}
        self.consul_ok = True

    async def register(self, service: str, instance_id: str, address: str, port: int, **kwargs: Any) -> None:
        self.registered[instance_id] = {"service": service, "address": address, "port": port, **kwargs}

    def watch_service(self, service: str, on_change: Callable[[list[Instance]], Any]) -> None:
        self.watchers.setdefault(service, []).append(on_change)
        on_change(list(self.services.get(service, [])))

    def watch_key(self, key: str, on_change: Callable[[Any], Any]) -> None:
        on_change(None)  # no KV here: the key is absent

    def watch_prefix(self, prefix: str, on_change: Callable[[Any], Any]) -> None:
        on_change({})

    def set_instances(self, service: str, instances: list[Instance]) -> None:
        self.services[service] = list(instances)
        for callback in self.watchers.get(service, []):
            callback(list(instances))

    async def deregister(self) -> None:
        self.registered.clear()

    async def close(self) -> None:
        await self.deregister()
        self.watchers.clear()
