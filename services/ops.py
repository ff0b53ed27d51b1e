"""The one declared table of wire ops: every msgpack message rtm sends, its fields, their ranges.

Every frame is a msgpack map with a string ``op`` (:mod:`services.wire` does
the framing). Requests also carry an integer ``id`` and get exactly one
reply, ``ok`` or ``err``; pushes carry no ``id``. Each op below is a typed
record (a frozen dataclass) with a declared schema; :func:`parse` turns a
decoded map into its record or raises :class:`services.errors.BadMessage`
with a detail naming the field, and nothing else. Handlers act on records
only, so no op touches state before it was checked. Encoders build
messages from the same records (:meth:`Op.to_message`).

Why one module: it is the fleet's one declared table of ops. Splitting it per service
would put the two ends of each op (who sends it, who checks it) in different files, and a
reader checking what may cross the wire, or a reviewer adding an op, should find every
record, bound and parser side by side, beside the table below.

What happens on a violation (docs/wire.md, "Violations"): a request is
answered ``{"op": "err", "code": "bad_request", "detail": ...}`` and counted
(``rtm_errors_total{kind="bad_request"}``); a push is dropped and counted
(``rtm_errors_total{kind="bad_push"}``). Neither closes the connection,
kills a task or stops a process; later valid messages are served as usual.

Fields (``?`` optional, ``|nil`` may be msgpack nil)::

  op             kind     from -> to            fields
  -------------  -------  --------------------  ------------------------------------------------
  pub            request  webapp -> AS, AS -> CS ch, seq|nil, json, t0?, eid?, ctl?, rv?
                          GS -> CS (typing)
  pubs           request  webapp -> AS, AS -> CS evs [{ch, seq, json, t0?, eid?, ctl?}, ...]
                                                (<= MAX_PUBS_EVENTS, json <= MAX_PUBS_JSON_BYTES
                                                in all), rv?; ok: res [code per event]
  sub            request  GS -> CS              gw, chans [[ch, since], ...] (<= MAX_SUB_CHANNELS), rv?
  unsub          request  GS -> CS              gw, chans [ch, ...] (<= MAX_SUB_CHANNELS)
  seqs           request  GS -> CS              gw, chans [ch, ...] (<= MAX_SEQS_CHANNELS): reconciliation
  ev             push     CS -> GS              ch, seq|nil, json, t0, ctl?
  moved          push     CS -> GS              chans [ch, ...], version
  ping           request  any -> any            (none); ``ping`` as a push is the keepalive
  lease          request  GS -> PS              gw, epoch?, rv?
  release        request  GS -> PS              gw
  query          request  GS -> PS              users (<= MAX_QUERY_USERS), rv?; ok: presence
                                                [[user, presence], ...], teams? (one per entry),
                                                not_owner [user, ...] (:func:`query_answer`)
  online         push     GS -> PS              gw, users (<= MAX_BATCH_USERS), epoch?, rv?, teams?
                                                (teams: [team|nil, ...], one per user)
  offline        push     GS -> PS              gw, users (<= MAX_BATCH_USERS), epoch?, rv?
  psub/punsub    push     GS -> PS              gw, users (<= MAX_BATCH_USERS), epoch?, rv?
  synced         push     GS -> PS              gw, epoch
  presence       push     PS -> GS              changes [[user, "active"|"away"], ...], teams?
                                                (teams: [team|nil, ...], one per change)
  not_owner      push     PS -> GS              users, version
  set_presence   request  webapp -> PS          users [[user, "auto"|"away"], ...], rv?
  get_presence   request  webapp -> PS          user, rv?
  ring_add_slot  request  operator -> CHARM     ring ("channel"|"presence")
  ring_remove_slot request operator -> CHARM    ring, slot
  ok / err       reply    to the requester      id; err: code, detail

Ranges: ``seq`` is ``1 <= seq < 2**53`` (nil for a transient event such as
typing); ``since`` is -1 (live only) or ``0 <= since < 2**53``; versions,
and ``rv`` are ``0 <= v < 2**53`` (2**53: every value survives a trip
through a JSON double, as ring documents in Consul do); presence sync
epochs are ``0 <= e < 2**64`` (gateways start them at ``time.time_ns()``); ``t0`` is a finite
unix time in ``[0, MAX_T0_S]``. Channel and user ids have the form the
webapp makes (:data:`CHANNEL_ID_RE`: one capital letter and 1-31 capitals or
digits, e.g. ``C0A1B2C3D4E``, ``U0A1B2C3D4E``, ``T...``, ``D...``, ``G...``);
gateway and instance ids :data:`INSTANCE_ID_RE`. ``json`` is bytes, at most
:data:`MAX_EVENT_JSON_BYTES`, so the ``ev`` frame built from any accepted
``pub`` fits the frame limit. ``ctl`` is a map with only the keys of
:data:`CTL_CHECKS`: ``join`` (channel id) with optional ``since`` (int),
``leave`` (channel id) with optional ``upto`` (int: the channel's seq of the
leave, up to which the user's connections still get its events), ``from`` (user id; typing),
``revoke`` (a token id, :data:`TOKEN_ID_RE`: ``auth.revoke`` ended that token, and gateways close
the user's connections opened with it). Unknown top-level
fields are ignored (a newer peer may add one); unknown ``ctl`` keys are not.

``teams`` (presence; docs/authz-review.md, finding 5): the team of each user of an
``online`` batch, of each entry of a ``presence`` push and of a ``query`` answer, in the
same order and of the same length as the list it goes with (a record whose lists differ
in length is refused); nil where the team is not known (a user reported online by a
gateway older than the field). Gateways show a user's presence only to sessions of the
user's own team. Optional both ways: an older peer leaves it out, or ignores it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from services import identity
from services.errors import BadMessage
from services.wire import DEFAULT_MAX_FRAME_BYTES

Message = dict[str, Any]

# -- limits (named, with units; docs/wire.md lists them) ---------------------------------------
MAX_SAFE_INT = 2**53  # exclusive bound of seqs and versions: exact in a JSON double
MAX_EPOCH = 2**64  # exclusive bound of presence sync epochs (msgpack's unsigned 64-bit)
# Room for everything an ``ev`` frame carries beside the event JSON (op, ch,
# seq, t0, ctl: well under 1 KiB), so any accepted ``pub`` makes an ``ev`` that fits.
FRAME_ENVELOPE_RESERVE_BYTES = 64 * 1024
MAX_EVENT_JSON_BYTES = DEFAULT_MAX_FRAME_BYTES - FRAME_ENVELOPE_RESERVE_BYTES
# Channels in one ``sub``/``unsub``/``moved``. A [ch, since] entry is about 20
# bytes, so the 4 MiB frame allowed about 200k; a gateway subscribes in
# batches of at most this many (bench/channels.py uses 10k).
MAX_SUB_CHANNELS = 100_000
# Channels one ``seqs`` (the gateway's reconciliation audit) asks about; gateways
# send batches of 5,000 (gateway/channel_links.py RECONCILE_BATCH_CHANNELS).
MAX_SEQS_CHANNELS = 10_000
MAX_BATCH_USERS = 5_000  # users per online/offline/psub/punsub push (gateway/presence.py batches by it)
MAX_QUERY_USERS = 10_000  # users per presence ``query``
MAX_PRESENCE_CHANGES = 100_000  # entries in one ``presence`` push (one per watched user of a gateway)
MAX_ID_CHARS = 32
MAX_INSTANCE_ID_CHARS = 128
MAX_EID_CHARS = 128
MAX_SLOT_CHARS = 64
# ``pubs``: many events in one frame (issue 17, docs/publish-path.md). At most this many
# events (the webapp's hand-off window is 256) ...
MAX_PUBS_EVENTS = 256
# ... and at most this many bytes of event JSON in all, so that a frame of MAX_PUBS_EVENTS
# envelopes (each well under 1 KiB besides its json) stays far below the 4 MiB frame limit.
# A sender cuts its batches before either bound; an event whose own json is larger travels
# alone as a ``pub``.
MAX_PUBS_JSON_BYTES = 1024 * 1024
# The per-event results of a ``pubs`` reply (``res``): applied, or a duplicate of an
# applied seq; anything else is the error code of that event alone.
PUB_OK = "ok"
PUB_DUPLICATE = "duplicate"
MAX_T0_S = 2.0**34  # year 2514: beyond is a corrupt clock, not a time
CHANNEL_ID_RE = re.compile(r"[A-Z][A-Z0-9]{1,31}")
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
SLOT_RE = re.compile(r"[a-z]+-[0-9]{1,6}")
RINGS = ("channel", "presence")
PRESENCE_VALUES = ("active", "away")
MANUAL_PRESENCE_VALUES = ("auto", "away")
LIVE_ONLY = -1  # a ``sub`` entry's since: no replay

Direction = Literal["request", "push"]
T = TypeVar("T", bound="Op")


# -- field checks: each returns the clean value or raises ValueError with a reason -------------
Check = Callable[[Any], Any]


def integer(low: int, high_exclusive: int) -> Check:
    def check(value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass: refused
            raise ValueError(f"must be an integer, not {type(value).__name__}")
        if not low <= value < high_exclusive:
            raise ValueError(f"{value} is outside [{low}, {high_exclusive})")
        return value

    return check


SEQ = integer(1, MAX_SAFE_INT)
VERSION = integer(0, MAX_SAFE_INT)
# Gateways number their presence sync epochs from time.time_ns() (unique across
# restarts), about 1.7e18: any unsigned 64-bit integer, as msgpack carries it.
EPOCH = integer(0, MAX_EPOCH)


def since_seq(value: Any) -> int:
    if value == LIVE_ONLY and type(value) is int:
        return LIVE_ONLY
    return int(integer(0, MAX_SAFE_INT)(value))


def unix_time(value: Any) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= MAX_T0_S):
        raise ValueError(f"{value!r} is not a unix time")
    return float(value)


def text(pattern: re.Pattern[str], what: str) -> Check:
    def check(value: Any) -> str:
        if type(value) is not str:
            raise ValueError(f"must be a string ({what}), not {type(value).__name__}")
        if not pattern.fullmatch(value):
            raise ValueError(f"{value[:40]!r} is not {what}")
        return value

    return check


# A token's id (webapp_stub/resume.py, token_id: 32 hex characters of a SHA-256), never a token.
TOKEN_ID_RE = re.compile(r"[0-9a-f]{32}")
# The ``ctl`` key of the user-channel event of ``auth.revoke``: its value is the revoked token's id.
REVOKE_CTL = "revoke"

CHANNEL_ID = text(CHANNEL_ID_RE, "a channel id like C0A1B2C3D4E")
TOKEN_ID = text(TOKEN_ID_RE, "a token id of 32 hex characters")
USER_ID = text(CHANNEL_ID_RE, "a user id like U0A1B2C3D4E")
TEAM_ID = text(CHANNEL_ID_RE, "a team id like T0A1B2C3D4E")
INSTANCE_ID = text(INSTANCE_ID_RE, "an instance id")
SLOT = text(SLOT_RE, "a slot name like cs-3")


def bounded_str(max_chars: int) -> Check:
    def check(value: Any) -> str:
        if type(value) is not str:
            raise ValueError(f"must be a string, not {type(value).__name__}")
        if len(value) > max_chars:
            raise ValueError(f"longer than {max_chars} characters")
        return value

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        if type(value) is not str or value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def event_json(value: Any) -> bytes:
    if type(value) is not bytes:
        raise ValueError(f"must be bytes (msgpack bin), not {type(value).__name__}")
    if len(value) > MAX_EVENT_JSON_BYTES:
        raise ValueError(f"{len(value)} bytes is above MAX_EVENT_JSON_BYTES ({MAX_EVENT_JSON_BYTES})")
    return value


def list_of(item: Check, max_items: int) -> Check:
    def check(value: Any) -> list[Any]:
        if type(value) is not list:
            raise ValueError(f"must be a list, not {type(value).__name__}")
        if len(value) > max_items:
            raise ValueError(f"{len(value)} items is above the limit of {max_items}")
        out = []
        for i, entry in enumerate(value):
            try:
                out.append(item(entry))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return out

    return check


def pair(first: Check, second: Check) -> Check:
    def check(value: Any) -> tuple[Any, Any]:
        if type(value) not in (list, tuple) or len(value) != 2:  # a record's own pairs are tuples
            raise ValueError("must be a pair [a, b]")
        return first(value[0]), second(value[1])

    return check


CTL_CHECKS: dict[str, Check] = {
    "join": CHANNEL_ID,
    "since": integer(0, MAX_SAFE_INT),
    "leave": CHANNEL_ID,
    "upto": integer(1, MAX_SAFE_INT),
    "from": USER_ID,
    REVOKE_CTL: TOKEN_ID,
}


def control(value: Any) -> dict[str, Any]:
    """``ctl``: fleet-internal control data beside the event (see the module docstring)."""
    if type(value) is not dict:
        raise ValueError(f"must be a map, not {type(value).__name__}")
    unknown = [key for key in value if key not in CTL_CHECKS]
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))[:5]} (known: {sorted(CTL_CHECKS)})")
    if "since" in value and "join" not in value:
        raise ValueError("since without join")
    if "upto" in value and "leave" not in value:
        raise ValueError("upto without leave")
    out: dict[str, Any] = {}
    for key, check in CTL_CHECKS.items():
        if key in value:
            try:
                out[key] = check(value[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    return out


def nullable(check: Check) -> Check:
    def nullable_check(value: Any) -> Any:
        return None if value is None else check(value)

    return nullable_check


# -- the records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One field of an op: its check, and whether it may be absent."""

    check: Check
    required: bool = True


