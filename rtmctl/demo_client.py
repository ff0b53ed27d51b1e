"""``rtm tail NAME`` and ``rtm post NAME CHANNEL TEXT``: a newcomer's client.

Both read ``DATA_DIR/seed.json`` (users, tokens, channels) and
``DATA_DIR/fleet.json`` (the webapp's URL) that ``rtm up`` writes, and talk to
the fleet exactly as any Slack client would: the Web API over HTTP and the
websocket URL that ``rtm.connect`` returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from services.config import env_default

RECONNECT_DELAY_S = 1.0


def fleet_file(data_dir: str | Path) -> dict[str, Any] | None:
    """``DATA_DIR/fleet.json`` as ``rtm up`` last wrote it (``api_url``: the webapp's Web API), or None
    if there is none (or none readable: ``rtm up`` replaces it whole)."""
    try:
        fleet = json.loads((Path(data_dir) / "fleet.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return dict(fleet) if isinstance(fleet, dict) else None


def load(data_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    base = Path(data_dir)
    try:
        seed = json.loads((base / "seed.json").read_text())
        fleet = json.loads((base / "fleet.json").read_text())
    except FileNotFoundError as exc:
        raise SystemExit(f"rtm: {exc.filename} not found: is the fleet up (`rtm up --data-dir {data_dir}`)?") from None
    return seed, fleet


def find_user(seed: dict[str, Any], name: str) -> dict[str, Any]:
    for user in seed["users"]:
        if name in (user["name"], user["id"]):
            return dict(user)
    raise SystemExit(f"rtm: no seeded user {name!r}; known: {', '.join(u['name'] for u in seed['users'])}")


def find_channel(seed: dict[str, Any], name: str) -> str:
    name = name.lstrip("#")
    for channel in seed["channels"]:
        if name in (channel["name"], channel["id"]):
            return str(channel["id"])
    return name  # let the webapp say channel_not_found


async def call(api_url: str, token: str, method: str, **params: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(api_url + method, data=params, headers={"Authorization": f"Bearer {token}"}) as resp:
            return dict(await resp.json(content_type=None))


def unreachable(command: str, api_url: str, exc: aiohttp.ClientError, data_dir: str) -> str:
    """What ``rtm post``/``rtm tail`` say when the webapp does not answer: the fleet is not up."""
    return f"rtm {command}: cannot reach the webapp at {api_url} ({exc}): is the fleet up (`rtm up --data-dir {data_dir}`)?"


def describe(event: dict[str, Any], names: dict[str, str], channels: dict[str, str]) -> str:
    """One line for ``rtm tail``. A ``team_join``/``user_change`` adds or renames its user in ``names``."""
    kind = event.get("type", "?")
    if kind == "hello":
        return "hello                  (the gateway is ready; events follow)"
    where = event.get("channel")
    if isinstance(where, dict):  # channel_joined, im_created, group_joined: the channel object
        where = where.get("name") or where.get("id")
    channel = "#" + channels.get(str(where), str(where)) if where else "-"  # tokens_revoked: no channel
    user = event.get("user")
    if isinstance(user, dict) and isinstance(user.get("id"), str):  # team_join, user_change: the user object
        names[user["id"]] = str(user.get("name") or user["id"])  # known by name from now on
        user = user["id"]
    who = names.get(str(user), str(user or ""))
    line = f"{kind:<22} {channel:<13} {who:<8}"
    if "text" in event:
        line += f" {event['text']}"
    ts = event.get("ts")
    if kind == "message" and isinstance(ts, str):
        try:
            line += f"   ({(time.time() - float(ts)) * 1000:.1f} ms after post)"
        except ValueError:
            pass
    return line


async def tail(data_dir: str, name: str, max_events: int) -> int:
    seed, fleet = load(data_dir)
    user = find_user(seed, name)
    names = {u["id"]: u["name"] for u in seed["users"]}
    channels = {c["id"]: c["name"] for c in seed["channels"]}
    seen = 0
    connected_once = False
    while True:
        try:
            reply = await call(fleet["api_url"], user["token"], "rtm.connect")
        except aiohttp.ClientError as exc:
            if not connected_once:  # never reached: the fleet is not up
                print(unreachable("tail", fleet["api_url"], exc, data_dir), file=sys.stderr)
                return 1
            print(f"the webapp does not answer ({exc}); retrying", flush=True)  # restarting, say
            await asyncio.sleep(RECONNECT_DELAY_S)
            continue
        connected_once = True
        if not reply.get("ok"):
            print(f"rtm.connect failed: {reply.get('error')}", file=sys.stderr)
            return 1
        print(f"connected as {user['name']} to {reply['url'].split('/ws/')[0]}", flush=True)
        try:
            async with websockets.connect(reply["url"]) as ws:
                async for raw in ws:
                    event = json.loads(raw)
                    if event.get("type") == "goodbye":
                        print("goodbye from the gateway: reconnecting", flush=True)
                        break
                    print(describe(event, names, channels), flush=True)
                    seen += 1
                    if max_events and seen >= max_events:
                        return 0
        except (OSError, websockets.ConnectionClosed) as exc:
            print(f"disconnected ({exc}); reconnecting", flush=True)
        await asyncio.sleep(RECONNECT_DELAY_S)


async def post(data_dir: str, name: str, channel: str, text: str) -> int:
    seed, fleet = load(data_dir)
    user = find_user(seed, name)
    try:
        reply = await call(
            fleet["api_url"], user["token"], "chat.postMessage", channel=find_channel(seed, channel), text=text
        )
    except aiohttp.ClientError as exc:
        print(unreachable("post", fleet["api_url"], exc, data_dir), file=sys.stderr)
        return 1
    if not reply.get("ok"):
        error = reply.get("error")
        if error == "channel_not_found" and find_channel(seed, channel) == channel.lstrip("#"):  # not in seed.json
            known = ", ".join(str(c["name"]) for c in seed["channels"])
            print(
                f"rtm post: no channel {channel!r} (channel_not_found); known: {known}, or a channel's id",
                file=sys.stderr,
            )
        else:
            print(f"rtm post: the webapp refused the post: {error}", file=sys.stderr)
        return 1
    print(f"posted to #{channel.lstrip('#')} as {user['name']}: ts {reply['ts']}")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"rtm {command}")
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"))
    parser.add_argument("name", help="a seeded user's name (see DATA_DIR/seed.json)")
    if command == "post":
        parser.add_argument("channel")
        parser.add_argument("text")
        args = parser.parse_args(rest)
        return asyncio.run(post(args.data_dir, args.name, args.channel, args.text))
    parser.add_argument("--max-events", type=int, default=0, help="exit after this many events (0: run until Ctrl-C)")
    args = parser.parse_args(rest)
    try:
        return asyncio.run(tail(args.data_dir, args.name, args.max_events))
    except KeyboardInterrupt:
        return 0
