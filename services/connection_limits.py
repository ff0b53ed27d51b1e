"""Counts of open connections per user and per client address, against their limits, sans I/O.

Shared by the gateway's websockets (gateway/limits.py: its flags and defaults) and the webapp's
public port (webapp_stub/http_limits.py). 0 turns a limit off. :class:`ConnectionLimits` only
counts: the caller refuses and releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConnectionLimits:
    """Counts of open connections per user and per address, against their limits (0: no limit)."""

    max_per_user: int = 0
    max_per_address: int = 0
    users: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)

    def address_full(self, address: str) -> bool:
        """Whether one more connection from ``address`` would pass its limit (nothing counted)."""
        return 0 < self.max_per_address <= self.addresses.get(address, 0)

    def take_address(self, address: str) -> bool:
        """Count a connection from ``address``; False (and nothing counted) when it is at its limit."""
        if self.address_full(address):
            return False
        self.addresses[address] = self.addresses.get(address, 0) + 1
        return True

    def take_user(self, user: str) -> bool:
        """Count a connection of ``user``; False (and nothing counted) when they are at their limit."""
        held = self.users.get(user, 0)
        if 0 < self.max_per_user <= held:
            return False
        self.users[user] = held + 1
        return True

    def release_address(self, address: str) -> None:
        _release(self.addresses, address)

    def release_user(self, user: str) -> None:
        _release(self.users, user)


def _release(counts: dict[str, int], key: str) -> None:
    held = counts.get(key, 0)
    if held <= 1:
        counts.pop(key, None)
    else:
        counts[key] = held - 1