class Op:
    """Base of every op record. Subclasses declare ``OP``, ``DIRECTION``, ``SENDERS``
    (prose), ``SENT_BY`` (the services that send it) and ``SCHEMA`` (field name -> :class:`Spec`; the dataclass fields, in order)."""

    OP: ClassVar[str]
    DIRECTION: ClassVar[Direction]
    SENDERS: ClassVar[str]
    SENT_BY: ClassVar[tuple[str, ...]]  # service names (services.identity) that send it
    SCHEMA: ClassVar[dict[str, Spec]]

    def check_fields(self) -> None:
        """Rules across fields (each field was checked alone already); raises ValueError."""

    def to_message(self) -> Message:
        """The map to send (``id`` is added by the connection for requests); absent
        optional fields (None) are left out."""
        message: Message = {"op": self.OP}
        for name, spec in self.SCHEMA.items():  # the dataclass fields, in order (cheaper than fields())
            value = getattr(self, name)
            if value is not None or spec.required:
                message[name] = value
        return message


@dataclass(frozen=True, slots=True)
class Publish(Op):
    OP = "pub"
    DIRECTION = "request"
    SENDERS = "webapp -> admin server; admin server -> channel server; gateway -> channel server (typing)"
    SENT_BY = (identity.WEBAPP, identity.ADMIN_SERVER, identity.GATEWAY)
    SCHEMA = {
        "ch": Spec(CHANNEL_ID),
        "seq": Spec(nullable(SEQ)),
        "json": Spec(event_json),
        "t0": Spec(unix_time, required=False),
        "eid": Spec(bounded_str(MAX_EID_CHARS), required=False),
        "ctl": Spec(control, required=False),
        "rv": Spec(VERSION, required=False),
    }
    ch: str
    seq: int | None
    json: bytes
    t0: float | None = None
    eid: str | None = None
    ctl: dict[str, Any] | None = None
    rv: int | None = None


