"""Teams, users (people and bots), their tokens and their manual presence."""

from __future__ import annotations

from typing import Any

from services.ops import REVOKE_CTL
from webapp_stub.codecs import encode_cursor, int_cursor, new_id, new_token
from webapp_stub.database import Database
from webapp_stub.errors import ApiError
from webapp_stub.models import DEFAULT_PAGE, Event, Page, Team, User
from webapp_stub.resume import token_id

PRESENCES = ("auto", "away")  # users.setPresence: "auto" follows activity, "away" is manual


class UserStore(Database):
    """The ``teams``, ``users`` and ``tokens`` tables.

    :meth:`auth` answers from a token -> user cache that never outlives a change to
    ``users`` or ``tokens`` (:mod:`webapp_stub.read_cache`: a revoked token, a
    deactivated or renamed user, a presence change, whoever makes it). Unknown tokens
    are not cached.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auth_cache = self.read_cache("auth", ("users", "tokens"))

    def create_team(self, name: str, domain: str) -> Team:
        team = Team(new_id("T"), name, domain)
        with self.transaction() as db:
            db.execute("INSERT INTO teams (id, name, domain) VALUES (?, ?, ?)", (team.id, team.name, team.domain))
        return team

    def first_team(self) -> Team | None:
        row = self.conn.execute("SELECT id, name, domain FROM teams ORDER BY rowid LIMIT 1").fetchone()
        return Team(*row) if row else None

    def team(self, team_id: str) -> Team | None:
        row = self.conn.execute("SELECT id, name, domain FROM teams WHERE id = ?", (team_id,)).fetchone()
        return Team(*row) if row else None

    def create_user(self, team: str, name: str, *, real_name: str = "", is_bot: bool = False) -> tuple[User, str]:
        """A user (or bot user, with a ``B…`` bot id) and a token for it."""
        user = User(new_id("U"), team, name, real_name or name, is_bot, new_id("B") if is_bot else None)
        token = new_token("xoxb" if is_bot else "xoxp")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO users (id, team, name, real_name, is_bot, bot_id) VALUES (?, ?, ?, ?, ?, ?)",
                (user.id, user.team, user.name, user.real_name, int(user.is_bot), user.bot_id),
            )
            db.execute("INSERT INTO tokens (token, user) VALUES (?, ?)", (token, user.id))
        return user, token

    _USER_COLS = "id, team, name, real_name, is_bot, bot_id, presence"

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6])

    def user(self, user_id: str) -> User | None:
        row = self.conn.execute(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
        return self._user(row) if row else None

    def bot(self, bot_id: str) -> User | None:
        """The bot user whose bot id (``B…``) is ``bot_id``, or None."""
        row = self.conn.execute(f"SELECT {self._USER_COLS} FROM users WHERE bot_id = ?", (bot_id,)).fetchone()
        return self._user(row) if row else None

    def set_presence(self, user: User, presence: str) -> list[Event]:
        """users.setPresence: ``auto`` or ``away``. A change emits ``manual_presence_change``
        on the user's channel (to all of that user's connections). Raises ``invalid_presence``."""
        if presence not in PRESENCES:
            raise ApiError("invalid_presence")
        with self.transaction() as db:
            row = db.execute("SELECT presence FROM users WHERE id = ?", (user.id,)).fetchone()
            if row is None:
                raise ApiError("user_not_found")
            if row[0] == presence:
                return []
            db.execute("UPDATE users SET presence = ? WHERE id = ?", (presence, user.id))
            shown = "away" if presence == "away" else "active"
            return [self._append_event(user.id, {"type": "manual_presence_change", "presence": shown})]

    def manual_away_users(self) -> list[str]:
        """Ids of every user set ``away`` by hand (re-sent to a presence server that starts empty)."""
        return [row[0] for row in self.conn.execute("SELECT id FROM users WHERE presence = 'away'")]

    def auth(self, token: str) -> User | None:
        """The user a token belongs to, or None (cached; see the class docstring)."""
        user: User | None = self.auth_cache.lookup(token, lambda: self._auth_lookup(token), keep_none=False)
        return user

    def revoke_token(self, token: str) -> list[Event]:
        """auth.revoke: the token stops working at once for the Web API (the cache forgets it), and
        its open websockets are ended: the token's user channel gets Slack's ``tokens_revoked``
        event with ``ctl = {"revoke": T}`` (T: the token's :func:`~webapp_stub.resume.token_id`,
        never the token), on which every gateway closes that user's connections opened with it
        (gateway/state.py, :meth:`GatewayState.revoked`). Returns that event; none if the token
        did not exist. Deletion and event are one transaction: no event without the revoke."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT u.id, u.is_bot FROM tokens t JOIN users u ON u.id = t.user WHERE t.token = ?", (token,)
            ).fetchone()
            if row is None or db.execute("DELETE FROM tokens WHERE token = ?", (token,)).rowcount == 0:
                return []
            user_id, is_bot = str(row[0]), bool(row[1])
            # Slack's shape (docs.slack.dev/reference/events/tokens_revoked): user ids, never tokens
            payload = {"type": "tokens_revoked", "tokens": {"bot" if is_bot else "oauth": [user_id]}}
            return [self._append_event(user_id, payload, ctl={REVOKE_CTL: token_id(token)})]

    def token_is_live(self, user_id: str, tid: str) -> bool:
        """Whether ``user_id`` still holds a token whose :func:`~webapp_stub.resume.token_id` is ``tid``
        (a gateway's bootstrap of a ticket minted before its token was revoked is refused)."""
        rows = self.conn.execute("SELECT token FROM tokens WHERE user = ?", (user_id,)).fetchall()
        return any(token_id(str(row[0])) == tid for row in rows)

    def _auth_lookup(self, token: str) -> User | None:
        row = self.conn.execute(
            f"SELECT {self._USER_COLS} FROM users WHERE id = (SELECT user FROM tokens WHERE token = ?)", (token,)
        ).fetchone()
        return self._user(row) if row else None

    def list_users(self, team: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
        after = int_cursor(cursor, "user") or 0
        rows = self.conn.execute(
            f"SELECT rowid, {self._USER_COLS} FROM users WHERE team = ? AND rowid > ? ORDER BY rowid LIMIT ?",
            (team, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._user(r[1:]) for r in rows], encode_cursor("user", rows[-1][0]) if more else "")
