"""``rtm status``: the fleet as Consul sees it: instances per service with health, and the ring."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import consul

from services.config import consul_default, env_default, split_host_port
from services.ring import CHANNEL_RING_KEY, RingDocument

SERVICES = ("webapp", "admin-server", "channel-server", "gateway", "charm", "presence")


def consul_address(args: argparse.Namespace) -> str:
    if args.consul:
        return str(args.consul)
    fleet = Path(args.data_dir) / "fleet.json"
    if fleet.exists():
        return str(json.loads(fleet.read_text())["consul_url"])
    return consul_default()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtm status", description=__doc__)
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"))
    parser.add_argument("--consul", default="", help="Consul host:port (default: from DATA_DIR/fleet.json)")
    args = parser.parse_args(argv)
    host, port = split_host_port(consul_address(args))
    client = consul.Consul(host=host, port=port)
    try:
        _, registered = client.catalog.services()
    except Exception as exc:
        print(f"rtm status: cannot reach Consul at {host}:{port}: {exc}")
        return 1
    for service in [s for s in SERVICES if s in registered] + sorted(set(registered) - set(SERVICES) - {"consul"}):
        _, entries = client.health.service(service)
        print(f"{service} ({len(entries)})")
        for entry in entries:
            svc = entry["Service"]
            status = "passing" if all(c["Status"] == "passing" for c in entry["Checks"]) else "critical"
            tags = ",".join(svc.get("Tags") or [])
            print(f"  {svc['ID']:<24} {svc['Address']}:{svc['Port']:<6} {status:<9} {tags}")
    _, raw = client.kv.get(CHANNEL_RING_KEY)
    doc = RingDocument.from_json(raw["Value"] if raw else None)
    print(f"channel ring v{doc.version}")
    for slot, owner in sorted(doc.slots.items()):
        print(f"  {slot:<8} -> {owner or 'NO OWNER (degraded)'}")
    return 0
