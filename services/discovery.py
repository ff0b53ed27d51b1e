"""Discovery through Consul's HTTP API (py-consul's ``consul.aio``).

* :meth:`Discovery.register` registers this process with a TTL check and
  keeps the check passing from a background loop; :meth:`Discovery.close`
  deregisters it.
* :meth:`Discovery.watch_service` and :meth:`Discovery.watch_key` follow a
  service's healthy instances or a KV key with blocking queries
  (``index`` + ``wait``), never tight polling, and call back on every change.

Works the same against real Consul and against the embedded dev agent, with
ACLs on: every client built here (:func:`sync_client`, :func:`aio_client`)
sends the process's Consul ACL token (``--consul-token`` / ``RTM_CONSUL_TOKEN``
/ ``CONSUL_HTTP_TOKEN``) as ``X-Consul-Token``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import consul
import consul.aio

from services.config import DEFAULT_DEREGISTER_AFTER_S, split_host_port
from services.errors import ConnectionLost
from services.tasks import Tasks

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
    """Run a watch's callback. One that raises is logged and the watch goes on:
    no value in Consul may end a watch (the callback keeps its last good state)."""
    try:
        result = callback(value)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("a watch callback failed on a new value; the watch goes on")


def sync_client(consul_addr: str, token: str = "") -> consul.Consul:
    """A blocking py-consul client for ``host:port`` that sends ``token`` ("" sends none).

    py-consul lets ``CONSUL_HTTP_TOKEN`` override ``token=``; rtm resolves
    the token itself (:func:`services.config.consul_token_default`), so the
    client is told exactly which one to send.
    """
    host, port = split_host_port(consul_addr)
    client = consul.Consul(host=host, port=port, token=token or None)
    client.token = token or None
    return client


def aio_client(consul_addr: str, token: str = "") -> consul.aio.Consul:
    """An asyncio py-consul client (one pooled aiohttp session) that sends ``token``; see :func:`sync_client`."""
    host, port = split_host_port(consul_addr)
    client = consul.aio.Consul(host=host, port=port, token=token or None)
    client.token = token or None
    return client


class Discovery:
    """One process's handle on Consul."""

    def __init__(self, consul_addr: str, token: str = "") -> None:
        host, port = split_host_port(consul_addr)
        self.consul_addr = f"{host}:{port}"
        self.client = aio_client(self.consul_addr, token)
        self._registered: list[str] = []
        self._registrations: dict[str, dict[str, Any]] = {}
        self._tasks = Tasks("discovery")
        self.consul_ok = True  # False while the TTL loop cannot reach Consul
        self.lease_ok_at = time.monotonic()  # when Consul last accepted our TTL pass
        self.on_lease_restored: Callable[[], Awaitable[None]] | None = None
        # Fault injection for partition tests (``--debug-faults``): every
        # Consul call fails as if the network to Consul were cut.
        self.partitioned = False

    def _check_partition(self) -> None:
        if self.partitioned:
            raise ConnectionLost("partitioned from Consul (fault injection)")

    def lease_lapsed(self, ttl_s: float) -> bool:
        """True when Consul has not heard from us for a whole TTL: it has (or
        soon will have) marked us critical, and CHARM may have given our slot away."""
        return time.monotonic() - self.lease_ok_at > ttl_s

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
        self._registrations[instance_id] = dict(
            service=service,
            address=address,
            port=port,
            meta=meta or {},
            ttl_s=ttl_s,
            deregister_after_s=deregister_after_s,
        )
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
        if instance_id not in self._registered:
            self._registered.append(instance_id)
            await self.client.agent.check.ttl_pass(f"service:{instance_id}")
            self.lease_ok_at = time.monotonic()
            self.spawn(self._ttl_loop(instance_id, ttl_s), f"ttl-{instance_id}")

    async def retag(self, instance_id: str, tags: list[str]) -> None:
        """Register again with new tags (Consul keeps the check's status)."""
        self._check_partition()
        reg = self._registrations[instance_id]
        await self.register(
            reg["service"],
            instance_id,
            reg["address"],
            reg["port"],
            tags=tags,
            meta=reg["meta"],
            ttl_s=reg["ttl_s"],
            deregister_after_s=reg["deregister_after_s"],
        )

    async def _ttl_loop(self, instance_id: str, ttl_s: float) -> None:
        check_id = f"service:{instance_id}"
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                self._check_partition()
                await self.client.agent.check.ttl_pass(check_id)
                restored = not self.consul_ok or self.lease_lapsed(ttl_s)
                self.consul_ok = True
                self.lease_ok_at = time.monotonic()
                if restored and self.on_lease_restored is not None:
                    await self.on_lease_restored()
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
    async def healthy(
        self, service: str, index: int | None = None, wait_s: int | None = None
    ) -> tuple[int, list[Instance]]:
        self._check_partition()
        kwargs: dict[str, Any] = {"passing": True}
        if index is not None:
            kwargs.update(index=index, wait=f"{wait_s or BLOCKING_WAIT_S}s")
        new_index, entries = await self.client.health.service(service, **kwargs)
        return int(new_index), [Instance.from_health_entry(e) for e in entries]

    async def get_key(self, key: str, index: int | None = None, wait_s: int | None = None) -> tuple[int, bytes | None]:
        self._check_partition()
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs.update(index=index, wait=f"{wait_s or BLOCKING_WAIT_S}s")
        new_index, data = await self.client.kv.get(key, **kwargs)
        value = None if data is None else data.get("Value")
        return int(new_index or 0), value

    async def get_prefix(self, prefix: str, index: int | None = None) -> tuple[int, dict[str, bytes | None]]:
        """Every key under ``prefix`` and its value; a blocking query when ``index`` is given."""
        self._check_partition()
        kwargs: dict[str, Any] = {"recurse": True}
        if index is not None:
            kwargs.update(index=index, wait=f"{BLOCKING_WAIT_S}s")
        new_index, entries = await self.client.kv.get(prefix, **kwargs)
        return int(new_index), {e["Key"]: e.get("Value") for e in (entries or [])}

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
        return self._watch(service, f"watch-service-{service}", lambda i: self.healthy(service, index=i), on_change)

    def watch_key(self, key: str, on_change: Callback) -> asyncio.Task[None]:
        """Call ``on_change(bytes | None)`` now and whenever the key's value changes."""
        return self._watch(key, f"watch-key-{key}", lambda i: self.get_key(key, index=i), on_change)

    def watch_prefix(self, prefix: str, on_change: Callback) -> asyncio.Task[None]:
        """Call ``on_change(dict[key, bytes])`` now and whenever anything under ``prefix`` changes."""
        return self._watch(f"{prefix}*", f"watch-prefix-{prefix}", lambda i: self.get_prefix(prefix, i), on_change)

    def _watch(
        self,
        what: str,
        task_name: str,
        read: Callable[[int | None], Awaitable[tuple[int, Any]]],
        on_change: Callback,
    ) -> asyncio.Task[None]:
        """One blocking-query loop: ``read(index)`` returns (new index, value); ``on_change(value)``
        now and whenever the value differs. A failed read is retried after WATCH_RETRY_DELAY_S
        with a fresh (non-blocking) query."""

        async def loop() -> None:
            index: int | None = None
            last: Any = object()
            while True:
                try:
                    new_index, value = await read(index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("watch %s failed: %s", what, exc)
                    index = None
                    await asyncio.sleep(WATCH_RETRY_DELAY_S)
                    continue
                # Consul's docs: reset the index if it goes backwards.
                index = new_index if index is None or new_index >= index else None
                if value != last:
                    last = value
                    await _call(on_change, value)

        return self.spawn(loop(), task_name)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self._tasks.spawn(coro, name)

    async def close(self) -> None:
        """Deregister, stop every watch, close the HTTP session."""
        await self.deregister()
        await self._tasks.cancel_all()
        await self.client.close()
