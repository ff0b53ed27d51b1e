"""Users' profiles (``users.profile.get``/``set``) and finding a user by email.

A profile is the user's standing fields (real and display name from ``users``)
plus the fields set with ``users.profile.set``, kept as one JSON object per
user; the email has its own unique column so ``users.lookupByEmail`` is one
index read. A change emits Slack's ``user_change`` on the team channel.
"""

from __future__ import annotations

import json
import re
from typing import Any

from webapp_stub.codecs import stored_loads
from webapp_stub.errors import ApiError
from webapp_stub.models import Event, User
from webapp_stub.users import UserStore

# Fields users.profile.set accepts, with the longest value Slack allows for each
# (characters); a longer one is Slack's ``too_long``. Other names are ignored, as Slack does.
PROFILE_FIELD_MAX_CHARS = {
    "first_name": 35,
    "last_name": 35,
    "real_name": 80,
    "display_name": 80,
    "title": 250,
    "phone": 50,
    "pronouns": 50,
    "status_text": 100,
    "status_emoji": 100,
    "email": 254,
}
STATUS_EXPIRATION_FIELD = "status_expiration"  # an integer (unix seconds, 0 for none)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EMOJI = re.compile(r"^(:[a-z0-9_+'-]+:)?$")


def validate_email(value: str) -> str:
    """An email address as a profile holds it (stripped); ``invalid_email`` or ``too_long`` otherwise."""
    value = value.strip()
    if len(value) > PROFILE_FIELD_MAX_CHARS["email"]:
        raise ApiError("too_long")
    if not _EMAIL.match(value):
        raise ApiError("invalid_email")
    return value


class ProfileStore(UserStore):
    """The ``profiles`` table."""

    def profile(self, user: User) -> dict[str, Any]:
        """Slack's profile object for ``user``."""
        row = self.conn.execute("SELECT email, fields FROM profiles WHERE user = ?", (user.id,)).fetchone()
        fields: dict[str, Any] = stored_loads(row[1]) if row else {}
        real_name = str(fields.get("real_name") or user.real_name)
        display_name = str(fields.get("display_name", user.name))
        profile: dict[str, Any] = {
            "title": "",
            "phone": "",
            "pronouns": "",
            "status_text": "",
            "status_emoji": "",
            "status_expiration": 0,
            "first_name": "",
            "last_name": "",
            **fields,
            "real_name": real_name,
            "display_name": display_name,
            "real_name_normalized": real_name,
            "display_name_normalized": display_name,
            "team": user.team,
        }
        if row and row[0]:
            profile["email"] = row[0]
        if user.bot_id:
            profile["bot_id"] = user.bot_id
        return profile

    def user_object(self, user: User) -> dict[str, Any]:
        """Slack's user object with the stored profile."""
        obj = user.to_api()
        obj["profile"] = self.profile(user)
        obj["real_name"] = obj["profile"]["real_name"]
        return obj

    def set_profile(self, user: User, changes: dict[str, Any]) -> tuple[dict[str, Any], list[Event]]:
        """Apply ``changes`` (field -> value; "" clears); returns the new profile and ``user_change``.

        Raises ``invalid_profile`` (a value of the wrong type), ``too_long``,
        ``invalid_email``, ``email_taken``, ``invalid_emoji``.
        """
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name == STATUS_EXPIRATION_FIELD:
                if isinstance(value, bool):  # int(True) is 1: stored as an expiry in 1970
                    raise ApiError("invalid_profile")
                try:
                    clean[name] = max(0, int(value or 0))
                except (TypeError, ValueError, OverflowError):
                    raise ApiError("invalid_profile") from None
                continue
            limit = PROFILE_FIELD_MAX_CHARS.get(name)
            if limit is None:
                continue  # Slack ignores fields it does not know
            if value is None:
                value = ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ApiError("invalid_profile")
            value = str(value).strip()
            if len(value) > limit:
                raise ApiError("too_long")
            if name == "email" and value:
                validate_email(value)
            if name == "status_emoji" and not _EMOJI.match(value):
                raise ApiError("invalid_emoji")
            clean[name] = value
        with self.transaction() as db:
            row = db.execute("SELECT email, fields FROM profiles WHERE user = ?", (user.id,)).fetchone()
            email = row[0] if row else None
            fields: dict[str, Any] = stored_loads(row[1]) if row else {}
            if "email" in clean:
                email = clean.pop("email") or None
                if email is not None:
                    taken = db.execute(
                        "SELECT user FROM profiles WHERE email = ? AND user != ?", (email, user.id)
                    ).fetchone()
                    if taken is not None:
                        raise ApiError("email_taken")
            fields.update(clean)
            db.execute(
                "INSERT INTO profiles (user, email, fields) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET email = excluded.email, fields = excluded.fields",
                (user.id, email, json.dumps(fields)),
            )
            event = self._append_event(user.team, {"type": "user_change", "user": self.user_object(user)})
        return self.profile(user), [event]

    def user_by_email(self, team: str, email: str) -> User | None:
        row = self.conn.execute("SELECT user FROM profiles WHERE email = ?", (email.strip(),)).fetchone()
        if row is None:
            return None
        user = self.user(row[0])
        return user if user is not None and user.team == team else None
