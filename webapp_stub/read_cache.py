"""In-memory answers to hot reads that can never outlive a change to the tables they read.

Every Web API call authenticates its token, and every post reads its channel
and checks its membership: one SQLite statement each, for rows that almost
never change (issue 17, docs/publish-path.md). A :class:`ReadCache` keeps such
answers in a dict and empties itself on *any* change to the tables it names,
whoever makes it:

* On this connection, TEMP triggers (``AFTER INSERT/UPDATE/DELETE`` on each
  table, visible to this connection only, so other processes that open the
  file are not affected) call a Python function that empties the cache. Code
  written later that changes those tables (a deactivation, an admin tool in
  the process) is covered without knowing about the cache.
* Until the transaction that made the change has ended (committed or rolled
  back), nothing is cached: what a transaction sees may still be rolled back
  (a savepoint of the group commit, a failed batch), so it must not be kept.
  The store tells its caches when a transaction ends (:meth:`ReadCache.transaction_ended`,
  from ``Database``'s commit and rollback); a cache that had to find it out by itself, on a
  lookup outside any transaction, never would under load, where every post reads inside
  the open group commit: one membership change turned that cache off for good.
* A change committed by another connection (another process on the same
  file) moves SQLite's ``PRAGMA data_version``, read at most every
  ``foreign_check_s`` (:data:`FOREIGN_CHECK_S`; 0: on every lookup): the
  cache empties. Reading it costs about as much as a cached lookup itself,
  and the webapp is the only process that writes these tables.

Sans-I/O: a plain class around the store's connection and clock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Hashable
from typing import Any

# How long a change committed by *another* connection may go unseen (see the module docstring).
FOREIGN_CHECK_S = 0.1
# Entries one cache holds; beyond, it starts over (each entry is a small frozen record).
MAX_CACHED_ENTRIES = 100_000
MISSING: Any = object()  # what :meth:`ReadCache.get` returns for a key it does not hold


class ReadCache:
    """A dict of answers about ``tables``, emptied by any change to them (module docstring)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        name: str,
        tables: tuple[str, ...],
        clock: Callable[[], float],
        *,
        max_entries: int = MAX_CACHED_ENTRIES,
        foreign_check_s: float = FOREIGN_CHECK_S,
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.max_entries = max_entries
        self.foreign_check_s = foreign_check_s
        self._entries: dict[Hashable, Any] = {}
        self._changed = False  # set by the triggers; cleared once no transaction is open
        self._version = conn.execute("PRAGMA data_version").fetchone()[0]
        self._checked_at = clock()
        function = f"rtm_changed_{name}"
        conn.create_function(function, 0, self._on_change)
        for table in tables:
            for change in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS rtm_{name}_{table}_{change.lower()} AFTER {change} "
                    f"ON main.{table} BEGIN SELECT {function}(); END"
                )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def _on_change(self) -> None:
        self._entries.clear()
        self._changed = True

    def transaction_ended(self) -> None:
        """The connection's transaction has just committed or rolled back: a change it made
        is settled, so answers may be kept again (what was kept before it is gone)."""
        if self._changed and not self.conn.in_transaction:
            self._changed = False
            self._entries.clear()

    def get(self, key: Hashable) -> Any:
        """The cached answer for ``key``, or :data:`MISSING` (then read it and :meth:`put` it)."""
        now = self.clock()
        if abs(now - self._checked_at) >= self.foreign_check_s:
            self._checked_at = now
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:  # another connection committed something
                self._entries.clear()
                self._version = version
        if self._changed:
            if self.conn.in_transaction:
                return MISSING
            self._changed = False
            self._entries.clear()
        return self._entries.get(key, MISSING)

    def lookup(self, key: Hashable, read: Callable[[], Any], keep_none: bool = True) -> Any:
        """The cached answer for ``key``, else ``read()``'s, kept (a None only if ``keep_none``)."""
        value = self.get(key)
        if value is MISSING:
            value = read()
            if value is not None or keep_none:
                self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key``, unless a change to the tables is not yet committed."""
        if self._changed and self.conn.in_transaction:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = value
