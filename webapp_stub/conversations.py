"""Conversations: channels, membership, direct and group messages, listing, the gateway bootstrap.

Membership changes emit an event on the member's user channel whose ``ctl``
(``{"join": C, "since": seq}`` / ``{"leave": C, "upto": seq}``) makes gateways
move that user's connections: from the channel's ``since``, up to its ``upto``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from typing import Any

from webapp_stub.codecs import decode_cursor, encode_cursor, int_cursor, new_id
from webapp_stub.errors import ApiError
from webapp_stub.models import DEFAULT_PAGE, Channel, Event, Page, User
from webapp_stub.users import UserStore

MAX_CHANNEL_NAME = 80
MAX_DM_OTHERS = 8  # Slack: a group DM holds the caller and at most 8 others


class ConversationStore(UserStore):
    """The ``channels`` and ``members`` tables (bootstrap reads ``channel_seq`` too)."""

    _CHANNEL_COLS = "id, team, name, created, creator, is_private, is_archived, kind"

    @staticmethod
    def _channel(row: tuple[Any, ...]) -> Channel:
        return Channel(row[0], row[1], row[2], int(row[3]), row[4], bool(row[5]), bool(row[6]), row[7])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # every post reads both: webapp_stub/read_cache.py
        self.channel_cache = self.read_cache("channels", ("channels",))
        self.member_cache = self.read_cache("members", ("members",))

    def channel(self, channel_id: str) -> Channel | None:
        sql = f"SELECT {self._CHANNEL_COLS} FROM channels WHERE id = ?"
        row = self.channel_cache.lookup(channel_id, lambda: self.conn.execute(sql, (channel_id,)).fetchone())
        return self._channel(row) if row else None

    def channel_by_name(self, team: str, name: str) -> Channel | None:
        row = self.conn.execute(
            f"SELECT {self._CHANNEL_COLS} FROM channels WHERE team = ? AND name = ? AND kind = 'channel'", (team, name)
        ).fetchone()
        return self._channel(row) if row else None

    def memberships(self, user: str, channels: list[str]) -> set[str]:
        """Which of ``channels`` ``user`` is a member of."""
        if not channels:
            return set()
        marks = ",".join("?" * len(channels))
        rows = self.conn.execute(
            f"SELECT channel FROM members WHERE user = ? AND channel IN ({marks})", (user, *channels)
        ).fetchall()
        return {r[0] for r in rows}

    def private_channels_of(self, user: str) -> list[str]:
        """The private channels (not DMs or group DMs) ``user`` is a member of."""
        rows = self.conn.execute(
            "SELECT c.id FROM channels c JOIN members m ON m.channel = c.id "
            "WHERE m.user = ? AND c.is_private = 1 AND c.kind = 'channel'",
            (user,),
        )
        return [row[0] for row in rows]

    def is_member(self, channel: str, user: str) -> bool:
        sql, key = "SELECT 1 FROM members WHERE channel = ? AND user = ?", (channel, user)
        return bool(self.member_cache.lookup(key, lambda: self.conn.execute(sql, key).fetchone() is not None))

    def member_count(self, channel: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM members WHERE channel = ?", (channel,)).fetchone()[0])

    def dm_peer(self, channel: Channel, viewer: str) -> str:
        """The other member of a direct message (``viewer`` itself for a self-DM)."""
        row = self.conn.execute(
            "SELECT user FROM members WHERE channel = ? AND user != ? LIMIT 1", (channel.id, viewer)
        ).fetchone()
        return str(row[0]) if row else viewer

    def visible_channel(self, channel_id: str, user: User) -> Channel:
        """The channel if ``user`` may see it (same team; private only for members); else ``channel_not_found``."""
        channel = self.channel(channel_id) if isinstance(channel_id, str) and channel_id else None
        if channel is None or channel.team != user.team:
            raise ApiError("channel_not_found")
        if channel.is_private and not self.is_member(channel.id, user.id):
            raise ApiError("channel_not_found")
        return channel

    def create_channel(self, user: User, name: object, *, is_private: bool = False) -> tuple[Channel, list[Event]]:
        """Create ``#name`` with ``user`` as creator and first member.

        Events, in commit order: ``channel_created`` on the team channel
        (public channels only), then the join events of :meth:`join_channel`.
        Raises ``invalid_name_specials``/``invalid_name_required``/``name_taken``.
        """
        name = validate_channel_name(name)
        now = int(self.clock())
        channel = Channel(new_id("C"), user.team, name, now, user.id, is_private, False)
        with self.transaction() as db:
            try:
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (channel.id, channel.team, name, now, user.id, int(is_private), 0, channel.kind),
                )
            except sqlite3.IntegrityError:
                raise ApiError("name_taken") from None
            events = []
            if not is_private:
                events.append(
                    self._append_event(
                        user.team,
                        {
                            "type": "channel_created",
                            "channel": {"id": channel.id, "name": name, "created": now, "creator": user.id},
                        },
                    )
                )
            events += self._join(channel, user)
        return channel, events

    def join_channel(self, channel: Channel, user: User) -> tuple[bool, list[Event]]:
        """Add ``user`` to ``channel``; returns (already_in, events). Raises ``is_archived``."""
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction():
            if self.is_member(channel.id, user.id):
                return True, []
            events = self._join(channel, user)
        return False, events

    def invite(self, channel: Channel, inviter: User, users: list[User]) -> list[Event]:
        """conversations.invite: add ``users`` (the ones not yet in) on ``inviter``'s behalf.

        Raises ``method_not_supported_for_channel_type`` (DMs), ``is_archived``,
        ``not_in_channel`` (the inviter), ``cant_invite_self``,
        ``already_in_channel`` (every invitee is a member already).
        """
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_archived:
            raise ApiError("is_archived")
        if any(u.id == inviter.id for u in users):
            raise ApiError("cant_invite_self")
        with self.transaction():
            if not self.is_member(channel.id, inviter.id):
                raise ApiError("not_in_channel")
            new = [u for u in dict((u.id, u) for u in users).values() if not self.is_member(channel.id, u.id)]
            if not new:
                raise ApiError("already_in_channel")
            events: list[Event] = []
            for user in new:
                events += self._join(channel, user, inviter=inviter)
        return events

    def leave_channel(self, channel: Channel, user: User) -> tuple[bool, list[Event]]:
        """conversations.leave: returns (was_not_in, events). Raises ``is_archived``,
        ``method_not_supported_for_channel_type`` (direct messages), ``cant_leave_general``."""
        if channel.is_im:
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_general or channel.is_archived:
            raise ApiError("cant_leave_general" if channel.is_general else "is_archived")
        with self.transaction():
            if not self.is_member(channel.id, user.id):
                return True, []
            events = self._leave(channel, user)
        return False, events

    def kick(self, channel: Channel, kicker: User, target: User) -> list[Event]:
        """conversations.kick: remove ``target``. Raises ``method_not_supported_for_channel_type``,
        ``cant_kick_self``, ``cant_kick_from_general``, ``is_archived``, ``not_in_channel`` (the
        kicker, as :meth:`invite` answers an outsider; or the target)."""
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if target.id == kicker.id:
            raise ApiError("cant_kick_self")
        if channel.is_general:
            raise ApiError("cant_kick_from_general")
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction():
            if not self.is_member(channel.id, kicker.id) or not self.is_member(channel.id, target.id):
                raise ApiError("not_in_channel")
            return self._leave(channel, target, actor=kicker)

    def rename_channel(self, channel: Channel, user: User, name: Any) -> tuple[Channel, list[Event]]:
        """conversations.rename: ``channel_rename`` to the team (public) or ``group_rename``
        to the channel (private). Raises ``method_not_supported_for_channel_type``,
        ``not_in_channel``, ``is_archived``, ``name_taken``, ``invalid_name_*``."""
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_archived:
            raise ApiError("is_archived")
        name = validate_channel_name(name)
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            try:
                db.execute("UPDATE channels SET name = ? WHERE id = ?", (name, channel.id))
            except sqlite3.IntegrityError:
                raise ApiError("name_taken") from None
            renamed = replace(channel, name=name)
            info = {
                "id": channel.id,
                "name": name,
                "name_normalized": name,
                "created": channel.created,
                "is_channel": not channel.is_private,
                "is_mpim": False,
            }
            if channel.is_private:
                event = self._append_event(channel.id, {"type": "group_rename", "channel": info})
            else:
                event = self._append_event(channel.team, {"type": "channel_rename", "channel": info})
        return renamed, [event]

    def archive_channel(self, channel: Channel, user: User, archived: bool = True) -> list[Event]:
        """conversations.archive (or, with ``archived=False``, .unarchive).

        ``channel_archive``/``channel_unarchive`` go to the team for a public
        channel, ``group_archive``/``group_unarchive`` to the channel for a
        private one. Raises ``method_not_supported_for_channel_type``,
        ``cant_archive_general``, ``already_archived``/``not_archived``, ``not_in_channel``.
        """
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_general:
            raise ApiError("cant_archive_general")
        if channel.is_archived == archived:
            raise ApiError("already_archived" if archived else "not_archived")
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            db.execute("UPDATE channels SET is_archived = ? WHERE id = ?", (int(archived), channel.id))
            kind = ("group_" if channel.is_private else "channel_") + ("archive" if archived else "unarchive")
            payload = {"type": kind, "channel": channel.id, "user": user.id}
            event = self._append_event(channel.id if channel.is_private else channel.team, payload)
        return [event]

    def open_dm(self, user: User, others: list[User]) -> tuple[Channel, bool, list[Event]]:
        """conversations.open: the direct message (``D…``) between ``user`` and one other
        (or with itself), or the group DM (``G…``) with several; created on first use.

        Returns (channel, already_open, events). A new DM emits ``im_created``
        (``mpim_joined`` for a group) on each member's user channel with
        ``ctl = {"join": D, "since": 0}``, so their open connections follow it
        at once. Raises ``too_many_users``.
        """
        members = sorted({user.id, *(o.id for o in others)})
        if len(members) - 1 > MAX_DM_OTHERS:
            raise ApiError("too_many_users")
        key = ",".join(members)
        kind = "im" if len(members) <= 2 else "mpim"
        with self.transaction() as db:
            row = db.execute(
                f"SELECT {self._CHANNEL_COLS} FROM channels WHERE team = ? AND dm_key = ?", (user.team, key)
            ).fetchone()
            if row is not None:
                return self._channel(row), True, []
            now = int(self.clock())
            cid = new_id("D" if kind == "im" else "G")
            if kind == "im":
                name = cid
            else:
                by_id = {o.id: o.name for o in (user, *others)}
                name = "mpdm-" + "--".join(by_id[m] for m in members) + "-1"
            channel = Channel(cid, user.team, name, now, user.id, True, False, kind)
            try:
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}, dm_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, user.team, name, now, user.id, 1, 0, kind, key),
                )
            except sqlite3.IntegrityError:  # an mpim name that a channel already took
                name = f"{name}-{cid.lower()}"
                channel = replace(channel, name=name)
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}, dm_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, user.team, name, now, user.id, 1, 0, kind, key),
                )
            db.executemany("INSERT INTO members (channel, user) VALUES (?, ?)", [(cid, m) for m in members])
            events = []
            for member in members:
                if kind == "im":
                    peer = next((m for m in members if m != member), member)
                    payload = {"type": "im_created", "user": peer, "channel": channel.to_api(user=peer, is_open=True)}
                else:
                    payload = {"type": "mpim_joined", "channel": channel.to_api(is_member=True)}
                events.append(self._append_event(member, payload, ctl={"join": cid, "since": 0}))
        return channel, False, events

    def _join(self, channel: Channel, user: User, inviter: User | None = None) -> list[Event]:
        """Membership row, ``member_joined_channel`` on the channel, ``channel_joined``
        (``group_joined`` if private) on the user.

        The user-channel event carries ``ctl = {"join": C, "since": seq}`` where
        ``seq`` is the channel's last seq after its ``member_joined_channel``:
        gateways subscribe that user's connections to C from there, at once.
        """
        self.conn.execute("INSERT INTO members (channel, user) VALUES (?, ?)", (channel.id, user.id))
        payload = {
            "type": "member_joined_channel",
            "user": user.id,
            "channel": channel.id,
            "channel_type": channel.channel_type,
            "team": user.team,
        }
        if inviter is not None:
            payload["inviter"] = inviter.id
        joined = self._append_event(channel.id, payload)
        info = channel.to_api(is_member=True)
        kind = "group_joined" if channel.is_private else "channel_joined"
        own = self._append_event(
            user.id, {"type": kind, "channel": info}, ctl={"join": channel.id, "since": joined.seq}
        )
        return [joined, own]

    def _leave(self, channel: Channel, user: User, actor: User | None = None) -> list[Event]:
        """Membership row gone, ``member_left_channel`` on the channel, ``channel_left``
        (``group_left`` if private; with ``actor_id`` when kicked) on the user with
        ``ctl = {"leave": C, "upto": seq}`` where ``seq`` is the channel's seq of its
        ``member_left_channel``: gateways stop that user's connections receiving C after it."""
        self.conn.execute("DELETE FROM members WHERE channel = ? AND user = ?", (channel.id, user.id))
        left = self._append_event(
            channel.id,
            {
                "type": "member_left_channel",
                "user": user.id,
                "channel": channel.id,
                "channel_type": channel.channel_type,
                "team": user.team,
            },
        )
        payload: dict[str, Any] = {
            "type": "group_left" if channel.is_private else "channel_left",
            "channel": channel.id,
        }
        if actor is not None and actor.id != user.id:
            payload["actor_id"] = actor.id
        own = self._append_event(user.id, payload, ctl={"leave": channel.id, "upto": left.seq})
        return [left, own]

    def list_conversations(
        self,
        viewer: User,
        *,
        types: set[str],
        member_of: str | None = None,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        exclude_archived: bool = False,
    ) -> Page:
        """The conversations of ``viewer``'s team it may see, of the given ``types``
        (``public_channel``, ``private_channel``, ``mpim``, ``im``), in creation order;
        with ``member_of``, only those that user is in (users.conversations)."""
        after = int_cursor(cursor, "channel") or 0
        mine = "EXISTS (SELECT 1 FROM members m WHERE m.channel = c.id AND m.user = ?)"
        kinds: list[str] = []
        params: list[Any] = [viewer.team, after]
        if "public_channel" in types:
            kinds.append("(c.kind = 'channel' AND c.is_private = 0)")
        for name, where in (
            ("private_channel", "c.kind = 'channel' AND c.is_private = 1"),
            ("mpim", "c.kind = 'mpim'"),
            ("im", "c.kind = 'im'"),
        ):
            if name in types:
                kinds.append(f"({where} AND {mine})")
                params.append(viewer.id)
        if not kinds:
            return Page([], "")
        where = "c.team = ? AND c.rowid > ? AND (" + " OR ".join(kinds) + ")"
        if member_of is not None:
            where += " AND EXISTS (SELECT 1 FROM members m2 WHERE m2.channel = c.id AND m2.user = ?)"
            params.append(member_of)
        if exclude_archived:
            where += " AND c.is_archived = 0"
        rows = self.conn.execute(
            f"SELECT c.rowid, {', '.join('c.' + col.strip() for col in self._CHANNEL_COLS.split(','))} "
            f"FROM channels c WHERE {where} ORDER BY c.rowid LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._channel(r[1:]) for r in rows], encode_cursor("channel", rows[-1][0]) if more else "")

    def list_channels(
        self,
        user: User,
        *,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        exclude_archived: bool = False,
        public: bool = True,
        private: bool = False,
    ) -> Page:
        """The team's public channels and, if asked, the private ones ``user`` is in; creation order."""
        types = {t for t, on in (("public_channel", public), ("private_channel", private)) if on}
        return self.list_conversations(user, types=types, limit=limit, cursor=cursor, exclude_archived=exclude_archived)

    def list_members(self, channel: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
        after = decode_cursor(cursor, "member") or ""
        rows = self.conn.execute(
            "SELECT user FROM members WHERE channel = ? AND user > ? ORDER BY user LIMIT ?",
            (channel, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        users = [r[0] for r in rows[:limit]]
        return Page(users, encode_cursor("member", users[-1]) if more else "")

    def bootstrap(
        self, user_id: str, resume: dict[str, int] | None = None, resume_until: dict[str, int] | None = None
    ) -> dict[str, Any] | None:
        """What a gateway needs to connect ``user_id``: self, team, and every channel with its last seq.

        The channels are the user's conversations plus the user's own channel
        and the team channel, each with its current ``last_seq`` (0 if none).
        With ``resume`` (channel -> the last seq a moved connection delivered),
        those channels start at the recorded seq instead (never above the
        latest), so the gateway replays what the connection missed.

        When the record names the user's own channel, the gateway replays that
        channel too, joins and leaves included, and each takes effect at its
        place (docs/design.md, "Resume: joins and leaves while away"): so the
        channels are the ones the user was in *at the recorded position*, not
        now. A channel joined since is left out (the replayed join starts it at
        the join's seq); a channel left since stays in (the replayed leave ends
        it at the leave's seq). ``resume_until`` (channel -> seq of a leave the
        moved connection had not reached yet) are kept too and returned as
        ``until``.
        """
        user = self.user(user_id)
        if user is None:
            return None
        team = self.team(user.team)
        rows = self.conn.execute(
            "SELECT m.channel, coalesce(s.last_seq, 0) FROM members m "
            "LEFT JOIN channel_seq s ON s.channel = m.channel WHERE m.user = ?",
            (user.id,),
        ).fetchall()
        seqs: list[tuple[str, int]] = [(user.id, self.last_seq(user.id)), (user.team, self.last_seq(user.team))]
        current = [(ch, int(seq)) for ch, seq in rows]
        until: dict[str, int] = {}
        if resume and user.id in resume:
            current, until = self._membership_at_resume(user.id, resume, resume_until or {}, current)
        seqs += current
        if resume:
            for i, (channel, seq) in enumerate(seqs):
                recorded = resume.get(channel)
                if recorded is not None:
                    seqs[i] = (channel, max(0, min(int(recorded), seq)))
        channels = [{"id": channel, "seq": seq} for channel, seq in seqs]
        return {
            "user": {"id": user.id, "name": user.name},
            "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
            "channels": channels,
            **({"until": until} if until else {}),
        }

    def _membership_at_resume(
        self, user_id: str, resume: dict[str, int], resume_until: dict[str, int], current: list[tuple[str, int]]
    ) -> tuple[list[tuple[str, int]], dict[str, int]]:
        """The user's channels (with their latest seqs) as of the record's position in the user's
        own channel, from the joins and leaves after it, and the leaves still to be reached."""
        recorded_at = max(0, min(int(resume[user_id]), self.last_seq(user_id)))
        first: dict[str, str] = {}  # channel -> the first membership change after the record: join / leave
        for (text,) in self.conn.execute(
            "SELECT ctl FROM events WHERE channel = ? AND seq > ? AND ctl IS NOT NULL ORDER BY seq",
            (user_id, recorded_at),
        ):
            ctl = json.loads(text)
            for kind in ("join", "leave"):
                if isinstance(ctl, dict) and kind in ctl:
                    first.setdefault(str(ctl[kind]), kind)
        until = {ch: int(upto) for ch, upto in resume_until.items() if ch in resume}
        member_then = [(ch, seq) for ch, seq in current if first.get(ch) != "join" or ch in until]
        have = {ch for ch, _ in member_then}
        for channel in sorted({ch for ch, kind in first.items() if kind == "leave"} | set(until)):
            if channel not in have and channel != user_id:
                member_then.append((channel, self.last_seq(channel)))
        return member_then, until


_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def validate_channel_name(name: object) -> str:
    """Slack's channel-name rules: lowercase letters, digits, ``-``, ``_``; at most 80 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError("invalid_name_required")
    name = name.strip().lstrip("#")
    if len(name) > MAX_CHANNEL_NAME:
        raise ApiError("invalid_name_maxlength")
    if not name or any(ch not in _NAME_OK for ch in name):
        raise ApiError("invalid_name_specials")
    return name


# Emoji names as Slack writes them (``thumbsup``, ``+1``, ``woman-raising-hand``),
