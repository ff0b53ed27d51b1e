"""Which gateway ``rtm.connect`` hands out: healthy, in the caller's region, least loaded."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from services import regions
from services.discovery import Instance

log = logging.getLogger("rtm.webapp.api")
GATEWAY_LOAD_POLL_S = 1.0  # how often rtm.connect's view of gateway connection counts is refreshed
MAX_STICKY_KEYS = 100_000  # apps whose gateway is remembered; the oldest is forgotten first


class GatewayPicker:
    """Which gateway ``rtm.connect`` hands out (see :mod:`services.regions`).

    The Consul watches keep :attr:`instances` (healthy gateways), the region
    map and the drained regions current; :meth:`poll_load_loop` reads each
    gateway's connection count from its ``/healthz``, and every ticket issued
    counts as one more connection until the next reading.
    """

    def __init__(self, region_map: dict[str, list[str]] | None = None) -> None:
        self.instances: list[Instance] = []
        self.config_map = dict(region_map or {})
        self.consul_map: dict[str, list[str]] = {}
        self.drained: set[str] = set()
        self.load: dict[str, int] = {}
        self.sticky: dict[str, str] = {}  # app id -> the gateway its Socket Mode connections were given

    def set_instances(self, instances: list[Instance]) -> None:
        self.instances = sorted(instances, key=lambda inst: inst.id)

    def set_region_map(self, raw: bytes | None) -> None:
        try:
            self.consul_map = regions.parse_map(raw)
        except (ValueError, TypeError):
            log.error("ignoring an unreadable region map in Consul: %r", raw)

    def set_drained(self, entries: dict[str, Any]) -> None:
        self.drained, refused = regions.drained_regions(entries)
        if refused:
            log.error("ignoring drain flags that name no region: %s", refused[:10])

    def pick_sticky(self, key: str, region: str = "") -> Instance | None:
        """The gateway ``key`` (an app) was last given, while it is healthy and not draining;
        else a new pick, remembered. All of an app's Socket Mode connections land on one
        gateway, which hands each event to exactly one of them (gateway/socket_mode.py)."""
        region_map = self.consul_map or self.config_map
        previous = self.sticky.get(key)
        if previous is not None:
            usable = regions.choose_gateway(
                [g for g in self.instances if g.id == previous], "", region_map, self.drained, {}
            )
            if usable is not None:
                self.load[usable.id] = self.load.get(usable.id, 0) + 1
                return usable  # type: ignore[return-value]
        chosen = self.pick(region)
        if chosen is not None:
            self.sticky.pop(key, None)
            while len(self.sticky) >= MAX_STICKY_KEYS:
                self.sticky.pop(next(iter(self.sticky)))
            self.sticky[key] = chosen.id
        return chosen

    def pick(self, region: str = "") -> Instance | None:
        region_map = self.consul_map or self.config_map
        chosen = regions.choose_gateway(self.instances, region, region_map, self.drained, self.load)
        if chosen is not None:
            self.load[chosen.id] = self.load.get(chosen.id, 0) + 1
        return chosen  # type: ignore[return-value]

    async def poll_load_loop(self, interval_s: float = GATEWAY_LOAD_POLL_S) -> None:
        """Read every gateway's connection count from its /healthz, forever."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=interval_s)) as http:
            while True:
                for inst in list(self.instances):
                    port = inst.meta.get("metrics_port")
                    if not port:
                        continue
                    try:
                        async with http.get(f"http://{inst.address}:{port}/healthz") as resp:
                            self.load[inst.id] = int((await resp.json())["connections"])
                    except Exception as exc:  # a gateway that does not answer keeps its last count
                        log.debug("load of %s unknown: %s", inst.id, exc)
                await asyncio.sleep(interval_s)
