"""``search.messages``' query, sans I/O: Slack's search text to an FTS5 ``MATCH`` expression and
filters, and Slack's ``paging`` / ``pagination`` objects.

What a query may hold (docs/slack-compat.md, "Search"):

* words, all required (``deploy failed``); a word ending in ``*`` matches as a prefix
  (``depl*``, at least :data:`MIN_PREFIX_CHARS` characters before the star);
* ``"a quoted phrase"``, its words in that order;
* ``-word`` or ``-"a phrase"``: messages without it (needs at least one word to search for);
* ``in:#channel`` (or ``in:channel``), ``in:<#C123>``, ``in:<#C123|name>``: in that conversation (several: any of them);
* ``from:@name`` (or ``from:name``), ``from:<@U123>``, ``from:me``: by that user (several: any of them).

Any other ``key:value`` is searched as words (``before:2024`` looks for "before" and "2024"):
rtm does not narrow by date, and a modifier it does not know is never silently dropped, which
would widen the answer beyond what was asked.

User input never reaches ``MATCH`` as written: each word is cut into the tokens SQLite's
``unicode61`` tokenizer would make of it (runs of letters and digits: :data:`TOKEN`) and written
back as a double-quoted FTS5 string of those tokens only, so the expression holds nothing but
tokens, spaces, double quotes, ``*``, parentheses, ``AND``, ``OR`` and ``NOT``. A word with no token
(punctuation only) is left out; a query left with no word to search for matches nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# The longest query read (characters); longer is ``invalid_arguments``. Slack's search box takes
# about this much; it bounds the parse and the expression.
MAX_QUERY_CHARS = 500
# The most words, phrases and modifiers in one query; more is ``invalid_arguments``. Each is one
# FTS5 phrase (a posting list walked per search) or one SQL filter value.
MAX_QUERY_TERMS = 16
# The most tokens in all of a query's words and phrases together; more is ``invalid_arguments``.
# A piece is cut into tokens as unicode61 cuts it, so one piece ``the.the.the...`` is a phrase of
# 125 tokens: such a phrase's MATCH took 1.5 s over 50,000 messages of common words, against
# 0.7 ms for ``the`` (docs/authz-review.md, finding 19). Twice the pieces allowed: a few words of
# ``foo-bar`` shape each.
MAX_QUERY_TOKENS = 32
# The fewest characters a prefix (``depl*``) must have: one or two letters would walk most of the
# index's vocabulary.
MIN_PREFIX_CHARS = 2
# Slack's ``count``: 20 by default, at most 100 matches per page.
DEFAULT_COUNT = 20
MAX_COUNT = 100
# The deepest page answered: Slack's clients page through at most 100 pages; beyond, a page is
# answered empty (with the true total), never clamped to another page's matches.
MAX_PAGE = 100

# What ``unicode61`` keeps as token characters: letters and digits (Unicode categories L* and N*);
# everything else separates tokens. ``[^\W_]`` is Python's letters and digits without ``_``.
TOKEN = re.compile(r"[^\W_]+")
# A quoted phrase, an optional leading ``-``; or a run of non-space characters.
_PIECE = re.compile(r'(-?)"([^"]*)"?|(\S+)')
_CHANNEL_REF = re.compile(r"^<#([A-Z0-9]+)(?:\|[^>]*)?>$")
_USER_REF = re.compile(r"^<@([A-Z0-9]+)(?:\|[^>]*)?>$")


class QueryError(ValueError):
    """A query refused whole: :attr:`code` is the Slack error (``no_query``, ``invalid_arguments``)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Term:
    """One word or phrase: its tokens, and whether its last token is a prefix."""

    tokens: tuple[str, ...]
    prefix: bool = False

    def fts(self) -> str:
        """The FTS5 phrase: the tokens in double quotes (they hold no quote), ``*`` if a prefix."""
        return '"' + " ".join(self.tokens) + '"' + ("*" if self.prefix else "")