def publish_items(value: Any) -> tuple[Publish | BadMessage, ...]:
    """``evs`` of a ``pubs``: each item checked on its own as a ``pub`` (without ``op``,
    ``id`` or ``rv``). A bad item is kept as its :class:`BadMessage` in its place, so that
    it is refused alone and the others are served (issue 13: one bad event never refuses
    or blocks the others); only the list itself (not a list, too many items, too many
    bytes of JSON in all) refuses the whole frame."""
    if type(value) is not list:
        raise ValueError(f"must be a list, not {type(value).__name__}")
    if not value:
        raise ValueError("must hold at least one event")
    if len(value) > MAX_PUBS_EVENTS:
        raise ValueError(f"{len(value)} events is above MAX_PUBS_EVENTS ({MAX_PUBS_EVENTS})")
    total = 0
    out: list[Publish | BadMessage] = []
    for i, item in enumerate(value):
        if type(item) is not dict:
            out.append(BadMessage("pubs", f"evs item {i}: must be a map, not {type(item).__name__}"))
            continue
        data = item.get("json")
        if type(data) is bytes:
            total += len(data)
        fast = _plain_publish(item)
        if fast is not None:
            out.append(fast)
            continue
        try:
            record = _record(Publish, "pubs", item)
        except BadMessage as exc:
            out.append(BadMessage("pubs", f"evs item {i}: {exc.detail}"))
            continue
        if record.rv is not None:  # the batch's rv is the one that counts: an item's own is dropped
            record = Publish(record.ch, record.seq, record.json, record.t0, record.eid, record.ctl)
        out.append(record)
    if total > MAX_PUBS_JSON_BYTES:
        raise ValueError(f"{total} bytes of event json is above MAX_PUBS_JSON_BYTES ({MAX_PUBS_JSON_BYTES})")
    return tuple(out)


