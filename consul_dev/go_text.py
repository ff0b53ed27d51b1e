"""Go-compatible text: ``%q`` quoting and ``time.Duration`` strings, as Consul prints and parses them."""

from __future__ import annotations

import json
from typing import Final

from consul_dev.node import NS_PER_S


def go_quote(text: str) -> str:
    """Quote ``text`` like Go's ``%q`` does for ordinary strings."""
    return json.dumps(text, ensure_ascii=False)


_DURATION_UNITS_NS: Final = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": NS_PER_S,
    "m": 60 * NS_PER_S,
    "h": 3600 * NS_PER_S,
}


def parse_go_duration_ns(text: str) -> int:
    """Parse a Go ``time.Duration`` string ("10s", "1m30s", "250ms", "0") into nanoseconds.

    Raises :class:`ValueError` carrying Go's own message, e.g.
    ``time: invalid duration "abc"`` or ``time: missing unit in duration "15"``.
    """
    original = text
    quoted = go_quote(original)
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(text):
        start = pos
        while pos < len(text) and (text[pos].isdigit() or text[pos] == "."):
            pos += 1
        number = text[start:pos]
        if number in ("", ".") or number.count(".") > 1:
            raise ValueError(f"time: invalid duration {quoted}")
        unit_start = pos
        while pos < len(text) and not (text[pos].isdigit() or text[pos] == "."):
            pos += 1
        unit = text[unit_start:pos]
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS_NS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float(number) * _DURATION_UNITS_NS[unit]
    return sign * int(round(total))


def parse_go_duration_s(text: str) -> float:
    """Like :func:`parse_go_duration_ns`, in seconds."""
    return parse_go_duration_ns(text) / NS_PER_S


def format_go_duration(ns: int) -> str:
    """Format nanoseconds the way Go's ``Duration.String`` does ("10s", "24h0m0s", "1.5s", "250ms")."""

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        if not rest:
            return str(whole)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}"

    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{frac(ns, 1_000)}µs"
    if ns < NS_PER_S:
        return f"{sign}{frac(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * NS_PER_S)
    minutes, rest = divmod(rest, 60 * NS_PER_S)
    seconds = frac(rest, NS_PER_S) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return f"{sign}{seconds}"
