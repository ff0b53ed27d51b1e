"""What a post costs SQLite with each layout of the two tables it writes (issue 17, round 6).

Every ``chat.postMessage`` allocates its channel's seq (``channel_seq``), inserts a
``messages`` row and an ``events`` row, inside a savepoint of a group commit. This measures
exactly those statements on a database file (WAL, ``synchronous=FULL``, group commits of
``--batch`` posts over ``--channels`` channels in turn, as ``bench.fanout``'s small channels
are posted), for each layout:

* ``clustered``: both tables ``WITHOUT ROWID``, keyed by ``(channel, ts_us)`` and ``(channel,
  seq)``, as rtm stored them before round 6: each row goes into the middle of its table's
  B-tree, in a page of its own channel;
* ``appended``: rtm's schema now (``webapp_stub.schema``): rowid tables, so rows are appended,
  with the key as a unique index beside them;

and for each of ``--page-sizes`` (round 10: a post writes into the tail of its channel's entries in
both keys, so a commit to many channels writes about two whole pages per post; rtm creates its
databases with ``webapp_stub.database.SQLITE_PAGE_SIZE_BYTES``).

It reports CPU µs per post (``time.process_time``, this process only: SQLite runs in it) for
each statement, for the COMMIT (its WAL writes and fsync), for the checkpoints (the WAL is
checkpointed with TRUNCATE past the webapp's ``WAL_CHECKPOINT_BYTES``, and once at the end), and the
WAL bytes written per post.
``--rounds N`` alternates the layouts; tables quote each round and the median.

    python -m bench.store_layout --posts 30000 --batch 10 --channels 100 --rounds 2
    python -m bench.store_layout --layouts appended --page-sizes 4096,1024 --batch 30 --rounds 3

Writes ``bench/results/store-layout.{json,md}``. The database goes to ``--dir`` (default: the
current directory's ``.store-layout/``, so on the disk the webapp would use) and is removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import time
from pathlib import Path

from webapp_stub.checkpoint import WAL_CHECKPOINT_BYTES
from webapp_stub.schema import migrate

RESULTS = Path(__file__).parent / "results"
TEXT_CHARS = 200  # the peers' payload size
CLUSTERED = """
CREATE TABLE messages (channel TEXT NOT NULL, ts_us INTEGER NOT NULL, ts TEXT NOT NULL, seq INTEGER NOT NULL,
    user TEXT NOT NULL, team TEXT NOT NULL, text TEXT NOT NULL, thread_ts TEXT, bot_id TEXT, extra TEXT,
    subtype TEXT, edited_user TEXT, edited_ts TEXT, PRIMARY KEY (channel, ts_us)) WITHOUT ROWID;
