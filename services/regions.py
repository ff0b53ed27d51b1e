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

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from services.errors import BadDocument
from services.kv_document import expect_object, load_json

REGION_MAP_KEY = "rtm/regions/map"
DRAINED_PREFIX = "rtm/regions/drained/"
REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # us-east, eu-west-1
MAX_REGIONS = 256


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
    """The region map in ``raw`` ({} when absent), or :class:`BadDocument` (a ``ValueError``):
    an object of at most :data:`MAX_REGIONS` region names, each to a list of region names."""
    if not raw:
        return {}
    data = expect_object(REGION_MAP_KEY, load_json(REGION_MAP_KEY, raw))
    if len(data) > MAX_REGIONS:
        raise BadDocument(REGION_MAP_KEY, f"{len(data)} regions is above MAX_REGIONS ({MAX_REGIONS})")
    region_map: dict[str, list[str]] = {}
    for region, fallbacks in data.items():
        if not REGION_RE.fullmatch(region):
            raise BadDocument(REGION_MAP_KEY, f"{region[:40]!r} is not a region name")
        if type(fallbacks) is not list or len(fallbacks) > MAX_REGIONS:
            raise BadDocument(REGION_MAP_KEY, f"the fallbacks of {region} must be a list of region names")
        for other in fallbacks:
            if type(other) is not str or not REGION_RE.fullmatch(other):
                raise BadDocument(REGION_MAP_KEY, f"fallback {other!r:.40} of {region} is not a region name")
        region_map[region] = list(fallbacks)
    return region_map


def drained_regions(keys: Iterable[str]) -> tuple[set[str], list[str]]:
    """(drained regions, refused keys) from the keys under :data:`DRAINED_PREFIX`: a key whose
    rest is not a region name drains nothing and is returned to be logged and counted."""
    drained: set[str] = set()
    refused: list[str] = []
    for key in keys:
        region = key.removeprefix(DRAINED_PREFIX) if isinstance(key, str) else ""
        if REGION_RE.fullmatch(region) and key.startswith(DRAINED_PREFIX):
            drained.add(region)
        else:
            refused.append(str(key)[:100])
    return drained, refused


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
