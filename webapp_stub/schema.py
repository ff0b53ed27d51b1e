"""The webapp's SQLite schema and its migrations.

:data:`SCHEMA` creates every table of a new database; :data:`MIGRATIONS` adds
the columns a database written by an older version lacks, and :data:`INDEXES`
the indexes over those columns once they exist. :func:`migrate` applies both.
:func:`check` is for a process that must not change the schema (``rtm users``, beside a
running webapp that may be of another version): it compares the database's tables, columns
and indexes with what :func:`migrate` makes, changes nothing, and raises :class:`SchemaMismatch`.

The two tables every post writes, ``messages`` and ``events``, are :data:`APPEND_TABLES`:
rowid tables, so that a row is appended where the last one went, with their key
(``channel, ts_us`` and ``channel, seq``) a unique index beside them. Clustered by channel (a
``WITHOUT ROWID`` table keyed by that key, as before), every post inserted its whole row into
the middle of a B-tree and dirtied a page of its own in each table: measured on this project's
2-core VM, 80.6 µs of SQLite CPU and 20.4 KiB of WAL per post in group commits of ten posts
over 100 channels, against 50.4 µs and 10.2 KiB appended (``bench/store_layout.py``;
docs/publish-path.md, round 6). A database
written by an older version has them clustered; :func:`migrate` rebuilds them once, in one
transaction, when it is opened.
"""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import dataclass

from webapp_stub import file_store, search_index

SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    domain TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    real_name TEXT NOT NULL DEFAULT '',
    is_bot INTEGER NOT NULL DEFAULT 0,
    bot_id TEXT,
    presence TEXT NOT NULL DEFAULT 'auto'
);
CREATE INDEX IF NOT EXISTS users_team ON users (team);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    user TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_user ON tokens (user);
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    creator TEXT NOT NULL,
    is_private INTEGER NOT NULL DEFAULT 0,
    is_archived INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'channel',
    dm_key TEXT,
    UNIQUE (team, name)
);
CREATE TABLE IF NOT EXISTS members (
    channel TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_user ON members (user, channel);
CREATE TABLE IF NOT EXISTS reactions (
    channel TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    name TEXT NOT NULL,
    user TEXT NOT NULL,
    UNIQUE (channel, ts_us, name, user)
);
CREATE TABLE IF NOT EXISTS channel_seq (
    channel TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_ts_us INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    refusals INTEGER NOT NULL,
    state TEXT NOT NULL,
    redrives INTEGER NOT NULL DEFAULT 0,
    parked_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    bot_user TEXT NOT NULL UNIQUE,
    events TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS app_tokens (
    token TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    scopes TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (
    user TEXT PRIMARY KEY,
    email TEXT,
    fields TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS profiles_email ON profiles (email) WHERE email IS NOT NULL;
CREATE TABLE IF NOT EXISTS channel_details (
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    creator TEXT NOT NULL,
    last_set INTEGER NOT NULL,
    PRIMARY KEY (channel, kind)
) WITHOUT ROWID;
"""

# The tables every post appends to (see the module's docstring): name -> (columns after the
# rowid, in order, as SQL; the indexes that go with the table). A table still defined WITHOUT
# ROWID (an older version's) is rebuilt to this shape by migrate().
APPEND_TABLES: dict[str, tuple[str, str]] = {
    "messages": (
        """channel TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    ts TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user TEXT NOT NULL,
    team TEXT NOT NULL,
    text TEXT NOT NULL,
    thread_ts TEXT,
    bot_id TEXT,
    extra TEXT,
    subtype TEXT,
    edited_user TEXT,
    edited_ts TEXT""",
        "CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages (channel, ts_us);",
    ),
    "events": (
        """channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    json TEXT NOT NULL,
    ctl TEXT,
    created_at REAL NOT NULL""",
        "CREATE UNIQUE INDEX IF NOT EXISTS events_key ON events (channel, seq);\n"
        "CREATE INDEX IF NOT EXISTS events_created ON events (created_at);",
    ),
}


def _append_table_sql(name: str, table: str) -> str:
    """CREATE TABLE for :data:`APPEND_TABLES`' ``table``, named ``name``."""
    return f"CREATE TABLE IF NOT EXISTS {name} (\n    id INTEGER PRIMARY KEY,\n    {APPEND_TABLES[table][0]}\n);"


# The tables every rtm database has had since the first release: a file without one of them is
# not the webapp's database (``rtm restore`` refuses it; rtmctl/backup.py).
CORE_TABLES = ("teams", "users", "tokens", "channels", "members", "channel_seq", *APPEND_TABLES)

# Columns added after the first release: a database written by an older
# version gets them (with their defaults) when it is opened.
MIGRATIONS = (
    ("users", "presence", "TEXT NOT NULL DEFAULT 'auto'"),
    ("channels", "kind", "TEXT NOT NULL DEFAULT 'channel'"),
    ("channels", "dm_key", "TEXT"),
    ("messages", "subtype", "TEXT"),
    ("messages", "edited_user", "TEXT"),
    ("messages", "edited_ts", "TEXT"),
    ("members", "last_read", "TEXT"),
)
# Indexes over migrated columns: created once the columns exist.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS channels_dm_key ON channels (team, dm_key) WHERE dm_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS users_bot ON users (bot_id) WHERE bot_id IS NOT NULL;
"""

# Scheduling, bookmarks and pins (issue 16): the tables of webapp_stub/scheduler.py (due_items:
# what fires when, exactly once), scheduled.py, reminders.py, bookmarks.py and pins.py.
SCHEDULING_SCHEMA = """
CREATE TABLE IF NOT EXISTS due_items (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    team TEXT NOT NULL,
    lane TEXT NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    fired_at REAL,
    error TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS due_items_pending ON due_items (state, due_at);
CREATE TABLE IF NOT EXISTS scheduled_messages (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    channel TEXT NOT NULL,
    user TEXT NOT NULL,
    post_at INTEGER NOT NULL,
    date_created INTEGER NOT NULL,
    text TEXT NOT NULL,
    thread_ts TEXT,
    reply_broadcast INTEGER NOT NULL DEFAULT 0,
    extra TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    posted_ts TEXT
);
CREATE INDEX IF NOT EXISTS scheduled_messages_user ON scheduled_messages (user, state, post_at);
CREATE INDEX IF NOT EXISTS scheduled_messages_channel ON scheduled_messages (channel, state, post_at);
CREATE TABLE IF NOT EXISTS reminders (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    creator TEXT NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    time INTEGER NOT NULL,
    complete_ts INTEGER NOT NULL DEFAULT 0,
    fired_ts TEXT
);
CREATE INDEX IF NOT EXISTS reminders_user ON reminders (user, time);
CREATE INDEX IF NOT EXISTS reminders_creator ON reminders (creator, time);
CREATE TABLE IF NOT EXISTS bookmarks (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    team TEXT NOT NULL,
    title TEXT NOT NULL,
    link TEXT NOT NULL,
    emoji TEXT,
    type TEXT NOT NULL,
    entity_id TEXT,
    parent_id TEXT,
    date_created INTEGER NOT NULL,
    date_updated INTEGER NOT NULL DEFAULT 0,
    updated_by TEXT NOT NULL,
    position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bookmarks_channel ON bookmarks (channel, position);
CREATE TABLE IF NOT EXISTS pins (
    channel TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    pinned_by TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (channel, ts_us)
) WITHOUT ROWID;
"""


# Resume records (webapp_stub/resume.py, resume_table.py): where a connection the fleet moved
# stopped, until its client reconnects. Keyed by the token's id (a hash), never the token.
# Rows expire RESUME_TTL_S after they were written; at most MAX_RESUME_RECORDS_PER_USER per user.
RESUME_SCHEMA = """
CREATE TABLE IF NOT EXISTS resume_records (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    token_id TEXT NOT NULL,
    channels TEXT NOT NULL,
    until TEXT NOT NULL,
    carried TEXT NOT NULL,
    expires_at REAL NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0,
    holder TEXT NOT NULL DEFAULT '',
    retake_until REAL NOT NULL DEFAULT 0,
    reclaimable INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Create what is missing: the tables, the columns of :data:`MIGRATIONS`, then their indexes;
    rebuild an older version's clustered :data:`APPEND_TABLES` as rowid tables."""
    conn.executescript(SCHEMA + "".join(_append_table_sql(table, table) for table in APPEND_TABLES))
    for table, column, decl in MIGRATIONS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    for table in APPEND_TABLES:
        _rebuild_clustered(conn, table)
    conn.executescript(INDEXES + "".join(indexes for _, indexes in APPEND_TABLES.values()))
    conn.executescript("BEGIN;" + SCHEDULING_SCHEMA + "COMMIT;")  # one transaction: the schema pages written once
    conn.executescript(RESUME_SCHEMA)
    conn.executescript(file_store.FILES_SCHEMA)  # files (file_store.py): a database from before them gets them
    search_index.create(conn)  # search.messages' index, filled by searches (search_index.py); none without FTS5


def _rebuild_clustered(conn: sqlite3.Connection, table: str) -> None:
    """Rebuild ``table`` as the rowid table of :data:`APPEND_TABLES` if it is still clustered
    (``WITHOUT ROWID``): every row copied, in one transaction, so a crash leaves the old table."""
    if not _clustered(conn, table):
        return
    columns = ", ".join(line.split()[0] for line in APPEND_TABLES[table][0].split("\n"))
    staging = f"{table}__rowid"
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not _clustered(conn, table):  # another connection rebuilt it while we waited for the lock
            conn.execute("ROLLBACK")
            return
        conn.execute(f"DROP TABLE IF EXISTS {staging}")
        conn.execute(_append_table_sql(staging, table))
        conn.execute(f"INSERT INTO {staging} ({columns}) SELECT {columns} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {staging} RENAME TO {table}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _clustered(conn: sqlite3.Connection, table: str) -> bool:
    """``table`` exists and is still ``WITHOUT ROWID``."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return row is not None and "WITHOUT ROWID" in row[0].upper()


class SchemaMismatch(Exception):
    """A database whose schema is not the one this version makes (:func:`check`): ``missing`` is
    what :func:`migrate` would add or rebuild (an older version's file), ``unknown`` what this
    version does not know (a newer one's), each as ``"table t"``, ``"column t.c"``, ``"index i"``."""

    def __init__(self, path: str, missing: list[str], unknown: list[str]) -> None:
        if missing:
            hint = "start `rtm up` with this version once to migrate it"
        else:
            hint = f"it has {', '.join(unknown[:3])} that this version does not know: use the rtm that wrote it"
        super().__init__(f"the database at {path} is from another version of rtm; {hint}")
        self.path = path
        self.missing = missing
        self.unknown = unknown


@dataclass(frozen=True)
class _Shape:
    """What :func:`check` compares: each table's columns and whether it is clustered, each index's table."""

    tables: dict[str, tuple[frozenset[str], bool]]
    indexes: dict[str, str]
    virtual: dict[str, str]  # virtual tables: name to the CREATE VIRTUAL TABLE statement SQLite keeps


def _shape(conn: sqlite3.Connection) -> _Shape:
    """The schema of ``conn``'s main database, SQLite's own objects (``sqlite_*``) left out; reads only."""
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM main.sqlite_master "
        "WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
    ).fetchall()
    tables = {
        name: (
            frozenset(row[1] for row in conn.execute(f"PRAGMA main.table_info({name})")),
            "WITHOUT ROWID" in (sql or "").upper(),
        )
        for kind, name, _, sql in rows
        if kind == "table"
    }
    return _Shape(tables, {name: table for kind, name, table, _ in rows if kind == "index"}, virtual_tables(conn))


def virtual_tables(conn: sqlite3.Connection) -> dict[str, str]:
    """The virtual tables of ``conn``'s database: name to its ``CREATE VIRTUAL TABLE`` statement."""
    rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL %'")
    return {str(name): str(sql) for name, sql in rows}


def expected_virtual_tables() -> dict[str, str]:
    """The virtual tables :func:`migrate` makes (search.messages' index), as SQLite records them."""
    return _expected().virtual


@functools.cache
def _expected() -> _Shape:
    """The shape :func:`migrate` gives a new database (made once, in memory)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn)
        return _shape(conn)
    finally:
        conn.close()


def check(conn: sqlite3.Connection, path: str) -> None:
    """Raise :class:`SchemaMismatch` unless the database of ``conn`` (at ``path``) has exactly the
    tables, columns (in any order), clustering and indexes that :func:`migrate` makes; changes nothing."""
    want, have = _expected(), _shape(conn)
    missing, unknown = [], []
    for table, (columns, clustered) in want.tables.items():
        if table not in have.tables:
            missing.append(f"table {table}")
            continue
        their_columns, their_clustered = have.tables[table]
        missing += [f"column {table}.{c}" for c in sorted(columns - their_columns)]
        unknown += [f"column {table}.{c}" for c in sorted(their_columns - columns)]
        if their_clustered != clustered:
            (missing if their_clustered else unknown).append(f"table {table} ({'not ' * clustered}clustered)")
    unknown += [f"table {t}" for t in sorted(set(have.tables) - set(want.tables))]
    missing += [f"index {i}" for i in sorted(set(want.indexes) - set(have.indexes))]
    unknown += [f"index {i}" for i in sorted(set(have.indexes) - set(want.indexes))]
    if missing or unknown:
        raise SchemaMismatch(path, missing, unknown)
