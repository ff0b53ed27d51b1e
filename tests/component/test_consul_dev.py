"""The dev Consul agent as its own process, driven only through py-consul, as a real program would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import consul.aio
import pytest
from consul.base import Response
from consul.callback import CB
from consul.exceptions import BadRequest, ClientError, ConsulException, NotFound

from rtmctl import launcher
from tests.support import async_wait_until, consul_dev_agent, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
TTL_CHECK = "1s"  # short enough to watch expire, long enough to assert "passing" first
BLOCK_WAIT = "1s"
JITTER_S = 1.0 / 16  # Consul adds up to wait/16 to a blocking query's wait
SLACK_S = 0.5
SESSION_TTL_S = 10  # the minimum Consul (and py-consul) accepts


@pytest.fixture(scope="module")
def agent() -> Iterator[launcher.RunningProcess]:
    with consul_dev_agent("consul-dev") as proc:
        yield proc


@pytest.fixture
def c(agent: launcher.RunningProcess) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.ready["port"])


def _text(response: Response) -> str:
    assert response.code == 200, response
    return str(response.body)


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def blocking_queries(client: consul.aio.Consul) -> float:
    return metric(await client.http.get(_text, "/metrics"), "rtm_consul_dev_blocking_queries")


def last_check_status(entries: list[dict[str, Any]]) -> str | None:
    return str(entries[0]["Checks"][-1]["Status"]) if entries else None


# ---- services and TTL checks ---------------------------------------------------------
def test_service_with_ttl_check_goes_critical_passing_then_expires(c: consul.Consul) -> None:
    assert c.agent.service.register(
        "web",
        service_id="web-1",
        port=8080,
        tags=["role=active"],
        meta={"metrics_port": "9100"},
        check=consul.Check.ttl(TTL_CHECK),
    )
    _, entries = c.health.service("web")
    assert last_check_status(entries) == "critical"  # Consul's initial status
    assert c.health.service("web", passing=True)[1] == []

    assert c.agent.check.ttl_pass("service:web-1", notes="serving")
    _, entries = c.health.service("web", passing=True, tag="role=active")
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]
    assert entries[0]["Service"]["Meta"] == {"metrics_port": "9100"}
    assert entries[0]["Node"]["Datacenter"] == "dc1"

    wait_until(lambda: last_check_status(c.health.service("web")[1]) == "critical", 5.0, "TTL expiry")
    check = c.agent.checks()["service:web-1"]
    assert check["Output"] == "TTL expired (last output before timeout follows): serving"
    assert c.health.service("web", passing=True)[1] == []
    assert "web" in c.catalog.services()[1]

    assert c.agent.service.deregister("web-1")
    assert c.health.service("web")[1] == []
    # As against real Consul, py-consul turns the 404 for unknown IDs into False.
    assert c.agent.service.deregister("web-1") is False
    assert c.agent.check.ttl_pass("service:web-1") is False


async def test_blocking_health_query_times_out_then_wakes_on_change(agent: launcher.RunningProcess) -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=agent.ready["port"])
    try:
        await client.agent.service.register("chat", service_id="chat-1", check=consul.Check.ttl("30s"))
        index, entries = await client.health.service("chat", passing=True)
        assert entries == []

        started = time.monotonic()
        same, entries = await client.health.service("chat", passing=True, index=index, wait=BLOCK_WAIT)
        elapsed = time.monotonic() - started
        assert (same, entries) == (index, [])
        assert 1.0 <= elapsed < 1.0 + JITTER_S + SLACK_S

        waiter = asyncio.create_task(client.health.service("chat", passing=True, index=index, wait="20s"))
        await async_wait_until(lambda: blocking_queries(client), 5.0, "the query to block")
        started = time.monotonic()
        await client.agent.check.ttl_pass("service:chat-1")
        new_index, entries = await asyncio.wait_for(waiter, 5.0)
        assert time.monotonic() - started < SLACK_S
        assert int(new_index) > int(index)
        assert [e["Service"]["ID"] for e in entries] == ["chat-1"]
        await client.agent.service.deregister("chat-1")
    finally:
        await client.close()


async def test_blocking_kv_get_wakes_on_put_to_its_key_only(agent: launcher.RunningProcess) -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=agent.ready["port"])
    try:
        index, value = await client.kv.get("ring/doc")
        assert value is None  # absent: None, plus an index to block on
        await client.kv.put("ring/doc", '{"v": 0}')
        index, entry = await client.kv.get("ring/doc")
        assert int(index) == entry["ModifyIndex"]  # an existing key answers with its own ModifyIndex
        waiter = asyncio.create_task(client.kv.get("ring/doc", index=index, wait="20s"))
        await async_wait_until(lambda: blocking_queries(client), 5.0, "the query to block")
        await client.kv.put("ring/other", "unrelated")
        await asyncio.sleep(0.2)  # wait-ok: give a wrongly woken query the chance to answer
        assert not waiter.done()
        await client.kv.put("ring/doc", '{"v": 1}')
        new_index, entry = await asyncio.wait_for(waiter, 5.0)
        assert entry["Value"] == b'{"v": 1}'
        assert int(new_index) == entry["ModifyIndex"] > int(index)
    finally:
        await client.close()


# ---- KV ------------------------------------------------------------------------------------
def test_kv_put_get_delete_recurse_keys_and_cas(c: consul.Consul) -> None:
    assert c.kv.put("cfg/a", "1", flags=7)
    assert c.kv.put("cfg/b/c", b"\x00\x01")
    assert c.kv.put("cfg/empty", None)
    _, entry = c.kv.get("cfg/a")
    assert (entry["Value"], entry["Flags"], entry["LockIndex"]) == (b"1", 7, 0)
    assert c.kv.get("cfg/empty")[1]["Value"] is None
    _, entries = c.kv.get("cfg/", recurse=True)
    assert [e["Key"] for e in entries] == ["cfg/a", "cfg/b/c", "cfg/empty"]
    assert c.kv.get("cfg/b/c")[1]["Value"] == b"\x00\x01"
    assert c.kv.get("cfg/", keys=True, separator="/")[1] == ["cfg/a", "cfg/b/", "cfg/empty"]
    assert c.kv.get("missing/", recurse=True)[1] is None

    modify = entry["ModifyIndex"]
    assert c.kv.put("cfg/a", "2", cas=modify + 1000) is False  # CAS mismatch
    assert c.kv.put("cfg/a", "2", cas=modify) is True
    assert c.kv.put("cfg/a", "3", cas=0) is False  # create-only, but it exists
    assert c.kv.put("cfg/new", "x", cas=0) is True
    assert c.kv.delete("cfg/new", cas=1) is False
    assert c.kv.delete("cfg/a") is True
    assert c.kv.get("cfg/a")[1] is None
    assert c.kv.delete("cfg/", recurse=True) is True
    assert c.kv.get("cfg/", recurse=True)[1] is None


# ---- sessions and locks ------------------------------------------------------------------
def test_two_sessions_contend_for_a_lock(c: consul.Consul) -> None:
    one = c.session.create(name="one", lock_delay=0)
    two = c.session.create(name="two", lock_delay=0)
    assert c.kv.put("locks/leader", "one", acquire=one) is True
    assert c.kv.put("locks/leader", "two", acquire=two) is False
    _, entry = c.kv.get("locks/leader")
    assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (one, 1, b"one")
    assert c.kv.put("locks/leader", "", release=two) is False
    assert c.kv.put("locks/leader", "", release=one) is True
    assert "Session" not in c.kv.get("locks/leader")[1]
    assert c.kv.put("locks/leader", "two", acquire=two) is True
    assert c.kv.get("locks/leader")[1]["LockIndex"] == 2
    assert c.session.destroy(two) is True  # destroying the holder releases the lock
    assert "Session" not in c.kv.get("locks/leader")[1]
    assert c.kv.put("locks/leader", "one", acquire=one) is True  # no lock-delay was set
    assert c.session.destroy(one)
    assert c.session.info(one)[1] is None


def test_lock_delay_blocks_reacquisition_after_destroy(c: consul.Consul) -> None:
    holder = c.session.create(lock_delay=1)
    waiting = c.session.create(lock_delay=0)
    assert c.kv.put("locks/delayed", "h", acquire=holder)
    assert c.session.destroy(holder)
    started = time.monotonic()
    assert c.kv.put("locks/delayed", "w", acquire=waiting) is False
    wait_until(lambda: c.kv.put("locks/delayed", "w", acquire=waiting), 5.0, "lock-delay to end")
    assert time.monotonic() - started >= 0.9
    c.session.destroy(waiting)


def test_session_ttl_expiry_releases_the_lock(c: consul.Consul) -> None:
    session = c.session.create(name="ephemeral", ttl=SESSION_TTL_S, lock_delay=0)
    renewed = c.session.renew(session)
    assert (renewed["ID"], renewed["TTL"], renewed["Behavior"]) == (session, f"{SESSION_TTL_S}s", "release")
    assert c.kv.put("locks/ttl", "mine", acquire=session)
    _, info = c.session.info(session)
    assert info["Name"] == "ephemeral"
    assert session in [s["ID"] for s in c.session.list()[1]]
    wait_until(lambda: "Session" not in c.kv.get("locks/ttl")[1], SESSION_TTL_S + 5.0, "session TTL expiry")
    assert c.session.info(session)[1] is None
    # py-consul's renew raises NotFound on Consul's 404 "Session id '...' not found".
    with pytest.raises(NotFound, match="not found"):
        c.session.renew(session)


def test_renew_of_unknown_session_raises_not_found_as_py_consul_does_for_consul(c: consul.Consul) -> None:
    with pytest.raises(NotFound, match="Session id 'no-such-session' not found"):
        c.session.renew("no-such-session")


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.kv.get("k", dc="dc9"),
        lambda c: c.kv.put("k", "v", dc="dc9"),
        lambda c: c.health.service("web", dc="dc9"),
        lambda c: c.session.create(dc="dc9"),
    ],
)
def test_unknown_datacenter_raises_consul_exception(c: consul.Consul, call: Any) -> None:
    with pytest.raises(ConsulException) as err:
        call(c)
    assert type(err.value) is ConsulException  # the 5xx branch, as for real Consul
    assert str(err.value) == "500 No path to datacenter"


def test_malformed_bodies_get_400_and_the_agent_keeps_serving(c: consul.Consul) -> None:
    before = metric(c.http.get(_text, "/metrics"), "rtm_consul_dev_malformed_bodies_total")
    with pytest.raises(BadRequest, match="Request decode failed"):
        c.http.put(CB.boolean(), "/v1/agent/service/register", data="{not json")
    with pytest.raises(BadRequest, match="Request decode failed"):
        c.http.put(CB.json(), "/v1/session/create", data='{"TTL": 10')
    with pytest.raises(BadRequest, match="Missing service name"):
        c.http.put(CB.boolean(), "/v1/agent/service/register", data=json.dumps({"Port": 1}))
    after = metric(c.http.get(_text, "/metrics"), "rtm_consul_dev_malformed_bodies_total")
    assert after == before + 2
    assert c.agent.self()["Config"]["NodeName"] == "rtm-dev"
    with pytest.raises(NotFound):
        c.http.get(CB.json(allow_404=False), "/v1/no/such/endpoint")
    with pytest.raises(ClientError, match="405 method GET not allowed"):
        c.http.get(CB.json(), "/v1/agent/service/register")
    with pytest.raises(BadRequest, match="not supported by the rtm dev Consul agent"):
        c.health.service("web", filter_expr="Service.Port == 1")


def test_status_healthz_and_metrics(c: consul.Consul) -> None:
    assert c.status.leader() == "127.0.0.1:8300"
    assert c.status.peers() == ["127.0.0.1:8300"]
    assert json.loads(c.http.get(_text, "/healthz")) == {"ok": True}
    text = c.http.get(_text, "/metrics")
    assert metric(text, "rtm_consul_dev_requests_total") > 0
    assert 'endpoint="/healthz"' in text
    # the standard process series, as every rtm process has them (rtm top reads them)
    assert metric(text, "process_cpu_seconds_total") > 0 and metric(text, "process_open_fds") > 0
    assert metric(text, "process_resident_memory_bytes") > 0
