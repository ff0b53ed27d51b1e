"""The publish path's figures from the shared peers' load generator: CPU per message per process.

``../shared/peers`` (run_peer.sh) writes one JSON object per step to
``results/<peer>.jsonl``, with every process's CPU-seconds over the step's
window (publishing plus drain). This prints, per step, the offered and
accepted rate, latency, loss, and CPU µs per *message* of the webapp, the
admin servers (summed) and the channel servers (summed), and CPU µs per
*delivery* of each gateway: the measures of issue 17 (docs/publish-path.md).

    python -m bench.peers_summary RESULTS.jsonl [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.harness import fmt, md_table


def per_message(step: dict[str, Any]) -> dict[str, float | None]:
    """CPU µs per accepted message (webapp, admin and channel servers) and per delivery (gateways)."""
    cpu: dict[str, float] = step.get("cpu_per_proc_s") or {}
    messages = step.get("published_ok") or 0
    deliveries = step.get("received") or 0

    def us(seconds: float, count: int) -> float | None:
        return seconds * 1e6 / count if count else None

    out: dict[str, float | None] = {
        "webapp": us(cpu.get("webapp", 0.0), messages),
        "admin servers": us(sum(v for k, v in cpu.items() if k.startswith("as-")), messages),
        "channel servers": us(sum(v for k, v in cpu.items() if k.startswith("cs-")), messages),
    }
    gateways = sorted(k for k in cpu if k.startswith("gw-"))
    out["gateways / delivery"] = us(sum(cpu[k] for k in gateways), deliveries)
    return out


def render(steps: list[dict[str, Any]]) -> str:
    rows = []
    for s in steps:
        cpu = per_message(s)
        rows.append(
            [
                s.get("date", "")[:16],
                s.get("tag", ""),
                f"{s['clients']}/{s['rooms']}",
                f"{s['offered_rate']:g}",
                fmt(s.get("accepted_pub_rate"), 0),
                fmt(s.get("p50_ms"), 1),
                fmt(s.get("p99_ms"), 1),
                str(s.get("lost")),
                fmt(cpu["webapp"], 0),
                fmt(cpu["admin servers"], 0),
                fmt(cpu["channel servers"], 0),
                fmt(cpu["gateways / delivery"], 1),
                "saturated" if s.get("saturated") else "clean",
            ]
        )
    head = [
        "date",
        "tag",
        "clients/rooms",
        "offered msg/s",
        "accepted msg/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "webapp µs/msg",
        "admin servers µs/msg",
        "channel servers µs/msg",
        "gateways µs/delivery",
        "step",
    ]
    return md_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers_summary", description=__doc__)
    p.add_argument("results", type=Path, help="a results/*.jsonl file of the peers' load generator")
    p.add_argument("--tag", default=None, help="only steps with this tag")
    args = p.parse_args(argv)
    steps = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if args.tag is not None:
        steps = [s for s in steps if s.get("tag") == args.tag]
    print(render(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