def _plain_publish(item: dict[str, Any]) -> Publish | None:
    """The record of a ``pubs`` item in the shape every webapp sends (a channel id, a seq,
    the json, and a float ``t0`` and a short ``eid`` or neither; no ``ctl``, no ``rv``),
    checked in one expression instead of field by field; None for anything else, which
    :func:`_record` then checks (and refuses with its reason). It accepts nothing that
    :func:`_record` refuses and builds the same record (tests/unit/test_ops.py holds the two
    together): ~0.6 µs an event instead of ~4 (issue 17)."""
    ch = item.get("ch")
    seq = item.get("seq")
    data = item.get("json")
    t0 = item.get("t0")
    eid = item.get("eid")
    if (
        type(ch) is str
        and type(seq) is int
        and 1 <= seq < MAX_SAFE_INT
        and type(data) is bytes
        and len(data) <= MAX_EVENT_JSON_BYTES
        and (t0 is None or (type(t0) is float and 0.0 <= t0 <= MAX_T0_S))  # NaN and inf fail the range
        and (eid is None or (type(eid) is str and len(eid) <= MAX_EID_CHARS))
        and item.get("ctl") is None
        and item.get("rv") is None
        and (ch in _checked_channel_ids or _check_channel_id(ch))
    ):
        return Publish(ch, seq, data, t0, eid)
    return None


