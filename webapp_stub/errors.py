"""The Slack error a Web API call answers with: ``{"ok": false, "error": code}``.

Raised by the store, the argument parsers and the method handlers; the HTTP
layer (:mod:`webapp_stub.api`) turns it into the reply (and its status and
headers: 429 with ``Retry-After`` for ``ratelimited``).
"""

from __future__ import annotations


class ApiError(Exception):
    """A Slack error code (``channel_not_found``, ...) to answer the caller with."""

    def __init__(self, code: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.headers = headers or {}