CREATE TABLE events (channel TEXT NOT NULL, seq INTEGER NOT NULL, json TEXT NOT NULL, ctl TEXT,
    created_at REAL NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID;
CREATE INDEX events_created ON events (created_at);
CREATE TABLE channel_seq (channel TEXT PRIMARY KEY, last_seq INTEGER NOT NULL,
    last_ts_us INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
"""
MESSAGE_SQL = (
    "INSERT INTO messages (channel, seq, ts_us, ts, user, team, text, thread_ts, bot_id, extra, subtype,"
    " edited_user, edited_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
EVENT_SQL = "INSERT INTO events (channel, seq, json, ctl, created_at) VALUES (?, ?, ?, ?, ?)"
SEQ_SQL = "UPDATE channel_seq SET last_seq = ?, last_ts_us = ? WHERE channel = ?"
PARTS = ("seq", "message", "event", "savepoints", "commit", "checkpoint")


def open_database(path: Path, layout: str, page_size: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    if layout == "clustered":
        conn.executescript(CLUSTERED)
    else:
        migrate(conn)
    return conn


def run(layout: str, page_size: int, directory: Path, posts: int, batch: int, channels: int) -> dict[str, float]:
    """One layout and page size: CPU µs per post by part, and WAL bytes per post."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    path = directory / "webapp.db"
    conn = open_database(path, layout, page_size)
    names = [f"C{n:08d}" for n in range(channels)]
    conn.executemany("INSERT INTO channel_seq VALUES (?, 0, 0)", [(name,) for name in names])
    text = "x" * TEXT_CHARS
    cpu = dict.fromkeys(PARTS, 0.0)
    clock = time.process_time
    wal_bytes = 0
    seqs = dict.fromkeys(names, 0)
    ts_us = 1_700_000_000_000_000
    done = 0
    while done < posts:
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(batch):
            channel = names[done % channels]
            done += 1
            ts_us += 1
            seq = seqs[channel] = seqs[channel] + 1
            ts = f"{ts_us // 1_000_000}.{ts_us % 1_000_000:06d}"
            event = json.dumps({"type": "message", "channel": channel, "user": "U00000001", "text": text, "ts": ts})
            t0 = clock()
            conn.execute("SAVEPOINT tx")
            t1 = clock()
            conn.execute(SEQ_SQL, (seq, ts_us, channel))
            t2 = clock()
            conn.execute(MESSAGE_SQL, (channel, seq, ts_us, ts, "U00000001", "T1", text, *(None,) * 6))
            t3 = clock()
            conn.execute(EVENT_SQL, (channel, seq, event, None, time.time()))
            t4 = clock()
            conn.execute("RELEASE tx")
            t5 = clock()
            cpu["savepoints"] += (t1 - t0) + (t5 - t4)
            cpu["seq"] += t2 - t1
            cpu["message"] += t3 - t2
            cpu["event"] += t4 - t3
        t0 = clock()
        conn.execute("COMMIT")
        cpu["commit"] += clock() - t0
        size = os.path.getsize(f"{path}-wal")
        if size > WAL_CHECKPOINT_BYTES:
            wal_bytes += size
            t0 = clock()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            cpu["checkpoint"] += clock() - t0
    wal_bytes += os.path.getsize(f"{path}-wal")
    t0 = clock()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # what is left is copied back too
    cpu["checkpoint"] += clock() - t0
    conn.close()
    shutil.rmtree(directory, ignore_errors=True)
    result = {part: seconds / posts * 1e6 for part, seconds in cpu.items()}
    result["total"] = sum(result[part] for part in PARTS)
    result["wal_bytes"] = wal_bytes / posts
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=30_000, help="posts per layout and round")
    parser.add_argument("--batch", type=int, default=10, help="posts per group commit")
    parser.add_argument("--channels", type=int, default=100, help="channels the posts go to, in turn")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the layouts, alternating")
    parser.add_argument("--dir", type=Path, default=Path(".store-layout"), help="where the database is made")
    parser.add_argument("--layouts", default="clustered,appended", help="of clustered, appended")
    parser.add_argument("--page-sizes", default="4096,1024", help="SQLite page sizes, bytes")
    args = parser.parse_args()
    configs = [(layout, int(size)) for layout in args.layouts.split(",") for size in args.page_sizes.split(",") if size]
    rows: dict[str, list[dict[str, float]]] = {f"{layout}, {size} B pages": [] for layout, size in configs}
    for round_ in range(args.rounds):
        for layout, size in configs:
            result = run(layout, size, args.dir, args.posts, args.batch, args.channels)
            rows[f"{layout}, {size} B pages"].append(result)
            print(
                f"round {round_ + 1} {layout:9s} {size:5d} " + " ".join(f"{k} {v:.1f}" for k, v in result.items()),
                flush=True,
            )
    lines = [
        f"`python -m bench.store_layout --posts {args.posts} --batch {args.batch} --channels {args.channels}"
        f" --layouts {args.layouts} --page-sizes {args.page_sizes} --rounds {args.rounds}`,"
        f" {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
        f" load average {os.getloadavg()[0]:.1f}. CPU µs per post (each round → median):",
        "",
        "| layout | " + " | ".join(PARTS) + " | total | WAL bytes per post |",
        "| --- |" + " --- |" * (len(PARTS) + 2),
    ]
    for layout, results in rows.items():
        cells = []
        for key in (*PARTS, "total", "wal_bytes"):
            values = [r[key] for r in results]
            shown = ", ".join(f"{v:,.1f}" if key != "wal_bytes" else f"{v:,.0f}" for v in values)
            median = statistics.median(values)
            cells.append(f"{shown} → **{median:,.1f}**" if key != "wal_bytes" else f"{shown} → **{median:,.0f}**")
        lines.append(f"| {layout} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store-layout.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "store-layout.json").write_text(
        json.dumps({"args": vars(args) | {"dir": str(args.dir)}, **rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