# Channel ids that passed CHANNEL_ID_RE, so that a channel's next events skip the regex
# (a set lookup instead of a match). At most this many, then it starts over.
MAX_CHECKED_CHANNEL_IDS = 100_000
_checked_channel_ids: set[str] = set()


def _check_channel_id(ch: str) -> bool:
    """Whether ``ch`` is a channel id (remembered if it is)."""
    if CHANNEL_ID_RE.fullmatch(ch) is None:
        return False
    if len(_checked_channel_ids) >= MAX_CHECKED_CHANNEL_IDS:
        _checked_channel_ids.clear()
    _checked_channel_ids.add(ch)
    return True


def publish_item(record: Publish) -> Message:
    """One entry of a ``pubs``'s ``evs``: the ``pub`` fields of ``record`` without ``op`` and ``rv``."""
    item: Message = {"ch": record.ch, "seq": record.seq, "json": record.json}
    if record.t0 is not None:
        item["t0"] = record.t0
    if record.eid is not None:
        item["eid"] = record.eid
    if record.ctl is not None:
        item["ctl"] = record.ctl
    return item


@dataclass(frozen=True, slots=True)
class Publishes(Op):
    """Many persisted events in one frame (issue 17): ``evs`` in order, answered by one
    ``ok`` whose ``res`` holds one result per event, in the same order: ``"ok"``,
    ``"duplicate"`` (that seq was applied already) or the event's own error code
    (``not_owner``, ``bad_request``, ``unavailable``, ...). ``det`` lists ``[index,
    detail]`` for the events that failed, and a channel server's ``version`` comes with
    its ``not_owner`` results."""

    OP = "pubs"
    DIRECTION = "request"
    SENDERS = "webapp -> admin server; admin server -> channel server"
    SENT_BY = (identity.WEBAPP, identity.ADMIN_SERVER)
    SCHEMA = {"evs": Spec(publish_items), "rv": Spec(VERSION, required=False)}
    evs: tuple[Publish | BadMessage, ...]
    rv: int | None = None

    def to_message(self) -> Message:
        """The map to send; items that are :class:`BadMessage` cannot be sent (ValueError)."""
        items = []
        for item in self.evs:
            if isinstance(item, BadMessage):
                raise ValueError(f"a pubs cannot carry a refused item: {item}")
            items.append(publish_item(item))
        message: Message = {"op": self.OP, "evs": items}
        if self.rv is not None:
            message["rv"] = self.rv
        return message


