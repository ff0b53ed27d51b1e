"""Operator commands over a running fleet.

* ``rtm status``: the fleet as Consul sees it: instances per service with
  health and tags, both rings with their versions (and degraded slots), and
  the CHARM leader.
* ``rtm kill SERVICE NAME``: SIGKILL one process, for demonstrations and
  failure tests. NAME is an instance id, a ring slot (``cs-1``), or a pid;
  pids come from ``DATA_DIR/fleet.json``. A slot stands for the instance the
  ring document in Consul maps it to now (:func:`slot_owner`, which ``rtm logs``
  uses too).
* ``rtm drain REGION`` / ``rtm undrain REGION``: set or clear the region's
  drain flag in Consul; its gateways move their clients to the nearest good
  region (see :mod:`gateway.drain`) or take clients again.
* ``rtm deadletter list`` / ``rtm deadletter redrive CHANNEL:SEQ``: the events
  the hand-off parked because the fleet refused them for good (see
  :mod:`webapp_stub.handoff`), and sending one again. Both work on the
  webapp's SQLite file (``DATA_DIR/webapp.db``, or ``--db``), so they run
  where that file is and work while the webapp is down; a running webapp
  picks a redrive request up within a second (``DEADLETTER_POLL_S``).
  ``rtm status`` lists the dead letters too when it finds the file.

Every command that talks to Consul sends an ACL token: ``--consul-token``, else
``RTM_CONSUL_TOKEN`` / ``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_TOKEN_FILE``, else
the operator's token that ``rtm up`` made in ``DATA_DIR/consul-acl-tokens.json``
(so nothing more needs typing against a local fleet). It has the operator's
rights only (:mod:`rtmctl.consul_roles`): read the fleet, write the
drained-regions flags and the region map.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import consul
import requests

from rtmctl.consul_roles import TokensFileError, role_token
from rtmctl.fleet_lock import data_dir_in_use
from services import regions
from services.config import consul_default, consul_token_default, env_default
from services.discovery import sync_client
from services.errors import BadDocument
from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, OPERATOR, PRESENCE, WEBAPP
from services.ring import (
    CHANNEL_RING_KEY,
    CHANNEL_SLOT_PREFIX,
    CHARM_LEADER_KEY,
    PRESENCE_RING_KEY,
    PRESENCE_SLOT_PREFIX,
    RingDocument,
)

if TYPE_CHECKING:
    from webapp_stub.store import Store

WEBAPP_DB = "webapp.db"  # webapp_stub.store.DB_FILE (not imported: the store pulls in the webapp's code)
MAX_LISTED_DEAD_LETTERS = 50  # rtm status shows at most this many (rtm deadletter list shows all)

FLEET_HINT = "is the fleet up? give the --data-dir that `rtm up` was started with"

SERVICES = (WEBAPP, ADMIN_SERVER, CHANNEL_SERVER, GATEWAY, CHARM, PRESENCE)
# The services that own ring slots: their slots' prefix and their ring document's key.
SLOT_RINGS = {
    CHANNEL_SERVER: (CHANNEL_SLOT_PREFIX, CHANNEL_RING_KEY),
    PRESENCE: (PRESENCE_SLOT_PREFIX, PRESENCE_RING_KEY),
}


def consul_address(data_dir: str, given: str = "") -> str:
    if given:
        return given
    fleet = Path(data_dir) / "fleet.json"
    if fleet.exists():
        return str(json.loads(fleet.read_text())["consul_url"])
    return consul_default()


def consul_token(data_dir: str, given: str = "") -> str:
    """The token to send: given, else from the environment, else the operator's token in
    ``DATA_DIR/consul-acl-tokens.json``; "" if none."""
    if given:
        return given
    return consul_token_default() or role_token(Path(data_dir), OPERATOR)


def consul_client(address: str, token: str = "") -> consul.Consul:
    """A py-consul client for ``address`` that sends ``token``."""
    return sync_client(address, token)


def fleet_client(data_dir: str | Path) -> consul.Consul:
    """A client for the Consul of the fleet ``rtm up`` runs in ``data_dir``, with that fleet's token."""
    return consul_client(consul_address(str(data_dir)), consul_token(str(data_dir)))


def operator_client(args: argparse.Namespace) -> consul.Consul:
    """The Consul client an ``rtm`` command uses: address and token from its flags, env or data dir."""
    return consul_client(consul_address(args.data_dir, args.consul), consul_token(args.data_dir, args.consul_token))


def read_ring(client: consul.Consul, key: str) -> RingDocument:
    _, raw = client.kv.get(key)
    return RingDocument.from_json(raw["Value"] if raw else None)


