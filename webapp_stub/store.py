"""The webapp's durable state: one SQLite file, synchronous and plain.

This is the sans-I/O core of the webapp: no asyncio, no sockets. The aiohttp
layer (:mod:`webapp_stub.api`) calls it directly; every call is one short
transaction on one connection, which SQLite in WAL mode serves in tens of
microseconds. In the webapp process, WAL checkpoints (the one slow, fsyncing
part) run on a thread of their own: see :mod:`webapp_stub.checkpoint`.

Guarantees
----------
* Every persisted event gets its channel's next ``seq`` in the same
  transaction that writes it: per channel, gapless, starting at 1. Channels are
  abstract (DESIGN.md): a conversation ``C…``, a user ``U…`` (events for all of
  that user's connections) or a team ``T…`` (team-wide events) each have their
  own sequence in ``channel_seq``.
* ``ts`` strings (``"1700000000.000100"``) are unique and strictly increasing
  per channel: if the clock has not moved (or went back), the microseconds are
  bumped past the channel's last ``ts``.
* The ``json`` of an event is the exact client-visible JSON string, encoded once
  here; it travels as bytes through the fleet and is never re-encoded.
* Mutating methods return the committed :class:`Event` list in commit order;
  the caller hands them to the outbox (:mod:`webapp_stub.handoff`) right after.
* Conversations are channels (``C…``), direct messages (``D…``, kind ``im``)
  and group DMs (``G…``, kind ``mpim``); DMs are private to their members.
  Membership changes emit an event on the member's user channel whose ``ctl``
  (``{"join": C, "since": seq}`` / ``{"leave": C, "upto": seq}``) makes gateways
  move that user's connections (from the channel's ``since``, up to its ``upto``).
* Edits, deletions and reactions are events on the message's channel with
  their own ``seq`` and ``event_ts``; ephemeral messages are events on the
  target user's channel and never enter history.

Errors a client can cause raise :class:`ApiError` with the Slack error code.

How it is built (issue 11): one :class:`Store` that every caller uses,
assembled from one class per domain, each in its own module and each building
on the ones it needs, all sharing one connection (a Store holds a single
SQLite connection, and a write in one domain, a post, must join the same
transaction as the event it appends and the membership it checks):

* :mod:`webapp_stub.database` (:class:`Database`): connection, transactions,
  group-commit batches, seq/ts allocation, appending events;
  :mod:`webapp_stub.schema`: the tables and their migrations.
* :mod:`webapp_stub.events` (:class:`EventLog`) and :mod:`webapp_stub.deadletters`
  (:class:`DeadLetterStore`): reading the event log; dead letters.
* :mod:`webapp_stub.users` (:class:`UserStore`) < :mod:`webapp_stub.conversations`
  (:class:`ConversationStore`) < :mod:`webapp_stub.messages` (:class:`MessageStore`)
  < :mod:`webapp_stub.reactions` (:class:`ReactionStore`): each uses the one before
  (a post checks membership; a reaction finds its message).
* :mod:`webapp_stub.channel_details` (:class:`ChannelDetailStore`, topic, purpose,
  read marks) on top of messages; :mod:`webapp_stub.profiles` (:class:`ProfileStore`)
  on top of users; :mod:`webapp_stub.apps` (:class:`AppStore`): apps and app-level tokens.
* :mod:`webapp_stub.models` (records), :mod:`webapp_stub.codecs` (ids, ts,
  cursors, JSON), :mod:`webapp_stub.errors` (:class:`ApiError`).

Subclassing rather than a facade over per-domain stores keeps every caller's
``store.post_message(...)`` unchanged and lets a domain call another's methods
inside one transaction without passing the others around. The names this module
always offered are still importable from here.
"""

from __future__ import annotations

from webapp_stub.apps import AppStore
from webapp_stub.channel_details import ChannelDetailStore
from webapp_stub.codecs import (
    MAX_SQL_INT,
    MAX_TS_SECONDS_DIGITS,
    decode_cursor,
    dumps,
    encode_cursor,
    new_id,
    new_token,
    ts_to_us,
    us_to_ts,
)
from webapp_stub.conversations import MAX_CHANNEL_NAME, MAX_DM_OTHERS, validate_channel_name
from webapp_stub.database import (
    DB_FILE,
    DEFAULT_CACHE_PAGES,
    MAX_EVENT_BYTES,
    SQLITE_SYNCHRONOUS,
    SYNCHRONOUS_MODES,
    Database,
)
from webapp_stub.deadletters import DeadLetterStore
from webapp_stub.errors import ApiError
from webapp_stub.events import EventLog
from webapp_stub.messages import MAX_TEXT_CHARS, REPLY_USERS_SHOWN
from webapp_stub.models import (
    DEAD_LETTER_STATES,
    DEFAULT_HISTORY_PAGE,
    DEFAULT_PAGE,
    GENERAL,
    MAX_HISTORY_PAGE,
    MAX_PAGE,
    Channel,
    DeadLetter,
    Event,
    Page,
    Team,
    User,
)
from webapp_stub.profiles import ProfileStore
from webapp_stub.reactions import MAX_REACTION_NAME, ReactionStore, validate_reaction_name
from webapp_stub.users import PRESENCES

__all__ = [
    "DB_FILE",
    "DEAD_LETTER_STATES",
    "DEFAULT_CACHE_PAGES",
    "DEFAULT_HISTORY_PAGE",
    "DEFAULT_PAGE",
    "GENERAL",
    "MAX_CHANNEL_NAME",
    "MAX_DM_OTHERS",
    "MAX_EVENT_BYTES",
    "MAX_HISTORY_PAGE",
    "MAX_PAGE",
    "MAX_REACTION_NAME",
    "MAX_SQL_INT",
    "MAX_TEXT_CHARS",
    "MAX_TS_SECONDS_DIGITS",
    "PRESENCES",
    "REPLY_USERS_SHOWN",
    "SQLITE_SYNCHRONOUS",
    "SYNCHRONOUS_MODES",
    "ApiError",
    "Channel",
    "Database",
    "DeadLetter",
    "Event",
    "EventLog",
    "Page",
    "Store",
    "Team",
    "User",
    "decode_cursor",
    "dumps",
    "encode_cursor",
    "new_id",
    "new_token",
    "ts_to_us",
    "us_to_ts",
    "validate_channel_name",
    "validate_reaction_name",
]


class Store(ReactionStore, ChannelDetailStore, ProfileStore, AppStore, DeadLetterStore):
    """All webapp state in ``<data_dir>/webapp.db`` (or ``path`` if it names a file).

    Open with ``Store(path, clock=..., background_checkpoints=..., synchronous=...,
    max_event_bytes=..., migrate=...)`` (see :class:`webapp_stub.database.Database`; a tool
    beside a running webapp opens it with ``migrate=False``: checked, never altered).
    """