@dataclass(frozen=True, slots=True)
class Subscribe(Op):
    OP = "sub"
    DIRECTION = "request"
    SENDERS = "gateway -> channel server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {
        "gw": Spec(INSTANCE_ID),
        "chans": Spec(list_of(pair(CHANNEL_ID, since_seq), MAX_SUB_CHANNELS)),
        "rv": Spec(VERSION, required=False),
    }
    gw: str
    chans: list[tuple[str, int]]
    rv: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe(Op):
    OP = "unsub"
    DIRECTION = "request"
    SENDERS = "gateway -> channel server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"gw": Spec(INSTANCE_ID), "chans": Spec(list_of(CHANNEL_ID, MAX_SUB_CHANNELS))}
    gw: str
    chans: list[str]


@dataclass(frozen=True, slots=True)
class Seqs(Op):
    """The gateway's reconciliation: where each channel stands at its owner, and whether the
    gateway is subscribed there (docs/hardening-gateway.md)."""

    OP = "seqs"
    DIRECTION = "request"
    SENDERS = "gateway -> channel server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"gw": Spec(INSTANCE_ID), "chans": Spec(list_of(CHANNEL_ID, MAX_SEQS_CHANNELS))}
    gw: str
    chans: list[str]


@dataclass(frozen=True, slots=True)
class Event(Op):
    OP = "ev"
    DIRECTION = "push"
    SENDERS = "channel server -> gateway"
    SENT_BY = (identity.CHANNEL_SERVER,)
    SCHEMA = {
        "ch": Spec(CHANNEL_ID),
        "seq": Spec(nullable(SEQ)),
        "json": Spec(event_json),
        "t0": Spec(unix_time),
        "ctl": Spec(control, required=False),
    }
    ch: str
    seq: int | None
    json: bytes
    t0: float
    ctl: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Moved(Op):
    OP = "moved"
    DIRECTION = "push"
    SENDERS = "channel server -> gateway"
    SENT_BY = (identity.CHANNEL_SERVER,)
    SCHEMA = {"chans": Spec(list_of(CHANNEL_ID, MAX_SUB_CHANNELS)), "version": Spec(VERSION)}
    chans: list[str]
    version: int


@dataclass(frozen=True, slots=True)
class Ping(Op):
    OP = "ping"
    DIRECTION = "request"
    SENDERS = "anyone -> any server (a push ``ping`` is the connection keepalive, never dispatched)"
    SENT_BY = identity.SERVICES
    SCHEMA = {}


@dataclass(frozen=True, slots=True)
class Lease(Op):
    OP = "lease"
    DIRECTION = "request"
    SENDERS = "gateway -> presence server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"gw": Spec(INSTANCE_ID), "epoch": Spec(EPOCH, required=False), "rv": Spec(VERSION, required=False)}
    gw: str
    epoch: int | None = None
    rv: int | None = None


@dataclass(frozen=True, slots=True)
class Release(Op):
    OP = "release"
    DIRECTION = "request"
    SENDERS = "gateway -> presence server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"gw": Spec(INSTANCE_ID)}
    gw: str


@dataclass(frozen=True, slots=True)
class Query(Op):
    OP = "query"
    DIRECTION = "request"
    SENDERS = "gateway -> presence server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"users": Spec(list_of(USER_ID, MAX_QUERY_USERS)), "rv": Spec(VERSION, required=False)}
    users: list[str]
    rv: int | None = None


USER_BATCH_SCHEMA = {
    "gw": Spec(INSTANCE_ID),
    "users": Spec(list_of(USER_ID, MAX_BATCH_USERS)),
    "epoch": Spec(EPOCH, required=False),
    "rv": Spec(VERSION, required=False),
}