@dataclass(frozen=True)
class SearchQuery:
    """A parsed query: what to match, what to exclude, and the conversation and author filters.

    ``channels`` holds channel ids (``C123``) and names (``#general``) as written; ``users``
    holds user ids, ``@name``s and ``me``: the caller resolves them (an unknown one matches
    nothing)."""

    include: tuple[Term, ...] = ()
    exclude: tuple[Term, ...] = ()
    channels: tuple[str, ...] = field(default=())
    users: tuple[str, ...] = field(default=())

    def match(self) -> str | None:
        """The FTS5 ``MATCH`` expression, or None when nothing is searched for (no word left)."""
        if not self.include:
            return None
        expression = "(" + " AND ".join(t.fts() for t in self.include) + ")"
        if self.exclude:
            expression += " NOT (" + " OR ".join(t.fts() for t in self.exclude) + ")"
        return expression


def parse(text: str | None) -> SearchQuery:
    """``text`` as a :class:`SearchQuery`. Raises :class:`QueryError`: ``no_query`` for a missing or
    blank query, ``invalid_arguments`` past :data:`MAX_QUERY_CHARS`, :data:`MAX_QUERY_TERMS` or
    :data:`MAX_QUERY_TOKENS`."""
    if text is None or not text.strip():
        raise QueryError("no_query")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError("invalid_arguments")
    include: list[Term] = []
    exclude: list[Term] = []
    channels: list[str] = []
    users: list[str] = []
    pieces = _PIECE.findall(text)
    if len(pieces) > MAX_QUERY_TERMS:
        raise QueryError("invalid_arguments")
    for minus, phrase, word in pieces:
        if not word:  # a quoted phrase
            term = _term(phrase, prefix=False)
            negated = bool(minus)
        elif _modifier(word, channels, users):
            continue
        else:
            negated = word.startswith("-") and len(word) > 1
            word = word[1:] if negated else word
            term = _term(word, prefix=word.endswith("*"))
        if term is not None:
            (exclude if negated else include).append(term)
    if sum(len(term.tokens) for term in (*include, *exclude)) > MAX_QUERY_TOKENS:
        raise QueryError("invalid_arguments")
    return SearchQuery(tuple(include), tuple(exclude), tuple(channels), tuple(users))


def _term(text: str, *, prefix: bool) -> Term | None:
    """The term of ``text``'s tokens (None if it has none); a prefix only if its last token is
    at least :data:`MIN_PREFIX_CHARS` long."""
    tokens = tuple(TOKEN.findall(text))
    if not tokens:
        return None
    return Term(tokens, prefix and len(tokens[-1]) >= MIN_PREFIX_CHARS)


def _modifier(word: str, channels: list[str], users: list[str]) -> bool:
    """Take ``in:...`` / ``from:...`` into ``channels`` / ``users``; False for anything else."""
    key, colon, value = word.partition(":")
    if not colon or not value:
        return False
    key = key.lower()
    if key == "in":
        ref = _CHANNEL_REF.match(value)
        if ref:
            channels.append(ref.group(1))
        elif value.startswith("<"):
            return False
        else:
            channels.append("#" + value.lstrip("#").lower())
        return True
    if key == "from":
        ref = _USER_REF.match(value)
        if ref:
            users.append(ref.group(1))
        elif value.lower() == "me":
            users.append("me")
        elif value.startswith("<"):
            return False
        else:  # @name or name, as in: takes #name or name
            users.append("@" + value.lstrip("@").lower())
        return True
    return False


@dataclass(frozen=True)
class Paging:
    """Where one page sits in the answer: ``offset`` rows skipped, at most ``count`` read."""

    count: int
    page: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.count

    @property
    def beyond(self) -> bool:
        """Past :data:`MAX_PAGE`: answered empty."""
        return self.page > MAX_PAGE

    def shapes(self, total: int, shown: int) -> dict[str, dict[str, int]]:
        """Slack's ``paging`` and ``pagination`` for ``total`` matches, ``shown`` of them on this page."""
        pages = math.ceil(total / self.count)
        first = self.offset + 1 if shown else 0
        return {
            "paging": {"count": self.count, "total": total, "page": self.page, "pages": pages},
            "pagination": {
                "total_count": total,
                "page": self.page,
                "per_page": self.count,
                "page_count": pages,
                "first": first,
                "last": self.offset + shown,
            },
        }


def paging(count: int, page: int) -> Paging:
    """``count`` clamped to 1..:data:`MAX_COUNT` (0 or less: :data:`DEFAULT_COUNT`), ``page`` at least 1."""
    count = DEFAULT_COUNT if count <= 0 else min(count, MAX_COUNT)
    return Paging(count, max(page, 1))
