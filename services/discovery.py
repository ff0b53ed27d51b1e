"""Discovery through Consul's HTTP API (py-consul's ``consul.aio``).

* :meth:`Discovery.register` registers this process with a TTL check and
  keeps the check passing from a background loop; :meth:`Discovery.close`
  deregisters it.
* :meth:`Discovery.watch_service` and :meth:`Discovery.watch_key` follow a
  service's healthy instances or a KV key with blocking queries
  (``index`` + ``wait``), never tight polling, and call back on every change.

Works the same against real Consul and against the embedded dev agent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import consul
import consul.aio

from services.config import DEFAULT_DEREGISTER_AFTER_S, split_host_port

log = logging.getLogger("rtm.discovery")

BLOCKING_WAIT_S = 30  # how long one blocking query may hang in Consul
WATCH_RETRY_DELAY_S = 0.5  # after a failed query, before asking again
HTTP_TIMEOUT_MARGIN_S = 10.0  # client-side timeout beyond the blocking wait


@dataclass(frozen=True)
class Instance:
    """One registered process as Consul reports it."""

    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def tag(self, key: str, default: str = "") -> str:
        """The value of a ``key=value`` tag."""
        prefix = key + "="
        for tag in self.tags:
            if tag.startswith(prefix):
                return tag[len(prefix) :]
        return default

    @classmethod
    def from_health_entry(cls, entry: dict[str, Any]) -> Instance:
        svc = entry["Service"]
        address = svc.get("Address") or entry.get("Node", {}).get("Address", "127.0.0.1")
        return cls(
            id=svc["ID"],
            service=svc["Service"],
            address=address,
            port=int(svc["Port"]),
            tags=tuple(svc.get("Tags") or ()),
            meta=dict(svc.get("Meta") or {}),
        )


Callback = Callable[[Any], "None | Awaitable[None]"]


async def _call(callback: Callback, value: Any) -> None:
    result = callback(value)
    if inspect.isawaitable(result):
        await result


class Discovery:
    """One process's handle on Consul."""

    def __init__(self, consul_addr: str) -> None:
        host, port = split_host_port(consul_addr)
        self.consul_addr = f"{host}:{port}"
        self.client = consul.aio.Consul(host=host, port=port)
        self._registered: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.consul_ok = True  # False while the TTL loop cannot reach Consul

    # -- registration --------------------------------------------------------
    async def register(
        self,
        service: str,
        instance_id: str,
        address: str,
        port: int,
        *,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        ttl_s: float,
        deregister_after_s: float = DEFAULT_DEREGISTER_AFTER_S,
    ) -> None:
        """Register with a TTL check, mark it passing, and keep it passing."""
        check = {
            "CheckID": f"service:{instance_id}",
            "Name": f"{service} alive",
            "TTL": f"{ttl_s:g}s",
            "DeregisterCriticalServiceAfter": f"{deregister_after_s:g}s",
        }
        await self.client.agent.service.register(
            service,
            service_id=instance_id,
            address=address,
            port=port,
            tags=tags or [],
            meta=meta or {},
            check=check,
        )
        self._registered.append(instance_id)
        await self.client.agent.check.ttl_pass(f"service:{instance_id}")
        self.spawn(self._ttl_loop(instance_id, ttl_s), f"ttl-{instance_id}")

    async def _ttl_loop(self, instance_id: str, ttl_s: float) -> None:
        check_id = f"service:{instance_id}"
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                await self.client.agent.check.ttl_pass(check_id)
                self.consul_ok = True
            except Exception as exc:  # Consul down or restarted: keep trying
                if self.consul_ok:
                    log.warning("TTL pass for %s failed: %s", instance_id, exc)
                self.consul_ok = False

    async def deregister(self) -> None:
        for instance_id in self._registered:
            try:
                await self.client.agent.service.deregister(instance_id)
            except Exception as exc:
                log.warning("deregister %s failed: %s", instance_id, exc)
        self._registered.clear()

    # -- queries --------------------------------------------------------------
    async def healthy(self, service: str, index: int | None = None, wait_s: int | None = None) -> tuple[int, list[Instance]]:
        kwargs: dict[str, Any] = {"passing": True}
        if index is not None:
            kwargs.update(index=index, wait=f"{wait_s or BLOCKING_WAIT_S}s")
        new_index, entries = await self.client.health.service(service, **kwargs)
        return int(new_index), [Instance.from_health_entry(e) for e in entries]

    async def get_key(self, key: str, index: int | None = None, wait_s: int | None = None) -> tuple[int, bytes | None]:
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs.update(index=index, wait=f"{wait_s or BLOCKING_WAIT_S}s")
        new_index, data = await self.client.kv.get(key, **kwargs)
        value = None if data is None else data.get("Value")
        return int(new_index or 0), value

    async def put_key(self, key: str, value: bytes, cas: int | None = None) -> bool:
        return bool(await self.client.kv.put(key, value, cas=cas))

    async def key_modify_index(self, key: str) -> tuple[int, bytes | None]:
        """(ModifyIndex, value) of ``key``; (0, None) when absent. For CAS writes."""
        _, data = await self.client.kv.get(key)
        if data is None:
            return 0, None
        return int(data["ModifyIndex"]), data.get("Value")

    # -- watches ---------------------------------------------------------------
    def watch_service(self, service: str, on_change: Callback) -> asyncio.Task[None]:
        """Call ``on_change(list[Instance])`` now and on every change of the healthy set."""

        async def loop() -> None:
            index: int | None = None
            last: list[Instance] | None = None
            while True:
                try:
                    index, instances = await self.healthy(service, index=index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("watch %s failed: %s", service, exc)
                    index = None
                    await asyncio.sleep(WATCH_RETRY_DELAY_S)
                    continue
                if instances != last:
                    last = instances
                    await _call(on_change, instances)

        return self.spawn(loop(), f"watch-service-{service}")

    def watch_key(self, key: str, on_change: Callback) -> asyncio.Task[None]:
        """Call ``on_change(bytes | None)`` now and whenever the key's value changes."""

        async def loop() -> None:
            index: int | None = None
            last: Any = object()
            while True:
                try:
                    new_index, value = await self.get_key(key, index=index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("watch %s failed: %s", key, exc)
                    index = None
                    await asyncio.sleep(WATCH_RETRY_DELAY_S)
                    continue
                # Consul's docs: reset the index if it goes backwards.
                index = new_index if index is None or new_index >= index else None
                if value != last:
                    last = value
                    await _call(on_change, value)

        return self.spawn(loop(), f"watch-key-{key}")

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Deregister, stop every watch, close the HTTP session."""
        await self.deregister()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()