@dataclass(frozen=True, slots=True)
class UserBatch(Op):
    """``online``, ``offline``, ``psub``, ``punsub``: one schema, the op says what it means."""

    OP = "online"
    DIRECTION = "push"
    SENDERS = "gateway -> presence server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = USER_BATCH_SCHEMA
    gw: str
    users: list[str]
    epoch: int | None = None
    rv: int | None = None


def teams_beside(teams: list[str | None] | None, items: list[Any], of: str) -> None:
    """``teams``, when present, has one entry per item of ``of``; raises ValueError."""
    if teams is not None and len(teams) != len(items):
        raise ValueError(f"teams: {len(teams)} entries for {len(items)} {of}")


@dataclass(frozen=True, slots=True)
class Online(UserBatch):
    """``teams``: each user's team, in order (docs/authz-review.md, finding 5); absent from older gateways."""

    OP = "online"
    SCHEMA = {**USER_BATCH_SCHEMA, "teams": Spec(list_of(nullable(TEAM_ID), MAX_BATCH_USERS), required=False)}
    teams: list[str | None] | None = None

    def check_fields(self) -> None:
        teams_beside(self.teams, self.users, "users")


@dataclass(frozen=True, slots=True)
class Offline(UserBatch):
    OP = "offline"


@dataclass(frozen=True, slots=True)
class PresenceSubscribe(UserBatch):
    OP = "psub"


@dataclass(frozen=True, slots=True)
class PresenceUnsubscribe(UserBatch):
    OP = "punsub"


@dataclass(frozen=True, slots=True)
class Synced(Op):
    OP = "synced"
    DIRECTION = "push"
    SENDERS = "gateway -> presence server"
    SENT_BY = (identity.GATEWAY,)
    SCHEMA = {"gw": Spec(INSTANCE_ID), "epoch": Spec(EPOCH)}
    gw: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PresenceChanges(Op):
    OP = "presence"
    DIRECTION = "push"
    SENDERS = "presence server -> gateway"
    SENT_BY = (identity.PRESENCE,)
    SCHEMA = {
        "changes": Spec(list_of(pair(USER_ID, one_of(*PRESENCE_VALUES)), MAX_PRESENCE_CHANGES)),
        "teams": Spec(list_of(nullable(TEAM_ID), MAX_PRESENCE_CHANGES), required=False),
    }
    changes: list[tuple[str, str]]
    teams: list[str | None] | None = None  # each changed user's team, in order; absent from older servers

    def check_fields(self) -> None:
        teams_beside(self.teams, self.changes, "changes")


@dataclass(frozen=True, slots=True)
class NotOwnerUsers(Op):
    OP = "not_owner"
    DIRECTION = "push"
    SENDERS = "presence server -> gateway"
    SENT_BY = (identity.PRESENCE,)
    SCHEMA = {"users": Spec(list_of(USER_ID, MAX_PRESENCE_CHANGES)), "version": Spec(VERSION)}
    users: list[str]
    version: int


@dataclass(frozen=True, slots=True)
class SetPresence(Op):
    OP = "set_presence"
    DIRECTION = "request"
    SENDERS = "webapp -> presence server"
    SENT_BY = (identity.WEBAPP,)
    SCHEMA = {
        "users": Spec(list_of(pair(USER_ID, one_of(*MANUAL_PRESENCE_VALUES)), MAX_BATCH_USERS)),
        "rv": Spec(VERSION, required=False),
    }
    users: list[tuple[str, str]]
    rv: int | None = None


@dataclass(frozen=True, slots=True)
class GetPresence(Op):
    OP = "get_presence"
    DIRECTION = "request"
    SENDERS = "webapp -> presence server"
    SENT_BY = (identity.WEBAPP,)
    SCHEMA = {"user": Spec(USER_ID), "rv": Spec(VERSION, required=False)}
    user: str
    rv: int | None = None


@dataclass(frozen=True, slots=True)
class RingAddSlot(Op):
    OP = "ring_add_slot"
    DIRECTION = "request"
    SENDERS = "operator (rtm ring add-slot) -> CHARM leader"
    SENT_BY = (identity.OPERATOR,)
    SCHEMA = {"ring": Spec(one_of(*RINGS)), "slot": Spec(bounded_str(MAX_SLOT_CHARS), required=False)}
    ring: str
    slot: str | None = None


