"""What a Web API call answers, whichever server read it (aiohttp's or the lean post front).

:data:`Answer` is (HTTP status, extra headers, body, the whole body already encoded or None);
:class:`EncodedReply` a handler's reply fields that carry their own encoding; :class:`Failure`
a failed call's answer with its outcome label (:meth:`webapp_stub.api.WebApi.failure`).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class EncodedReply(dict[str, Any]):
    """A handler's reply fields (a dict, as every handler returns) that also carry the whole
    successful reply already encoded, ``text`` = ``{"ok":true,...}``: :class:`WebApi` sends
    that text as it is instead of encoding the fields again; any other caller of the handler
    (``/internal/call``) uses the fields as usual.

    chat.postMessage cuts its reply from the event's JSON (issue 17: the Slack JSON of a
    post is encoded once)."""

    def __init__(self, fields: dict[str, Any], text: str) -> None:
        super().__init__(fields)
        self.text = text


OK_BODY: dict[str, Any] = {"ok": True}  # what handle_api checks of an EncodedReply's reply
# A call's answer: (HTTP status, extra headers, body, the whole body already encoded or None).
Answer = tuple[int, dict[str, str], dict[str, Any], str | None]


class Failure(NamedTuple):
    """A failed call's answer and its outcome label (:meth:`WebApi.failure`)."""

    body: dict[str, Any]
    status: int
    headers: dict[str, str]
    outcome: str
