"""The browser client: the page at ``/``, its files under ``/client/``, and the demo sign-in list.

The page (``webapp_stub/static/``) is plain ES modules: no build step, no Node.
It talks to the fleet only the way Slack's own client does: ``POST /api/<method>``
with the token as ``Authorization: Bearer``, ``rtm.connect``, then the gateway's
websocket (see docs/browser.md).

Files are served from a list made when the routes are built (every file under
``static/``), so a request can name nothing else: no path is ever joined from
request input. Every response carries a Content-Security-Policy that allows
scripts, styles and images only from this origin and websockets to any host
(the gateway ``rtm.connect`` names is on another port, or behind the edge).

``GET /demo/users`` lists the demo team's people with their tokens, for the
page's sign-in picker, only when the webapp runs in demo mode (``--demo``, the
default; ``--no-demo`` or ``RTM_DEMO=0`` turns it off, and the listing then
answers 404 ``demo_mode_off``). Anyone who can reach the webapp in demo mode
can sign in as any listed person: that is the point of a demo, and the reason
it must be off wherever the webapp is reachable by people who should not be
each other (docs/browser.md, "The demo picker").

``GET /archives/<channel>/p<ts digits>`` (what ``chat.getPermalink`` answers) is the
same page: the page reads its own path, opens that conversation at that message
(and its thread, with ``?thread_ts=``), then puts ``/`` back in the address bar. A
path of any other shape is 404.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from services.config import Parser
from services.errors import ConfigError
from services.metrics import ServiceMetrics
from webapp_stub.store import Store

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_PREFIX = "/client/"
DEMO_USERS_PATH = "/demo/users"
PERMALINK_PATH = "/archives/{channel}/{message}"
# chat.getPermalink's shape: a conversation id, then ``p`` and the message ts without its dot.
PERMALINK_CHANNEL = re.compile(r"[CDG][A-Z0-9]{1,39}")
PERMALINK_MESSAGE = re.compile(r"p[0-9]{16}")
# The picker shows the team's first people; a seed of thousands lists this many.
MAX_DEMO_USERS = 50
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # the page is small and changes with the code: always revalidate
    "Cache-Control": "no-cache",
}


def add_browser_client_flags(parser: Parser) -> None:
    """The webapp's flags of the page and its links."""
    parser.add(
        "--demo",
        True,
        "demo mode: /demo/users lists the demo team's people with their tokens for the browser "
        "client's sign-in picker (--no-demo or RTM_DEMO=0 wherever others can reach the webapp)",
    )
    parser.add(
        "--public-url",
        "",
        "scheme and host people reach the webapp at behind an edge proxy (e.g. https://edge:8443); "
        "chat.getPermalink's links start with it (default: the request's own scheme and Host)",
    )


def public_base_url(value: str) -> str:
    """``--public-url``: the scheme and host (and port) people reach the webapp at, behind an edge
    proxy, without a trailing slash; permalinks start with it. Raises ``ConfigError`` for anything
    else (a path would move the page away from its files under ``/client/``)."""
    if not value:
        return ""
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError when out of range
    except ValueError:
        port_ok = False
    extra = parts.query or parts.fragment or parts.username is not None or parts.path not in ("", "/")
    if parts.scheme not in ("http", "https") or not parts.hostname or extra or not port_ok:
        raise ConfigError(f"--public-url must be http(s)://host[:port], not {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Every servable file under ``root`` by its URL path below ``/client/`` (``js/app.js``)."""
    return {
        p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in CONTENT_TYPES
    }


def demo_people(store: Store, limit: int = MAX_DEMO_USERS) -> dict[str, Any]:
    """The first team and its first ``limit`` people (no bots), each with a token."""
    team = store.first_team()
    if team is None:
        return {"team": None, "users": []}
    rows = store.conn.execute(
        "SELECT u.id, u.name, u.real_name, (SELECT t.token FROM tokens t WHERE t.user = u.id LIMIT 1) "
        "FROM users u WHERE u.team = ? AND u.is_bot = 0 ORDER BY u.rowid LIMIT ?",
        (team.id, limit),
    ).fetchall()
    users = [{"id": uid, "name": name, "real_name": real, "token": token} for uid, name, real, token in rows if token]
    return {"team": team.to_api(), "users": users}


class BrowserClient:
    """The routes of the browser client; ``demo`` turns the sign-in listing on."""

    def __init__(self, store: Store, metrics: ServiceMetrics, *, demo: bool, root: Path = STATIC_DIR) -> None:
        self.store = store
        self.metrics = metrics
        self.demo = demo
        self.files = static_files(root)
        self.requests = metrics.counter(
            "rtm_webapp_client_requests_total", "Browser client requests by route and outcome", ["route", "outcome"]
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.handle_index),
            web.get(CLIENT_PREFIX + "{path:.+}", self.handle_file),
            web.get(DEMO_USERS_PATH, self.handle_demo_users),
            web.get(PERMALINK_PATH, self.handle_permalink),
        ]

    def _file(self, name: str) -> web.StreamResponse:
        path = self.files[name]
        headers = {**SECURITY_HEADERS, "Content-Type": CONTENT_TYPES[path.suffix]}
        return web.FileResponse(path, headers=headers)

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        self.requests.labels("index", "ok").inc()
        return self._file("index.html")

    async def handle_permalink(self, request: web.Request) -> web.StreamResponse:
        """A permalink opens the page, which finds its message (module docstring)."""
        channel, message = request.match_info["channel"], request.match_info["message"]
        if not (PERMALINK_CHANNEL.fullmatch(channel) and PERMALINK_MESSAGE.fullmatch(message)):
            self.requests.labels("permalink", "not_found").inc()
            self.metrics.error("client_file_not_found")
            return web.json_response({"ok": False, "error": "not_found"}, status=404, headers=SECURITY_HEADERS)
        self.requests.labels("permalink", "ok").inc()
        return self._file("index.html")

    async def handle_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name not in self.files:
            self.requests.labels("file", "not_found").inc()
            self.metrics.error("client_file_not_found")
            return web.json_response({"ok": False, "error": "not_found"}, status=404, headers=SECURITY_HEADERS)
        self.requests.labels("file", "ok").inc()
        return self._file(name)

    async def handle_demo_users(self, request: web.Request) -> web.Response:
        if not self.demo:
            self.requests.labels("demo_users", "demo_mode_off").inc()
            self.metrics.error("demo_mode_off")
            return web.json_response({"ok": False, "error": "demo_mode_off"}, status=404, headers=SECURITY_HEADERS)
        self.requests.labels("demo_users", "ok").inc()
        # tokens: never cached by the browser or a proxy
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return web.json_response({"ok": True, "demo": True, **demo_people(self.store)}, headers=headers)
