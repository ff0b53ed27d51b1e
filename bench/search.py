"""What ``search.messages`` costs the webapp, and how long it holds the event loop.

Seeds the demo team in a temporary directory (a real SQLite file, ``synchronous=FULL``, WAL
checkpoints on their thread as in the webapp), posts ``--messages`` messages through the store
(group commits of 1,000) over ``--channels`` public channels, each of ``--words`` words drawn from
a Zipf-like vocabulary (a few common words, many rare ones). Then, on a fresh copy of that
database for each way of running a search, inside an asyncio loop with the webapp's group commit:

* ``loop``: as search.messages ran before webapp_stub/search_reader.py: the catch-up of up to
  ``MAX_INDEX_ROWS_PER_SEARCH`` rows in one transaction, then ``find`` on the writer's connection,
  both on the event loop;
* ``thread``: as it runs now (``webapp_stub.search.run_search``): the catch-up in slices with the
  loop served between them, then ``find`` on the reader's thread and read-only connection.

For each it times the first searches (each indexing its bounded share of the backlog) until the
index has caught up, then later searches by kind of query (the median of ``--repeats``), and
meanwhile measures the **longest loop stall**: a task wakes every ``TICK_S`` and records the
largest gap between two of its wake-ups during each search (the tick itself included: an idle loop
shows about 1.1 ms). Also the whole backlog indexed at once (what one unbounded catch-up would cost).
Times are wall-clock per search (catch-up, its commit, the read); the match objects (at most
``count`` small dicts) are left out.

    python -m bench.search --messages 50000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from webapp_stub import search_index
from webapp_stub.commit import GroupCommit
from webapp_stub.models import Event
from webapp_stub.search import Found, find, run_search
from webapp_stub.search_query import Paging, paging, parse
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store, User

VOCABULARY = 20_000
COMMIT_EVERY = 1_000
TICK_S = 0.001  # the stall monitor's wake-up period
MODES = ("loop", "thread")
CASES: list[tuple[str, str, dict[str, object]]] = [
    ("rare word", "w15000", {}),
    ("common word (score)", "w1", {}),
    ("common word (timestamp)", "w1", {"by_time": True}),
    ("common word, page 50", "w1", {"page": 50}),
    ("two words", "w1 w2", {}),
    ("prefix", "w19*", {}),
    ("common word, highlight", "w1", {"highlight": True}),
    ("in: and from:", "w1 in:#bench-3 from:me", {}),
]
Search = Callable[[str, dict[str, object]], Awaitable[tuple[search_index.CatchUp, Found]]]


def _fill(store: Store, user: User, channels: int, messages: int, words: int, rng: random.Random) -> None:
    """``messages`` posts by ``user`` over ``channels`` new public channels, committed in groups."""
    made = [store.create_channel(user, f"bench-{i}")[0] for i in range(channels)]
    weights = [1 / (rank + 1) for rank in range(VOCABULARY)]
    vocabulary = [f"w{rank}" for rank in range(VOCABULARY)]
    for start in range(0, messages, COMMIT_EVERY):
        store.begin_batch()
        for i in range(start, min(start + COMMIT_EVERY, messages)):
            text = " ".join(rng.choices(vocabulary, weights, k=words))
            store.post_message(made[i % channels], user, text)
        store.commit_batch()


class _Sink:
    def publish(self, events: list[Event]) -> None:
        pass


class LoopStalls:
    """The longest gap between two wake-ups of a task that sleeps :data:`TICK_S` at a time."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            self.longest_s = max(self.longest_s, now - last)
            last = now

    async def during(self, work: Awaitable[object]) -> tuple[float, float]:
        """(seconds ``work`` took, the longest gap meanwhile)."""
        await asyncio.sleep(TICK_S * 2)  # the tick in progress ends before the search
        self.longest_s = 0.0
        started = time.perf_counter()
        await work
        took = time.perf_counter() - started
        await asyncio.sleep(TICK_S * 2)  # the gap the search ended in is recorded
        return took, self.longest_s

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _searcher(mode: str, store: Store, commits: GroupCommit, me: User) -> Search:
    """One search run the ``mode`` way (the module's docstring)."""

    async def on_loop(query: str, how: dict[str, object]) -> tuple[search_index.CatchUp, Found]:
        with store.transaction() as db:
            progress = search_index.catch_up(db)
        found = find(
            store.conn,
            me,
            parse(query),
            _page(how),
            by_time=bool(how.get("by_time")),
            ascending=False,
            highlight=bool(how.get("highlight")),
        )
        await commits.durable()
        return progress, found

    async def on_thread(query: str, how: dict[str, object]) -> tuple[search_index.CatchUp, Found]:
        return await run_search(
            store,
            commits.durable,
            me,
            parse(query),
            _page(how),
            by_time=bool(how.get("by_time")),
            ascending=False,
            highlight=bool(how.get("highlight")),
        )

    return on_loop if mode == "loop" else on_thread


def _page(how: dict[str, object]) -> Paging:
    return paging(int(how.get("count", 20)), int(how.get("page", 1)))  # type: ignore[call-overload]


async def _run_mode(mode: str, path: str, me: User, repeats: int) -> None:
    store = Store(path, background_checkpoints=True)
    commits = GroupCommit(store, _Sink())
    stalls = LoopStalls()
    stalls.start()
    try:
        search = _searcher(mode, store, commits, me)
        print(f"\n{mode}: first searches over the backlog (time, longest loop stall meanwhile)")
        first = 0
        while True:
            result: list[tuple[search_index.CatchUp, Found]] = []
            took, stall = await stalls.during(_keep(search("w3", {}), result))
            first += 1
            progress, found = result[0]
            print(
                f"  catch-up search {first}: {took * 1000:6.1f} ms, stall {stall * 1000:5.1f} ms (indexed {progress.indexed}, behind={progress.behind})"
            )
            if not progress.behind:
                break
        print(f"{mode}: later searches (median of {repeats}; the longest stall over them)")
        for name, query, how in CASES:
            runs = [await stalls.during(search(query, how)) for _ in range(repeats)]
            took_ms = statistics.median(r[0] for r in runs) * 1000
            print(f"  {name:26} {query!r:26} {took_ms:7.2f} ms  stall {max(r[1] for r in runs) * 1000:5.1f} ms")
    finally:
        await stalls.stop()
        commits.close()
        store.close()


async def _keep(
    work: Awaitable[tuple[search_index.CatchUp, Found]], into: list[tuple[search_index.CatchUp, Found]]
) -> None:
    into.append(await work)


def _copy(data: str, name: str) -> str:
    """A copy of the database in ``data`` (never searched), in a directory of its own."""
    fresh = Path(data) / name
    fresh.mkdir()
    for file in Path(data).glob("webapp.db*"):
        shutil.copy(file, fresh / file.name)
    return str(fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help="which ways to run a search: loop, thread")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        seed = seed_demo(data, users=2, channels=2, bots=0)
        store = Store(data)
        me = store.user(seed["users"][0]["id"])
        assert me is not None
        _fill(store, me, args.channels, args.messages, args.words, random.Random(7))
        store.close()
        print(f"{args.messages} messages of {args.words} words, {args.channels} channels")
        copy = Store(_copy(data, "whole"))
        started = time.perf_counter()
        with copy.transaction() as db:
            search_index.catch_up(db, max_rows=args.messages + 10_000)
        print(f"whole backlog in one catch-up: {(time.perf_counter() - started) * 1000:.1f} ms")
        copy.close()
        for mode in args.modes.split(","):
            asyncio.run(_run_mode(mode, _copy(data, mode), me, args.repeats))


if __name__ == "__main__":
    main()