def slot_service(name: str) -> str | None:
    """The service whose ring has slots named like ``name`` (``cs-N``: channel servers, ``ps-N``:
    presence servers), or None when ``name`` is no slot name."""
    prefix, dash, number = name.partition("-")
    return next((s for s, (p, _) in SLOT_RINGS.items() if dash and p == prefix and number.isdigit()), None)


def slot_owner(client: consul.Consul, service: str, slot: str) -> str | None:
    """The instance that serves ``slot`` of ``service``'s ring now, as the ring document in Consul
    says; None when the ring has no such slot, the slot no owner, or the document is unreadable.
    Raises what py-consul raises when Consul cannot be reached or refuses the read."""
    try:
        doc = read_ring(client, SLOT_RINGS[service][1])
    except BadDocument:
        return None
    return doc.slots.get(slot)


def status(args: argparse.Namespace) -> int:
    address = consul_address(args.data_dir, args.consul)
    client = operator_client(args)
    try:
        _, registered = client.catalog.services()
    except consul.ACLPermissionDenied:
        raise  # Consul answered: main says which token to give
    except requests.exceptions.ConnectionError as exc:  # one sentence, as every other command says it
        print(f"rtm status: {consul_failure(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"rtm status: Consul at {address} did not answer the catalog: {exc}", file=sys.stderr)
        return 1
    healthy: dict[str, set[str]] = {}
    for service in [s for s in SERVICES if s in registered] + sorted(set(registered) - set(SERVICES) - {"consul"}):
        _, entries = client.health.service(service)
        print(f"{service} ({len(entries)})")
        for entry in entries:
            svc = entry["Service"]
            passing = all(c["Status"] == "passing" for c in entry["Checks"])
            if passing:
                healthy.setdefault(service, set()).add(svc["ID"])
            tags = ",".join(svc.get("Tags") or [])
            print(
                f"  {svc['ID']:<24} {svc['Address']}:{svc['Port']:<6} {'passing' if passing else 'critical':<9} {tags}"
            )
    for name, key, service in (
        ("channel", CHANNEL_RING_KEY, CHANNEL_SERVER),
        ("presence", PRESENCE_RING_KEY, PRESENCE),
    ):
        try:
            doc = read_ring(client, key)
        except BadDocument as exc:
            print(f"{name} ring: UNREADABLE in Consul ({exc}); the fleet keeps its last good ring")
            continue
        if not doc.slots:
            print(f"{name} ring: none yet")
            continue
        alive = healthy.get(service, set())
        degraded = [s for s, o in doc.slots.items() if o is None or o not in alive]
        print(f"{name} ring v{doc.version}" + (f"  DEGRADED: {', '.join(sorted(degraded))}" if degraded else ""))
        for slot, owner in sorted(doc.slots.items()):
            state = "" if slot not in degraded else "   <- no live owner"
            print(f"  {slot:<8} -> {owner or '(none)'}{state}")
    _, drained = client.kv.get(regions.DRAINED_PREFIX, keys=True)
    names = sorted(k.removeprefix(regions.DRAINED_PREFIX) for k in (drained or []))
    print(f"drained regions: {', '.join(names) if names else 'none'}")
    info = leader_address(client)
    print(f"CHARM leader: {info['id']} ({info['host']}:{info['port']})" if info else "CHARM leader: none")
    db = webapp_db(args)
    if db is not None:
        from webapp_stub.schema import SchemaMismatch

        try:
            print_dead_letters(db, limit=MAX_LISTED_DEAD_LETTERS)
        except SchemaMismatch as exc:
            print(f"dead letters: unknown ({exc})")
    return 0


def webapp_db(args: argparse.Namespace) -> Path | None:
    """The webapp's database: ``--db``, else ``DATA_DIR/webapp.db``; None if absent."""
    path = Path(getattr(args, "db", "") or Path(args.data_dir) / WEBAPP_DB)
    return path if path.is_file() else None


def webapp_store(db: Path) -> Store:
    """The webapp's database opened beside a running webapp, maybe of another version: never
    migrated (raises :class:`~webapp_stub.schema.SchemaMismatch` when its schema is not this
    version's; ``rtm users`` opens it the same way)."""
    from webapp_stub.store import Store

    return Store(db, migrate=False)


def print_dead_letters(db: Path, limit: int | None = None) -> int:
    """Print the dead letters not yet delivered; returns how many there are. Raises
    :class:`~webapp_stub.schema.SchemaMismatch` (nothing printed) for another version's database."""
    store = webapp_store(db)
    try:
        letters = store.dead_letters()
    finally:
        store.close()
    print(f"dead letters: {len(letters) if letters else 'none'}")
    for letter in letters[:limit]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.parked_at))
        print(
            f"  {letter.eid:<24} {letter.state:<9} {letter.reason:<12} refusals={letter.refusals} "
            f"redrives={letter.redrives} parked {when}  {letter.detail[:80]}"
        )
    if limit is not None and len(letters) > limit:
        print(f"  ... and {len(letters) - limit} more (rtm deadletter list)")
    return len(letters)


