"""What ``search.messages`` costs the webapp: the index's catch-up over a backlog, and later searches.

Seeds the demo team in a temporary directory (a real SQLite file, ``synchronous=FULL``), posts
``--messages`` messages through the store (group commits of 1,000) over ``--channels`` public
channels, each of ``--words`` words drawn from a Zipf-like vocabulary (a few common words, many
rare ones), then times, on the webapp's one connection:

* the first searches, each indexing at most ``MAX_INDEX_ROWS_PER_SEARCH`` rows of the backlog
  (webapp_stub/search_index.py) then reading the page, until the index has caught up;
* the whole backlog indexed at once, on a fresh copy (what one unbounded catch-up would cost);
* later searches, nothing to index: a rare word, a common word, two words, sorted by score and by
  timestamp, a deep page, ``in:`` and ``from:``.

Times are wall-clock per search (the catch-up's transaction and commit, the count and the page's
query: :func:`webapp_stub.search.find`), the median of ``--repeats``; the match objects (at most
``count`` small dicts) are left out.

    python -m bench.search --messages 50000
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from webapp_stub import search_index
from webapp_stub.search import find
from webapp_stub.search_query import paging, parse
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store, User

VOCABULARY = 20_000
COMMIT_EVERY = 1_000


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


def _search(store: Store, me: User, query: str, **how: object) -> tuple[float, int, bool]:
    """One search as search.messages runs it: (seconds, total, whether the index is still behind)."""
    started = time.perf_counter()
    with store.transaction() as db:
        progress = search_index.catch_up(db)
    page = paging(int(how.get("count", 20)), int(how.get("page", 1)))  # type: ignore[call-overload]
    found = find(
        store,
        me,
        parse(query),
        page,
        by_time=bool(how.get("by_time")),
        ascending=False,
        highlight=bool(how.get("highlight")),
    )
    return time.perf_counter() - started, found.total, progress.behind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        seed = seed_demo(data, users=2, channels=2, bots=0)
        store = Store(data)
        me = store.user(seed["users"][0]["id"])
        assert me is not None
        _fill(store, me, args.channels, args.messages, args.words, random.Random(7))
        store.close()
        fresh = Path(data) / "copy"
        fresh.mkdir()
        for name in Path(data).glob("webapp.db*"):
            shutil.copy(name, fresh / name.name)
        store = Store(data)
        print(f"{args.messages} messages of {args.words} words, {args.channels} channels")
        first = 0
        while True:
            seconds, total, behind = _search(store, me, "w3")
            first += 1
            print(f"catch-up search {first}: {seconds * 1000:.1f} ms (found {total}, behind={behind})")
            if not behind:
                break
        copy = Store(str(fresh))
        started = time.perf_counter()
        with copy.transaction() as db:
            search_index.catch_up(db, max_rows=args.messages + 10_000)
        print(f"whole backlog in one catch-up: {(time.perf_counter() - started) * 1000:.1f} ms")
        copy.close()
        cases: list[tuple[str, str, dict[str, object]]] = [
            ("rare word", "w15000", {}),
            ("common word (score)", "w1", {}),
            ("common word (timestamp)", "w1", {"by_time": True}),
            ("common word, page 50", "w1", {"page": 50}),
            ("two words", "w1 w2", {}),
            ("prefix", "w19*", {}),
            ("common word, highlight", "w1", {"highlight": True}),
            ("in: and from:", "w1 in:#bench-3 from:me", {}),
        ]
        for name, query, how in cases:
            runs = [_search(store, me, query, **how) for _ in range(args.repeats)]
            median = statistics.median(r[0] for r in runs)
            print(f"{name:28} {query!r:28} {median * 1000:7.2f} ms  total {runs[0][1]}")
        store.close()


if __name__ == "__main__":
    main()
