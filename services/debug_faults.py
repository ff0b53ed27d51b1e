"""``--debug-faults``: test-only fault injection endpoints, closed to all but the operator.

The endpoints (``POST /debug/consul-partition?on=1|0`` on the metrics port of
channel and presence servers) let the split-brain tests cut a process off
from Consul. They can take a server out of the fleet, so:

* they exist only when the process is started with ``--debug-faults``;
* they are served only on loopback: a process with ``--debug-faults`` and a
  non-loopback ``--host`` refuses to start (:class:`DebugFaultsRefused`), and
  each request must also come from a loopback address;
* each request must carry the operator token in ``X-Rtm-Operator-Token``
  (``--operator-token`` / ``RTM_OPERATOR_TOKEN``; ``rtm up`` makes it in
  ``DATA_DIR/operator-token``, 0600). Without it, or from elsewhere: 403
  ``{"ok": false, "error": "forbidden"}``, counted as
  ``rtm_errors_total{kind="debug_forbidden"}``, and nothing changes.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

from aiohttp import web

from services.config import Parser
from services.discovery import Discovery
from services.errors import DebugFaultsRefused
from services.metrics import ServiceMetrics

log = logging.getLogger("rtm.debug_faults")

OPERATOR_TOKEN_HEADER = "X-Rtm-Operator-Token"
FORBIDDEN_KIND = "debug_forbidden"


def add_flags(parser: Parser) -> None:
    """``--debug-faults`` and ``--operator-token`` (env ``RTM_DEBUG_FAULTS``, ``RTM_OPERATOR_TOKEN``)."""
    parser.add(
        "--debug-faults",
        False,
        "serve POST /debug/consul-partition on the metrics port (tests only; loopback only; needs --operator-token)",
    )
    parser.add("--operator-token", "", "token the --debug-faults endpoints require in X-Rtm-Operator-Token")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any address in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(host: str, operator_token: str) -> None:
    """Raise :class:`DebugFaultsRefused` unless ``host`` is loopback and an operator token is set."""
    if not is_loopback(host):
        raise DebugFaultsRefused(f"--debug-faults serves on loopback only, and --host is {host!r}")
    if not operator_token:
        raise DebugFaultsRefused("--debug-faults needs --operator-token (or RTM_OPERATOR_TOKEN); rtm up makes one")


def check_args(args: Any) -> None:
    """For a process's ``main``: exit with a clear message if ``--debug-faults`` may not run here."""
    if args.debug_faults:
        try:
            check(args.host, args.operator_token)
        except DebugFaultsRefused as exc:
            raise SystemExit(f"{exc}") from None


def fault_routes(discovery: Discovery, host: str, operator_token: str, metrics: ServiceMetrics) -> list[Any]:
    """The fault-injection routes for a process bound to ``host``; raises :class:`DebugFaultsRefused`."""
    check(host, operator_token)
    expected = operator_token.encode()

    def allowed(request: web.Request) -> bool:
        given = request.headers.get(OPERATOR_TOKEN_HEADER, "").encode()
        return is_loopback(request.remote or "") and hmac.compare_digest(given, expected)

    async def partition(request: web.Request) -> web.Response:
        if not allowed(request):
            metrics.error(FORBIDDEN_KIND)
            log.warning("refused a fault-injection request from %s without operator credentials", request.remote)
            return web.json_response({"ok": False, "error": "forbidden"}, status=403)
        discovery.partitioned = request.query.get("on", "1") not in ("0", "false")
        log.warning("fault injection: partitioned from Consul = %s", discovery.partitioned)
        return web.json_response({"ok": True, "partitioned": discovery.partitioned})

    return [web.post("/debug/consul-partition", partition)]
