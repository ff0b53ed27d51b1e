"""The embedded dev Consul agent: the subset of Consul's HTTP API the rtm fleet uses.

No Consul binary exists on dev machines or CI, so ``rtm up`` and the tests
start this agent (``python -m consul_dev --host H --port P``, or
``rtm consul-dev``) as its own process and drive it through py-consul, exactly
as they would drive real Consul. It serves agent service/check registration
with TTL checks, health and catalog queries, KV with cas/acquire/release,
sessions with TTL and lock-delay, and blocking queries (``index`` + ``wait``),
with the reply shapes, status codes and error texts of Consul's API docs.

Layout: :mod:`consul_dev.state` is the sans-I/O model (no asyncio, an
injected clock), assembled from one module per domain (kv, sessions, agent,
catalog); :mod:`consul_dev.app` is the thin aiohttp layer, with the handlers
in :mod:`consul_dev.endpoints`.

Production runs real Consul: point every process at it with
``CONSUL_HTTP_ADDR`` (``--consul``), as ``deploy/docker-compose.yml`` does.
"""
