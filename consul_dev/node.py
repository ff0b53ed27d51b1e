"""The dev agent's one node (``rtm-dev`` in ``dc1``), and the statuses and limits its model follows.

Every number here is Consul's own (its docs or its defaults), so a client sees
the limits real Consul would apply.
"""

from __future__ import annotations

from typing import Final

# -- identity of the single dev node
NODE_NAME: Final = "rtm-dev"
DATACENTER: Final = "dc1"
CONSUL_VERSION: Final = "1.21.0"  # the Consul release whose API this agent mimics
SERVER_RPC_PORT: Final = 8300
SERF_LAN_PORT: Final = 8301
SERF_CHECK_ID: Final = "serfHealth"
SERF_CHECK_NAME: Final = "Serf Health Status"
SERF_CHECK_OUTPUT: Final = "Agent alive and reachable"
CONSUL_SERVICE_ID: Final = "consul"  # the catalog-only service every Consul server registers

HEALTH_PASSING: Final = "passing"
HEALTH_WARNING: Final = "warning"
HEALTH_CRITICAL: Final = "critical"
HEALTH_ANY: Final = "any"
VALID_STATUSES: Final = (HEALTH_PASSING, HEALTH_WARNING, HEALTH_CRITICAL)

SESSION_RELEASE: Final = "release"
SESSION_DELETE: Final = "delete"

# -- limits, all from Consul's docs or defaults
DEFAULT_LOCK_DELAY_S: Final = 15.0  # session create default
MAX_LOCK_DELAY_S: Final = 60.0  # Consul caps lock-delay at 60 s when it applies it
SESSION_TTL_MIN_S: Final = 10.0  # session_ttl_min default
SESSION_TTL_MAX_S: Final = 86400.0
# Docs: "The minimum timeout is 1 minute" for DeregisterCriticalServiceAfter.
DEREGISTER_CRITICAL_MIN_S: Final = 60.0
CHECK_OUTPUT_MAX_BYTES: Final = 4096  # TTL check output is truncated beyond 4 KiB
KV_MAX_VALUE_BYTES: Final = 512 * 1024  # kv_max_value_size default
# Tombstones keep a deleted key's index so prefix indexes never slide back;
# Consul reaps them after tombstone_ttl (15 minutes).
TOMBSTONE_TTL_S: Final = 15 * 60.0
META_MAX_PAIRS: Final = 64
META_KEY_MAX_LEN: Final = 128
META_VALUE_MAX_LEN: Final = 512
TTL_EXPIRED_OUTPUT: Final = "TTL expired"

NS_PER_S: Final = 1_000_000_000
# FixupLockDelay: numbers below this many nanoseconds are taken as seconds.
LOCK_DELAY_SECONDS_THRESHOLD_NS: Final = 1000

# State-store tables: each keeps the max index of its writes, which queries answer with.
TABLE_NODES: Final = "nodes"
TABLE_SERVICES: Final = "services"
TABLE_CHECKS: Final = "checks"
TABLE_KVS: Final = "kvs"
TABLE_TOMBSTONES: Final = "tombstones"
TABLE_SESSIONS: Final = "sessions"