def deadletter(args: argparse.Namespace) -> int:
    db = webapp_db(args)
    if db is None:
        print(f"rtm deadletter: no webapp database at {args.db or Path(args.data_dir) / WEBAPP_DB}")
        return 1
    from webapp_stub.schema import SchemaMismatch

    try:
        return deadletter_in(db, args)
    except SchemaMismatch as exc:  # nothing changed: a webapp of this version migrates it
        print(f"rtm deadletter: {exc}", file=sys.stderr)
        return 2


def deadletter_in(db: Path, args: argparse.Namespace) -> int:
    """``rtm deadletter list | redrive CHANNEL:SEQ`` on the database ``db`` (:func:`webapp_store`)."""
    if args.action == "list":
        print_dead_letters(db)
        return 0
    channel, _, seq = (args.id or "").rpartition(":")
    if not channel or not seq.isdigit():
        print(f"rtm deadletter: {args.id!r} is not a dead letter id (CHANNEL:SEQ, as rtm deadletter list shows)")
        return 2
    store = webapp_store(db)
    try:
        letter = store.request_redrive(channel, int(seq))
    finally:
        store.close()
    if letter is None:
        print(f"rtm deadletter: no dead letter {args.id}")
        return 1
    if letter.state != "redrive":
        print(f"rtm deadletter: {args.id} is {letter.state}, not parked; nothing to do")
        return 1
    print(f"{args.id} will be sent again by the webapp (within a second if it is running); see rtm deadletter list")
    return 0


def find_pid(args: argparse.Namespace) -> tuple[int, str]:
    path = Path(args.data_dir) / "fleet.json"
    if not path.is_file():
        raise SystemExit(f"rtm kill: no {path}: {FLEET_HINT}")
    fleet = json.loads(path.read_text())
    procs = [p for p in fleet["processes"] if p["service"] == args.service]
    if not procs:
        raise SystemExit(f"rtm kill: no {args.service} in {args.data_dir}/fleet.json")
    target = args.name
    if args.service in SLOT_RINGS:  # a slot name stands for its current owner
        target = slot_owner(operator_client(args), args.service, target) or target
    for proc in procs:
        if target in (proc["id"], proc["name"], str(proc["pid"])):
            return int(proc["pid"]), str(proc["id"])
    known = ", ".join(p["id"] for p in procs)
    raise SystemExit(f"rtm kill: no {args.service} named {args.name!r}; known: {known}")


def kill(args: argparse.Namespace) -> int:
    pid, instance = find_pid(args)
    if not data_dir_in_use(Path(args.data_dir)):  # fleet.json outlives its fleet; its pids get reused
        print(
            f"rtm kill: no fleet runs from {args.data_dir} now: the pids in its fleet.json are of a fleet that "
            "stopped, and may be other processes' by now",
            file=sys.stderr,
        )
        return 2
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # killed a moment ago: fleet.json names its restart once `rtm up` has made it
        print(
            f"rtm kill: {args.service} {instance} (pid {pid}) is not running; `rtm up` restarts it: see rtm status",
            file=sys.stderr,
        )
        return 1
    print(f"killed {args.service} {instance} (pid {pid}) with SIGKILL")
    return 0


def known_regions(client: consul.Consul) -> set[str]:
    """The regions the fleet knows: those of the region map in Consul KV and the ``region=`` tags of
    registered gateways (empty when there is neither, e.g. before the fleet's first start)."""
    _, raw = client.kv.get(regions.REGION_MAP_KEY)
    try:
        region_map = regions.parse_map(raw["Value"] if raw else None)
    except ValueError:  # BadDocument: the gateways' tags still name the regions
        region_map = {}
    known = set(region_map).union(*region_map.values())
    _, entries = client.health.service(GATEWAY)
    for entry in entries:
        known.update(t.removeprefix("region=") for t in entry["Service"].get("Tags") or [] if t.startswith("region="))
    return known


