"""The Slack Web API methods, one module per family; importing this package registers them all.

Each handler is registered with :func:`webapp_stub.api.method` and returns the
reply's fields besides ``ok``; Slack's error codes are raised as
:class:`webapp_stub.errors.ApiError` by the handlers and by the store.
"""

from __future__ import annotations

from webapp_stub import bookmarks, files, pins, reminders, scheduled, search
from webapp_stub.methods import apps, auth, chat, conversations, reactions, rtm, team, users

# search.messages (search.py) keeps its query and index beside it (search_query.py, search_index.py);
# bookmarks, pins, reminders and scheduled messages keep their store access, methods and (for
# the last two) scheduler firers together, one module per concern (docs/scheduling.md).
FAMILIES = (
    apps,
    auth,
    chat,
    conversations,
    reactions,
    rtm,
    team,
    users,
    bookmarks,
    files,
    pins,
    reminders,
    scheduled,
    search,
)
