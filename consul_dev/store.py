"""The core of the dev agent's model: the state every domain class shares, and its index bookkeeping."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Protocol

from consul_dev.node import (
    CONSUL_SERVICE_ID,
    CONSUL_VERSION,
    HEALTH_PASSING,
    SERF_CHECK_ID,
    SERF_CHECK_NAME,
    SERF_CHECK_OUTPUT,
    SERVER_RPC_PORT,
    TABLE_CHECKS,
    TABLE_NODES,
    TABLE_SERVICES,
)
from consul_dev.records import Check, IndexTable, KVEntry, Service, Session, Tombstone


class Indexed(Protocol):
    """A stored record: Consul's ``CreateIndex`` and ``ModifyIndex``."""

    create_index: int
    modify_index: int


class StateStore:
    """What every part of the model shares: the clock, the raft-like index, the table indexes, the records.

    Each domain class builds on it (:class:`~consul_dev.kv.KVState`,
    :class:`~consul_dev.sessions.SessionState`, :class:`~consul_dev.agent.AgentState`,
    :class:`~consul_dev.catalog.CatalogState`); :class:`~consul_dev.state.ConsulState`
    completes them with expiry.
    """

    def __init__(
        self,
        now_s: Callable[[], float],
        *,
        node_address: str = "127.0.0.1",
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._now_s = now_s
        self._new_id = new_id
        self._address = node_address
        self._node_id = new_id()
        self._index = 0
        self._pending_index: int | None = None
        self._tables = IndexTable()
        self._service_index: dict[str, int] = {}  # service name -> index, while it has instances
        self._extinction_index = 0  # when the last instance of some service went away
        self._services: dict[str, Service] = {}
        self._checks: dict[str, Check] = {}
        self._kv: dict[str, KVEntry] = {}
        self._tombstones: dict[str, Tombstone] = {}
        self._lock_delay_until_s: dict[str, float] = {}
        self._sessions: dict[str, Session] = {}
        self._bootstrap()

    # ---- bookkeeping ------------------------------------------------------
    @property
    def index(self) -> int:
        """The raft-like index of the last write that changed something."""
        return self._index

    @property
    def node_address(self) -> str:
        return self._address

    def _begin(self) -> None:
        """Start one write operation: its changes share one index, allocated on first use."""
        self._pending_index = None

    def _idx(self) -> int:
        if self._pending_index is None:
            self._index += 1
            self._pending_index = self._index
        return self._pending_index

    def _bootstrap(self) -> None:
        """The node's own records, as a Consul server starts: the ``serfHealth`` check and the ``consul`` service."""
        self._begin()
        idx = self._idx()
        self._tables.touch(TABLE_NODES, idx)
        serf = Check(
            check_id=SERF_CHECK_ID,
            name=SERF_CHECK_NAME,
            status=HEALTH_PASSING,
            notes="",
            output=SERF_CHECK_OUTPUT,
            service_id="",
            check_type="",
            agent_local=False,
            create_index=idx,
            modify_index=idx,
        )
        self._checks[SERF_CHECK_ID] = serf
        self._tables.touch(TABLE_CHECKS, idx)
        consul = Service(
            id=CONSUL_SERVICE_ID,
            name=CONSUL_SERVICE_ID,
            tags=[],
            address="",
            port=SERVER_RPC_PORT,
            meta={"non_voter": "false", "raft_version": "3", "read_replica": "false", "version": CONSUL_VERSION},
            weights={"Passing": 1, "Warning": 1},
            enable_tag_override=False,
            tagged_addresses=None,
            kind="",
            agent_local=False,
            create_index=idx,
            modify_index=idx,
        )
        self._services[CONSUL_SERVICE_ID] = consul
        self._tables.touch(TABLE_SERVICES, idx)
        self._service_index[CONSUL_SERVICE_ID] = idx

    def _stamp(self, record: Indexed, existing: Indexed | None) -> int:
        """Give ``record``, written now, this write's index (keeping the CreateIndex of the one it replaces)."""
        idx = self._idx()
        record.create_index = existing.create_index if existing is not None else idx
        record.modify_index = idx
        return idx

    def _expire(self) -> None:
        """Apply whatever expired by the clock; every public method calls it first.

        :class:`~consul_dev.state.ConsulState` defines it: expiry touches every domain.
        """
        raise NotImplementedError
