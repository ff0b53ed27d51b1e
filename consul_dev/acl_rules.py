"""Consul ACL policy rules, as the dev agent evaluates them (sans-I/O).

A token's rules are Consul's policy rules in their JSON form (the form Consul
accepts beside HCL; ``deploy/consul/policies/*.hcl`` says the same in HCL)::

    {"service": {"gateway": {"policy": "write"}},
     "service_prefix": {"": {"policy": "read"}},
     "key_prefix": {"rtm/": {"policy": "read"}, "rtm/ring/": {"policy": "write"}},
     "key": {"rtm/charm/leader": {"policy": "write"}},
     "session_prefix": {"": {"policy": "write"}},
     "node_prefix": {"": {"policy": "read"}}}

Resources: ``key``/``key_prefix``, ``service``/``service_prefix``,
``session``/``session_prefix`` (on a node name), ``node``/``node_prefix``,
``agent``/``agent_prefix``. Dispositions: ``read``, ``write``, ``deny``
(``list`` is accepted and grants read, as it does in Consul).

How a rule is found for a resource name, as Consul's ``policyAuthorizer``
(``acl/policy_authorizer.go``, ``getPolicy``) walks its radix tree along the
name: an **exact** rule for the name wins; otherwise the **longest prefix**
rule that the name starts with. Two rules for the same segment (in one
policy, or merged from several) combine by precedence ``deny > write > list >
read`` (``takesPrecedenceOver``), as the ACL rules reference states ("DENY
has priority over WRITE or READ; WRITE has priority over READ").

What a rule grants (``enforce``): ``write`` grants read and write; ``read``
(and ``list``) grant read only; ``deny`` grants nothing. No rule: the default
policy, which for the dev agent is always ``deny``.

``KeyWritePrefix`` (a recursive KV delete) needs more: the longest *prefix*
rule on the prefix must grant write (an exact ``key`` rule on the same name
does not count) **and** no rule for a key or prefix under it may grant less
(``policyAuthorizer.KeyWritePrefix``).

Bad rules raise :class:`RulesError` (the agent refuses to start with them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Final


class Resource(StrEnum):
    """Consul's ACL resources the dev agent checks (``acl.Resource``)."""

    AGENT = "agent"
    NODE = "node"
    SERVICE = "service"
    KEY = "key"
    SESSION = "session"


class Access(StrEnum):
    """Access levels a request needs (``acl.AccessLevel.String()``)."""

    READ = "read"
    WRITE = "write"


class RulesError(ValueError):
    """A rules document that is not Consul's JSON rule syntax (or uses what the dev agent does not model)."""


class Level(IntEnum):
    """A rule's disposition; the value orders precedence when two rules name the same segment."""

    READ = 1
    LIST = 2
    WRITE = 3
    DENY = 4


_LEVELS: Final = {"read": Level.READ, "list": Level.LIST, "write": Level.WRITE, "deny": Level.DENY}
# The rule blocks (exact, prefix) the dev agent models, by the resource they govern.
RULE_BLOCKS: Final = {
    "key": (Resource.KEY, False),
    "key_prefix": (Resource.KEY, True),
    "service": (Resource.SERVICE, False),
    "service_prefix": (Resource.SERVICE, True),
    "session": (Resource.SESSION, False),
    "session_prefix": (Resource.SESSION, True),
    "node": (Resource.NODE, False),
    "node_prefix": (Resource.NODE, True),
    "agent": (Resource.AGENT, False),
    "agent_prefix": (Resource.AGENT, True),
}


def grants(level: Level, access: Access) -> bool:
    """Consul's ``enforce``: does a rule of ``level`` allow ``access``?"""
    if level is Level.WRITE:
        return True
    if level in (Level.READ, Level.LIST):
        return access is Access.READ
    return False


@dataclass(frozen=True)
class RuleSet:
    """A token's rules: per resource, exact-name rules and prefix rules (segment -> level)."""

    exact: Mapping[Resource, Mapping[str, Level]] = field(default_factory=dict)
    prefix: Mapping[Resource, Mapping[str, Level]] = field(default_factory=dict)

    def level_for(self, resource: Resource, name: str) -> Level | None:
        """The rule that applies to ``name``: its exact rule, else its longest prefix rule; None if none."""
        exact = self.exact.get(resource, {}).get(name)
        if exact is not None:
            return exact
        return self.prefix_level_for(resource, name)

    def prefix_level_for(self, resource: Resource, name: str) -> Level | None:
        """The longest prefix rule that ``name`` starts with (exact rules aside); None if none."""
        best: tuple[int, Level] | None = None
        for segment, level in self.prefix.get(resource, {}).items():
            if name.startswith(segment) and (best is None or len(segment) > best[0]):
                best = (len(segment), level)
        return best[1] if best else None

    def allows(self, resource: Resource, access: Access, name: str) -> bool:
        """True when the applicable rule grants ``access``; no rule: the default policy, deny."""
        level = self.level_for(resource, name)
        return level is not None and grants(level, access)

    def allows_key_write_prefix(self, prefix: str) -> bool:
        """``KeyWritePrefix``: the longest *prefix* rule on ``prefix`` grants write (an exact rule
        for the key named ``prefix`` does not count: it covers that one key, and a recursive delete
        takes every key that starts with it), and so does every rule under it."""
        level = self.prefix_level_for(Resource.KEY, prefix)
        if level is None or not grants(level, Access.WRITE):
            return False
        under = [
            level
            for rules in (self.exact.get(Resource.KEY, {}), self.prefix.get(Resource.KEY, {}))
            for segment, level in rules.items()
            if segment.startswith(prefix)
        ]
        return all(grants(level, Access.WRITE) for level in under)


NO_RULES: Final = RuleSet()


def parse_rules(doc: Any) -> RuleSet:
    """A :class:`RuleSet` from Consul's JSON rule syntax; raises :class:`RulesError`.

    Each block maps a segment to ``{"policy": "<disposition>"}``; a segment
    named twice keeps the rule that takes precedence.
    """
    if not isinstance(doc, Mapping):
        raise RulesError(f"rules must be a JSON object, not {type(doc).__name__}")
    exact: dict[Resource, dict[str, Level]] = {}
    prefix: dict[Resource, dict[str, Level]] = {}
    for block, segments in doc.items():
        if block not in RULE_BLOCKS:
            raise RulesError(f"unsupported rule block {block!r} (the dev agent models {', '.join(RULE_BLOCKS)})")
        if not isinstance(segments, Mapping):
            raise RulesError(f"{block}: must map segments to {{'policy': ...}}")
        resource, is_prefix = RULE_BLOCKS[block]
        table = (prefix if is_prefix else exact).setdefault(resource, {})
        for segment, body in segments.items():
            if not isinstance(segment, str) or not isinstance(body, Mapping) or set(body) != {"policy"}:
                raise RulesError(f"{block} {segment!r}: must be {{'policy': 'read'|'write'|'deny'}}")
            level = _LEVELS.get(body["policy"]) if isinstance(body["policy"], str) else None
            if level is None:
                raise RulesError(f"{block} {segment!r}: invalid policy {body['policy']!r}")
            table[segment] = max(level, table.get(segment, level))
    return RuleSet(exact=exact, prefix=prefix)