def drain(args: argparse.Namespace, on: bool) -> int:
    client = operator_client(args)
    key = regions.drained_key(args.region)
    if on:
        known = known_regions(client)
        if known and args.region not in known:  # a typo would drain nothing and say it had
            print(f"rtm drain: no region {args.region!r}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 1
        client.kv.put(key, str(time.time()))
        print(f"region {args.region} drained: its gateways move their clients to the nearest good region")
        _, keys = client.kv.get(regions.DRAINED_PREFIX, keys=True)
        if known and known <= regions.drained_regions(keys or [])[0]:
            print(
                "rtm drain: every region is drained now: no gateway takes clients, and rtm.connect answers "
                "service_unavailable until one is undrained (rtm undrain REGION)",
                file=sys.stderr,
            )
    else:
        _, entry = client.kv.get(key)
        if entry is None:  # nothing to undo: a typo would say it had undrained a region
            known = known_regions(client)
            if known and args.region not in known:
                print(f"rtm undrain: no region {args.region!r}; known: {', '.join(sorted(known))}", file=sys.stderr)
                return 1
            print(f"region {args.region} was not drained: it takes new clients")
            return 0
        client.kv.delete(key)
        print(f"region {args.region} undrained: it takes new clients again")
    return 0


def main(argv: list[str]) -> int:
    """``rtm status|kill|drain|undrain|deadletter``; see :func:`run_against_consul`."""
    return run_against_consul(argv[0], lambda: _run(argv))


# What a command that talks to Consul may meet there: ACLs refusing it, no Consul (py-consul's
# blocking client is requests), an unreadable tokens file. consul_failure says each in a sentence.
CONSUL_FAILURES = (consul.ACLPermissionDenied, consul.ACLDisabled, requests.exceptions.ConnectionError, TokensFileError)


def consul_failure(exc: Exception, flags: bool = True) -> str:
    """One of :data:`CONSUL_FAILURES`, as a sentence for the operator (``flags``: naming the
    ``--consul`` and ``--consul-token`` flags, for a command that has them)."""
    if isinstance(exc, (consul.ACLPermissionDenied, consul.ACLDisabled)):
        return (
            f"Consul refused the request ({exc}); give the fleet's Consul ACL token "
            f"({'--consul-token, ' if flags else ''}RTM_CONSUL_TOKEN, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE; "
            "against `rtm up`'s own Consul the operator's is read from DATA_DIR/consul-acl-tokens.json)"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        url = str(exc.request.url or "") if exc.request is not None else ""
        where = f"at {urlsplit(url).netloc}" if url else f"({exc})"
        return f"cannot reach Consul {where}; {FLEET_HINT}{' (or --consul HOST:PORT)' if flags else ''}"
    return str(exc)


def run_against_consul(command: str, run: Callable[[], int]) -> int:
    """``run()``, an ``rtm`` command that talks to Consul: a request Consul's ACLs refuse, or a
    Consul that cannot be reached, is one sentence on stderr and exit 1, not a traceback."""
    try:
        return run()
    except CONSUL_FAILURES as exc:
        print(f"rtm {command}: {consul_failure(exc)}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    from rtmctl.cli import COMMANDS  # its one-line summaries (the module's docstring covers every command)

    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"rtm {command}", description=COMMANDS[command][1])
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"))
    parser.add_argument("--consul", default="", help="Consul host:port (default: from DATA_DIR/fleet.json)")
    add_consul_token_flag(parser)
    parser.add_argument("--db", default="", help="the webapp's SQLite file (default: DATA_DIR/webapp.db)")
    if command == "deadletter":
        parser.add_argument("action", choices=("list", "redrive"))
        parser.add_argument("id", nargs="?", default="", help="CHANNEL:SEQ of the dead letter to redrive")
        return deadletter(parser.parse_args(rest))
    if command in ("drain", "undrain"):
        parser.add_argument("region")
        return drain(parser.parse_args(rest), on=command == "drain")
    if command == "kill":
        parser.add_argument("service", choices=SERVICES)
        parser.add_argument("name", help="instance id, ring slot (cs-N, ps-N) or pid")
        return kill(parser.parse_args(rest))
    return status(parser.parse_args(rest))


def add_consul_token_flag(parser: argparse.ArgumentParser) -> None:
    """``--consul-token`` for operator commands (default: env, then the operator's in DATA_DIR/consul-acl-tokens.json)."""
    parser.add_argument(
        "--consul-token",
        default="",
        help="Consul ACL token (default: RTM_CONSUL_TOKEN, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, "
        "then the operator's token in DATA_DIR/consul-acl-tokens.json)",
    )


def leader_address(client: consul.Consul) -> dict[str, Any] | None:
    _, leader = client.kv.get(CHARM_LEADER_KEY)
    if leader and leader.get("Session") and leader.get("Value"):
        return dict(json.loads(leader["Value"]))
    return None