@dataclass(frozen=True, slots=True)
class RingRemoveSlot(Op):
    OP = "ring_remove_slot"
    DIRECTION = "request"
    SENDERS = "operator (rtm ring remove-slot) -> CHARM leader"
    SENT_BY = (identity.OPERATOR,)
    SCHEMA = {"ring": Spec(one_of(*RINGS)), "slot": Spec(SLOT)}
    ring: str
    slot: str


OPS: dict[str, type[Op]] = {
    cls.OP: cls
    for cls in (
        Publish,
        Publishes,
        Subscribe,
        Unsubscribe,
        Seqs,
        Event,
        Moved,
        Ping,
        Lease,
        Release,
        Query,
        Online,
        Offline,
        PresenceSubscribe,
        PresenceUnsubscribe,
        Synced,
        PresenceChanges,
        NotOwnerUsers,
        SetPresence,
        GetPresence,
        RingAddSlot,
        RingRemoveSlot,
    )
}


def parse(message: Mapping[str, Any], expect: type[Op] | tuple[type[Op], ...] | None = None) -> Op:
    """The record for ``message``, or :class:`BadMessage` (the only exception it raises).

    ``expect`` limits which ops are acceptable here (a channel server takes
    no ``lease``): any other op is refused as unknown, with the same error type.
    """
    op = message.get("op") if isinstance(message, Mapping) else None
    if type(op) is not str:
        raise BadMessage("?", "a message must be a map with a string op")
    cls = OPS.get(op)
    allowed = expect if isinstance(expect, tuple) else (expect,) if expect is not None else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise BadMessage(op[:40], "unknown op here")
    return _record(cls, op, message)


def _record(cls: type[T], op: str, message: Mapping[str, Any]) -> T:
    """``cls`` built from ``message``'s fields, each checked by its schema; :class:`BadMessage` otherwise."""
    values: dict[str, Any] = {}
    for name, spec in cls.SCHEMA.items():
        value = message.get(name)
        if value is None and (name not in message or not spec.required):
            if spec.required and name not in message:
                raise BadMessage(op, f"{name} is missing")
            continue
        try:
            values[name] = spec.check(value)
        except ValueError as exc:
            raise BadMessage(op, f"{name}: {exc}") from None
        except Exception as exc:  # a check that breaks on some value is a refusal, never a crash
            raise BadMessage(op, f"{name}: unreadable ({type(exc).__name__})") from None
    record = cls(**values)
    try:
        record.check_fields()
    except ValueError as exc:
        raise BadMessage(op, str(exc)) from None
    return record


QUERY_ANSWER = list_of(pair(USER_ID, one_of(*PRESENCE_VALUES)), MAX_QUERY_USERS)
QUERY_TEAMS = list_of(nullable(TEAM_ID), MAX_QUERY_USERS)


def query_answer(reply: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """The ``ok`` reply to a presence ``query``, checked: ``(user, presence, team)`` per entry,
    team None where the server did not say (an older server, or a user of unknown team).
    Raises :class:`BadMessage` (op ``query``) for a reply out of shape."""
    try:
        answer: list[tuple[str, str]] = QUERY_ANSWER(reply.get("presence", []))
        teams: list[str | None] | None = None if reply.get("teams") is None else QUERY_TEAMS(reply["teams"])
        teams_beside(teams, answer, "entries")
    except ValueError as exc:
        raise BadMessage("query", f"reply: {exc}") from None
    if teams is None:
        return [(user, presence, None) for user, presence in answer]
    return [(user, presence, team) for (user, presence), team in zip(answer, teams, strict=True)]


def parse_as(message: Mapping[str, Any], cls: type[T]) -> T:
    """:func:`parse` expecting exactly ``cls``."""
    record = parse(message, cls)
    assert isinstance(record, cls)
    return record


def batches(items: list[Any], max_items: int) -> list[list[Any]]:
    """``items`` cut into lists of at most ``max_items``: a sender's side of a list limit."""
    return [items[i : i + max_items] for i in range(0, len(items), max_items)] or [[]]


def request_id(message: Mapping[str, Any]) -> int:
    """The ``id`` of a request (the connection already checked it is an int)."""
    return int(message["id"])
