"""gateway.client_listener: a moved connection's bootstrap is asked again when the webapp does not answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

import gateway.client_listener
from gateway.app import Gateway, build_parser
from services.errors import CloseCode, ResumeLost
from services.ticket import Ticket, mint
from tests.support import FleetCA

BOOT = {"ok": True, "user": {"id": "U1"}, "team": {"id": "T1"}, "channels": [{"id": "C1", "seq": 4}]}


class SlowWebapp:
    """``/internal/bootstrap`` that times out ``failures`` times, then answers."""

    def __init__(self, failures: int, resumed: bool = False) -> None:
        self.failures = failures
        self.resumed = resumed
        self.calls: list[dict[str, Any]] = []
        self.confirms: list[dict[str, Any]] = []

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path == "/internal/resume/confirm":
            self.confirms.append(body)
            return {"ok": True, "confirmed": True}
        assert path == "/internal/bootstrap"
        self.calls.append(body)
        if self.failures:
            self.failures -= 1
            raise TimeoutError()
        return {**BOOT, "resumed": True} if self.resumed else BOOT

    async def close(self) -> None:
        pass


@pytest.fixture
async def gw(fleet_ca: FleetCA, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setattr(gateway.client_listener, "BOOTSTRAP_RETRY_DELAY_S", 0.0)
    args = ["--secret", "s", "--instance-id", "gw-test", *fleet_ca.flags("gateway", "gw-test")]
    built = Gateway(build_parser().parse_args(args))
    yield built
    built.channel_links.stop_retries()
    for task in list(built.tasks):
        task.cancel()
    await asyncio.gather(*built.tasks, return_exceptions=True)
    await built.discovery.close()


def ticket(resume: str = "") -> Ticket:
    return Ticket("U1", "T1", "gw-test", time.time() + 30, "nonce-1", resume=resume)


def retries(gw: Gateway) -> float:
    return float(gw.listener.bootstrap_retries._value.get())  # type: ignore[attr-defined]


async def test_a_moved_connections_bootstrap_is_asked_again_with_the_same_nonce(gw: Gateway) -> None:
    """The first call timed out, maybe after the webapp took the resume record: the retry names
    the same record and ticket nonce, so the webapp hands the record out again."""
    webapp = gw.listener.webapp = SlowWebapp(failures=2, resumed=True)
    assert await gw.listener.bootstrap(ticket(resume="R1")) == {**BOOT, "resumed": True}
    assert webapp.calls == [{"user": "U1", "resume": "R1", "nonce": "nonce-1"}] * 3
    assert retries(gw) == 2


async def test_a_moved_connections_bootstrap_gives_up_after_its_attempts(gw: Gateway) -> None:
    webapp = gw.listener.webapp = SlowWebapp(failures=10)
    with pytest.raises(TimeoutError):
        await gw.listener.bootstrap(ticket(resume="R1"))
    assert len(webapp.calls) == gw.args.bootstrap_attempts == gateway.client_listener.BOOTSTRAP_ATTEMPTS


async def test_a_fresh_connections_bootstrap_is_not_retried_here(gw: Gateway) -> None:
    webapp = gw.listener.webapp = SlowWebapp(failures=1)
    with pytest.raises(TimeoutError):
        await gw.listener.bootstrap(ticket())
    assert webapp.calls == [{"user": "U1"}] and retries(gw) == 0


async def test_a_moved_connection_whose_record_is_gone_is_not_started_fresh(gw: Gateway) -> None:
    """The webapp answered, but without the record (restarted, expired, taken by an earlier attempt):
    starting the connection at this bootstrap would skip what it missed, so it is refused (4010)."""
    webapp = gw.listener.webapp = SlowWebapp(failures=0)  # BOOT has no "resumed"
    with pytest.raises(ResumeLost):
        await gw.listener.bootstrap(ticket(resume="R1"))
    assert len(webapp.calls) == 1
    assert await gw.listener.bootstrap(ticket()) == BOOT  # a fresh connection starts at its bootstrap


async def test_a_resumed_connection_is_confirmed_to_the_webapp_after_its_hello(gw: Gateway) -> None:
    """So that its taken record is not handed to the user's next rtm.connect (refused with 4010)."""
    webapp = gw.listener.webapp = SlowWebapp(failures=0, resumed=True)
    assert await gw.listener.confirm_resume(ticket(resume="R1"))
    assert webapp.confirms == [{"user": "U1", "resume": "R1", "nonce": "nonce-1"}]


async def test_a_failed_confirmation_is_counted_and_not_raised(gw: Gateway) -> None:
    class DownWebapp(SlowWebapp):
        async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            raise TimeoutError()

    gw.listener.webapp = DownWebapp(failures=0)
    assert not await gw.listener.confirm_resume(ticket(resume="R1"))


class RefusedSocket:
    """What :meth:`ClientListener.admit` uses of a websocket: the request's path, and ``close``."""

    def __init__(self, path: str) -> None:
        self.request = SimpleNamespace(path=path)
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_a_socket_mode_ticket_opens_no_rtm_connection(gw: Gateway) -> None:
    """apps.connections.open's ticket names the app's bot user: on the RTM path it would have been a
    session of the bot (every event of its channels, and posting as the bot over the socket) for a
    holder of the app-level token, which may only open Socket Mode connections (docs/authz-review.md)."""
    webapp = gw.listener.webapp = SlowWebapp(failures=0)
    verifier = gw.listener.verifier
    signed = mint(verifier.secret, "UBOT", "T1", "gw-test", time.time(), app="A1", incarnation=verifier.incarnation)
    ws = RefusedSocket(f"/ws/{signed}")
    assert await gw.listener.admit(ws) is None  # type: ignore[arg-type]
    assert ws.closed is not None and ws.closed[0] == CloseCode.INVALID_TICKET
    assert webapp.calls == []
    assert gw.listener.connects.labels("invalid_ticket")._value.get() == 1  # type: ignore[attr-defined]
