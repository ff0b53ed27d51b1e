"""Apps: their bot user, their event subscriptions and their app-level tokens.

An app (``A…``) owns one bot user (``xoxb-`` token, in ``users``/``tokens``)
and any number of app-level tokens (``xapp-…``, scope ``connections:write``),
which open Socket Mode connections (``apps.connections.open``) and call nothing
else. Its event subscriptions are a small manifest: names from
:data:`services.app_event_names.APP_EVENTS`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from services.app_event_names import APP_EVENTS
from webapp_stub.codecs import new_id
from webapp_stub.database import Database
from webapp_stub.errors import ApiError
from webapp_stub.models import App

APP_TOKEN_SCOPES = ("connections:write",)
APP_TOKEN_PREFIX = "xapp-"


def new_app_token(app_id: str) -> str:
    """Slack's shape: ``xapp-1-<app id>-<digits>-<hex>``."""
    return f"{APP_TOKEN_PREFIX}1-{app_id}-{secrets.randbelow(10**13):013d}-{secrets.token_hex(32)}"


def check_events(events: Any) -> tuple[str, ...]:
    """A manifest's event list: known names only (``invalid_arguments`` otherwise), in the given order, once each."""
    if not isinstance(events, (list, tuple)) or not all(isinstance(e, str) for e in events):
        raise ApiError("invalid_arguments")
    unknown = [e for e in events if e not in APP_EVENTS]
    if unknown:
        raise ApiError("invalid_arguments")
    return tuple(dict.fromkeys(events))


class AppStore(Database):
    """The ``apps`` and ``app_tokens`` tables."""

    _APP_COLS = "id, team, name, bot_user, events, created"

    @staticmethod
    def _app(row: tuple[Any, ...]) -> App:
        return App(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), int(row[5]))

    def create_app(self, team: str, bot_user: str, name: str, events: Any = APP_EVENTS) -> tuple[App, str]:
        """An app for ``bot_user`` and one app-level token for it."""
        app = App(new_id("A"), team, name, bot_user, check_events(events), int(self.clock()))
        token = new_app_token(app.id)
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO apps ({self._APP_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                (app.id, app.team, app.name, app.bot_user, json.dumps(list(app.events)), app.created),
            )
            db.execute(
                "INSERT INTO app_tokens (token, app, scopes) VALUES (?, ?, ?)",
                (token, app.id, ",".join(APP_TOKEN_SCOPES)),
            )
        return app, token

    def app(self, app_id: str) -> App | None:
        row = self.conn.execute(f"SELECT {self._APP_COLS} FROM apps WHERE id = ?", (app_id,)).fetchone()
        return self._app(row) if row else None

    def app_of_bot(self, bot_user: str) -> App | None:
        """The app whose bot user is ``bot_user``, or None."""
        row = self.conn.execute(f"SELECT {self._APP_COLS} FROM apps WHERE bot_user = ?", (bot_user,)).fetchone()
        return self._app(row) if row else None

    def app_by_token(self, token: str) -> tuple[App, tuple[str, ...]] | None:
        """The app an app-level token belongs to, with the token's scopes; None if it is no app token."""
        if not token.startswith(APP_TOKEN_PREFIX):
            return None
        row = self.conn.execute("SELECT app, scopes FROM app_tokens WHERE token = ?", (token,)).fetchone()
        if row is None:
            return None
        app = self.app(row[0])
        return (app, tuple(s for s in str(row[1]).split(",") if s)) if app is not None else None

    def app_tokens(self, app_id: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT token FROM app_tokens WHERE app = ? ORDER BY token", (app_id,))]
