"""Slack's limits on message content, checked where a message enters the webapp.

The figures are Slack's own (docs/hardening-webapp.md cites the pages):

* ``text``: at most 40,000 characters (``msg_too_long``; :data:`webapp_stub.store.MAX_TEXT_CHARS`).
* ``blocks``: a JSON array of at most 50 block objects, each with a string
  ``type`` (``invalid_blocks_format`` when it is not an array of objects,
  ``invalid_blocks`` when it breaks a limit). Text objects (``{"type":
  "plain_text"|"mrkdwn", "text": ...}``) hold at most 3,000 characters
  anywhere in a block, 2,000 as one of a section's ``fields`` (at most 10),
  150 in a header; a ``markdown`` block at most 12,000; a ``block_id`` at
  most 255.
* ``attachments``: a JSON array of at most 100 objects
  (``too_many_attachments``; ``invalid_attachments`` when not an array of objects).
* Nesting: at most :data:`MAX_CONTENT_DEPTH` levels of arrays and objects
  inside ``blocks`` or ``attachments`` (``invalid_blocks`` / ``invalid_attachments``).
* Numbers: finite. A JSON number too large for a double (``1e400``) reads as infinity,
  which JSON cannot carry (it would be stored and fanned out as ``Infinity``):
  ``invalid_blocks`` / ``invalid_attachments``. (``NaN`` and ``Infinity`` themselves are not
  JSON: webapp_stub/args.py refuses them.)

The whole event that carries a message (for an edit, the message and its
``previous_message``) is bounded separately, by the store's
``max_event_bytes`` (``msg_too_long``).

:func:`check_blocks` and :func:`check_attachments` are pure: a value in, the
same value out or :class:`~webapp_stub.store.ApiError` raised. They walk
iteratively, so no input can exhaust the interpreter's stack.
"""

from __future__ import annotations

import math
from typing import Any

from webapp_stub.errors import ApiError

MAX_BLOCKS = 50  # per message (Slack: "up to 50 blocks in each message")
MAX_ATTACHMENTS = 100  # per message
MAX_TEXT_OBJECT_CHARS = 3000  # a text object (section text, context element, ...)
MAX_FIELD_CHARS = 2000  # one of a section block's fields
MAX_SECTION_FIELDS = 10
MAX_HEADER_CHARS = 150
MAX_MARKDOWN_BLOCK_CHARS = 12_000
MAX_BLOCK_ID_CHARS = 255
# Block Kit nests a few levels (rich_text -> section -> elements -> style);
# anything deeper than this is not a message layout.
MAX_CONTENT_DEPTH = 16
TEXT_TYPES = frozenset({"plain_text", "mrkdwn"})


def check_blocks(blocks: Any) -> list[dict[str, Any]]:
    """``blocks`` if it is within Slack's limits. Raises ``invalid_blocks_format`` or ``invalid_blocks``."""
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise ApiError("invalid_blocks_format")
    if len(blocks) > MAX_BLOCKS:
        raise ApiError("invalid_blocks")
    for block in blocks:
        kind = block.get("type")
        if not isinstance(kind, str) or not kind:
            raise ApiError("invalid_blocks_format")
        block_id = block.get("block_id")
        if block_id is not None and (not isinstance(block_id, str) or len(block_id) > MAX_BLOCK_ID_CHARS):
            raise ApiError("invalid_blocks")
        if kind == "header" and _text_len(block.get("text")) > MAX_HEADER_CHARS:
            raise ApiError("invalid_blocks")
        if kind == "markdown":
            text = block.get("text")
            if not isinstance(text, str) or len(text) > MAX_MARKDOWN_BLOCK_CHARS:
                raise ApiError("invalid_blocks")
        if kind == "section":
            fields = block.get("fields")
            if fields is not None:
                if not isinstance(fields, list) or len(fields) > MAX_SECTION_FIELDS:
                    raise ApiError("invalid_blocks")
                if any(_text_len(f) > MAX_FIELD_CHARS for f in fields):
                    raise ApiError("invalid_blocks")
        _check_tree(block, "invalid_blocks", MAX_TEXT_OBJECT_CHARS)
    return blocks


def check_attachments(attachments: Any) -> list[dict[str, Any]]:
    """``attachments`` if within Slack's limits. Raises ``invalid_attachments`` or ``too_many_attachments``."""
    if not isinstance(attachments, list) or not all(isinstance(a, dict) for a in attachments):
        raise ApiError("invalid_attachments")
    if len(attachments) > MAX_ATTACHMENTS:
        raise ApiError("too_many_attachments")
    for attachment in attachments:
        _check_tree(attachment, "invalid_attachments", None)
    return attachments


def _text_len(obj: Any) -> int:
    """Characters of a text object (or a bare string); 0 for anything else (checked elsewhere)."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return len(obj["text"])
    return 0


def _check_tree(root: Any, code: str, max_text_chars: int | None) -> None:
    """Depth within :data:`MAX_CONTENT_DEPTH`; every text object within ``max_text_chars``; every
    number finite."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_CONTENT_DEPTH:
            raise ApiError(code)
        if isinstance(node, dict):
            kind = node.get("type")
            if (
                max_text_chars is not None
                and isinstance(kind, str)
                and kind in TEXT_TYPES
                and (not isinstance(node.get("text"), str) or len(node["text"]) > max_text_chars)
            ):
                raise ApiError(code)
            stack.extend((value, depth + 1) for value in node.values() if isinstance(value, (dict, list, float)))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node if isinstance(value, (dict, list, float)))
        elif not math.isfinite(node):  # a float: 1e400 reads as infinity, which JSON cannot carry
            raise ApiError(code)
