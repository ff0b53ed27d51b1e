"""The KV store of the dev agent's model: get, list, keys, put (cas, acquire, release), delete, tombstones."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from consul_dev.errors import InvalidRequest, RequestTooLarge, ServerError
from consul_dev.go_json import Json
from consul_dev.go_text import go_quote
from consul_dev.node import KV_MAX_VALUE_BYTES, TABLE_KVS, TABLE_TOMBSTONES
from consul_dev.records import KVEntry, Tombstone
from consul_dev.store import StateStore


class KVState(StateStore):
    """Consul's KV: entries with flags, lock holders and lock-delays; deleted keys leave tombstones."""

    def _kv_table_index(self) -> int:
        return self._tables.get(TABLE_KVS, TABLE_TOMBSTONES)

    @staticmethod
    def _kv_json(entry: KVEntry) -> Json:
        body: dict[str, Any] = {
            "LockIndex": entry.lock_index,
            "Key": entry.key,
            "Flags": entry.flags,
            # Consul stores an empty body as a nil value, which JSON shows as null.
            "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        }
        if entry.session:
            body["Session"] = entry.session
        body["CreateIndex"] = entry.create_index
        body["ModifyIndex"] = entry.modify_index
        return body

    def kv_get(self, key: str) -> tuple[int, list[Json]]:
        """``GET /v1/kv/<key>``: ``[entry]``, or ``[]`` (HTTP 404) when absent.

        The index is the key's ModifyIndex, or the KV table's index when absent.
        """
        self._expire()
        entry = self._kv.get(key)
        if entry is None:
            return max(self._kv_table_index(), 1), []
        return entry.modify_index, [self._kv_json(entry)]

    def kv_raw(self, key: str) -> tuple[int, bytes | None]:
        """``GET /v1/kv/<key>?raw``: the value bytes, or None when absent."""
        index, entries = self.kv_get(key)
        entry = self._kv.get(key)
        return index, (entry.value if entries and entry is not None else None)

    def _prefix_index(self, prefix: str, entries: Iterable[KVEntry]) -> int:
        """Consul's ``kvsListTxn`` index: max of entries and tombstones under prefix, else the table's."""
        table = self._kv_table_index()
        if prefix == "":
            return max(table, 1)
        sub = max((e.modify_index for e in entries), default=0)
        tomb = max((t.index for k, t in self._tombstones.items() if k.startswith(prefix)), default=0)
        sub = max(sub, tomb)
        return max(sub or table, 1)

    def kv_list(self, prefix: str) -> tuple[int, list[Json]]:
        """``GET /v1/kv/<prefix>?recurse``: every entry under ``prefix`` in key order ([] = 404)."""
        self._expire()
        entries = [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]
        return self._prefix_index(prefix, entries), [self._kv_json(e) for e in entries]

    def kv_keys(self, prefix: str, separator: str = "") -> tuple[int, list[str] | None]:
        """``GET /v1/kv/<prefix>?keys[&separator=/]``: key names, rolled up at ``separator``.

        Returns None (HTTP 404) when nothing matches a non-empty prefix.
        """
        self._expire()
        entries = [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]
        keys: list[str] = []
        for entry in entries:
            if not separator:
                keys.append(entry.key)
                continue
            after = entry.key[len(prefix) :]
            cut = after.find(separator)
            name = entry.key[: len(prefix) + cut + len(separator)] if cut >= 0 else entry.key
            if not keys or keys[-1] != name:
                keys.append(name)
        index = self._prefix_index(prefix, entries)
        if not keys and prefix != "":
            return index, None
        return index, keys

    def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        flags: int = 0,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """``PUT /v1/kv/<key>``: set, check-and-set, lock or unlock; returns Consul's true/false.

        * plain set: always True; keeps the key's Session (and, as Consul does,
          resets LockIndex to 0);
        * ``cas=0``: only if the key does not exist; ``cas=N``: only if its
          ModifyIndex is N;
        * ``acquire=S``: False if another session holds the key or the key is
          in lock-delay; LockIndex increments when a new holder takes it;
        * ``release=S``: False unless S holds the key; clears Session, keeps LockIndex.

        Raises :class:`InvalidRequest` when more than one of cas/acquire/release
        is given, :class:`RequestTooLarge` above 512 KiB, :class:`ServerError`
        for an unknown or empty session.
        """
        self._expire()
        _check_kv_put(key, value, cas, acquire, release)
        now = self._now_s()
        self._begin()
        existing = self._kv.get(key)
        if acquire is not None:
            return self._kv_acquire(KVEntry(key, value, flags, acquire, 0), existing, now)
        if release is not None:
            return self._kv_release(KVEntry(key, value, flags, release, 0), existing)
        if cas is not None and cas != (existing.modify_index if existing is not None else 0):
            return False
        self._kv_set(KVEntry(key, value, flags, existing.session if existing else "", 0))
        return True

    def _kv_acquire(self, entry: KVEntry, existing: KVEntry | None, now: float) -> bool:
        """Take the lock on ``entry.key`` for ``entry.session``: False while another session holds it or in lock-delay."""
        if self._lock_delay_until_s.get(entry.key, 0.0) > now:
            return False
        if entry.session == "":
            raise ServerError("missing session")
        if entry.session not in self._sessions:
            raise ServerError(f"invalid session {go_quote(entry.session)}")
        if existing is not None and existing.session not in ("", entry.session):
            return False
        if existing is None:
            entry.lock_index = 1
        elif existing.session == entry.session:
            entry.lock_index = existing.lock_index
        else:
            entry.lock_index = existing.lock_index + 1  # a new holder
        self._kv_set(entry)
        return True

    def _kv_release(self, entry: KVEntry, existing: KVEntry | None) -> bool:
        """Release the lock ``entry.session`` holds on ``entry.key``: clears Session, keeps LockIndex."""
        if entry.session == "":
            raise ServerError("missing session")
        if existing is None or existing.session != entry.session:
            return False
        self._kv_set(replace(entry, session="", lock_index=existing.lock_index))
        return True

    def _kv_set(self, entry: KVEntry) -> None:
        existing = self._kv.get(entry.key)
        if existing is not None and existing.same_as(entry):
            return
        idx = self._stamp(entry, existing)
        self._kv[entry.key] = entry
        self._tables.touch(TABLE_KVS, idx)

    def _kv_delete(self, key: str, *, at_s: float) -> None:
        if key not in self._kv:
            return
        del self._kv[key]
        idx = self._idx()
        self._tombstones[key] = Tombstone(idx, at_s)
        self._tables.touch(TABLE_KVS, idx)
        self._tables.touch(TABLE_TOMBSTONES, idx)

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """``DELETE /v1/kv/<key>``: delete one key, a prefix (``recurse``), or check-and-delete.

        Plain and recursive deletes always return True (deleting nothing is
        fine). With ``cas=N`` the key is deleted only if its ModifyIndex is N;
        as in Consul, a CAS delete of an absent key returns True.
        Raises :class:`InvalidRequest` for recurse with cas, or an empty key without recurse.
        """
        self._expire()
        if recurse and cas is not None:
            raise InvalidRequest("Conflicting flags: recurse and cas cannot be combined")
        if key == "" and not recurse:
            raise InvalidRequest("Missing key name")
        now = self._now_s()
        self._begin()
        if recurse:
            for k in [k for k in sorted(self._kv) if k.startswith(key)]:
                self._kv_delete(k, at_s=now)
            return True
        if cas is not None:
            existing = self._kv.get(key)
            if existing is None or existing.modify_index != cas:
                return existing is None
        self._kv_delete(key, at_s=now)
        return True

    # ---- sessions --------------------------------------------------------------


def _check_kv_put(key: str, value: bytes, cas: int | None, acquire: str | None, release: str | None) -> None:
    """What Consul refuses before a KV put touches anything: raises :class:`InvalidRequest`, :class:`RequestTooLarge`."""
    if sum(x is not None for x in (cas, acquire, release)) > 1:
        raise InvalidRequest("Conflicting flags: only one of cas, acquire and release may be given")
    if key == "":
        raise InvalidRequest("Missing key name")
    if len(value) > KV_MAX_VALUE_BYTES:
        raise RequestTooLarge(
            f"Request body({len(value)} bytes) too large, max size: {KV_MAX_VALUE_BYTES} bytes. "
            "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
        )
