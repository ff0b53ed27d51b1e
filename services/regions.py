"""Gateway regions, pure: the region map, drained regions, and which gateway a client gets.

Consul KV holds:

* ``rtm/regions/map``: ``{"us-east": ["eu-west"], "eu-west": ["us-east"]}``:
  for each region, the other regions in order of preference (nearest first).
  ``rtm up`` writes it from ``--regions`` (each region's fallbacks are the
  others in the order given); an operator may write any order.
* ``rtm/regions/drained/<region>``: present while the region is drained
  (``rtm drain REGION`` / ``rtm undrain REGION``). Its gateways move their
  clients away and accept none; ``rtm.connect`` sends nobody there.

:func:`choose_gateway` is what ``rtm.connect`` does: a healthy, non-draining
gateway in the client's region (its hint, else the default), the least
loaded one; if the region has none, the nearest good region's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Protocol

REGION_MAP_KEY = "rtm/regions/map"
DRAINED_PREFIX = "rtm/regions/drained/"


class GatewayLike(Protocol):
    @property
    def id(self) -> str: ...

    def tag(self, key: str, default: str = "") -> str: ...


def drained_key(region: str) -> str:
    return DRAINED_PREFIX + region


def default_map(regions: Sequence[str]) -> dict[str, list[str]]:
    """Each region falls back to the others in the order given."""
    return {r: [o for o in regions if o != r] for r in regions}


def parse_map(raw: bytes | str | None) -> dict[str, list[str]]:
    if not raw:
        return {}
    data = json.loads(raw)
    return {str(k): [str(x) for x in v] for k, v in dict(data).items()}


def preference(region: str, region_map: Mapping[str, Sequence[str]], known: Sequence[str]) -> list[str]:
    """Regions to try for a client of ``region``: itself, its fallbacks, then any other known one."""
    order = [region] if region else []
    for other in list(region_map.get(region, ())) + sorted(known):
        if other not in order:
            order.append(other)
    return order


def choose_gateway(
    gateways: Sequence[GatewayLike],
    region: str,
    region_map: Mapping[str, Sequence[str]],
    drained: set[str],
    load: Mapping[str, int],
) -> GatewayLike | None:
    """The gateway for a client of ``region``, or None when no region can take it.

    ``load`` is each gateway's connection count (plus tickets issued since it
    was read); ties go to the lowest id, so the choice is deterministic.
    """
    usable = [g for g in gateways if g.tag("role") != "draining" and g.tag("region") not in drained]
    known = sorted({g.tag("region") for g in usable})
    for candidate_region in preference(region, region_map, known):
        here = [g for g in usable if g.tag("region") == candidate_region]
        if here:
            return min(here, key=lambda g: (load.get(g.id, 0), g.id))
    return None
