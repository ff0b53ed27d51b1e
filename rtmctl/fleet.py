"""``rtm up``: the whole fleet on one machine, as separate processes, supervised.

Start order: dev Consul (unless ``--consul`` points at a real one), channel
servers (actives and a spare), CHARMs (the leader writes the channel ring),
admin servers, the webapp, gateways. Each process
is started with :func:`rtmctl.launcher.start` and counts as up once it has
printed its ready line (it is registered in Consul and serving by then).

Once everything is up, ``DATA_DIR/fleet.json`` lists every process (service,
instance id, address, port, metrics port, pid) and the webapp and Consul URLs;
``DATA_DIR/seed.json`` lists the demo users (with tokens) and channels. A
crashed child is reported and restarted with the same arguments (so it keeps
its instance id; if CHARM gave its slot to a spare meanwhile, it comes back as
a spare). Ctrl-C or SIGTERM stops everything,
gateways first, Consul last.

Each process's output goes to ``DATA_DIR/logs/<name>.log`` (its name in ``fleet.json``; a restarted
process appends), bounded by ``--log-file-max-bytes`` with one previous file kept
(:mod:`rtmctl.log_file`); ``rtm logs`` reads them (:mod:`rtmctl.logs`).

Every port derives from ``--port-base`` (see :func:`rtmctl.fleet_plan.plan`), so two fleets run
side by side with different bases.

Secrets (``docs/consul-acl.md``): on first start ``rtm up`` makes, in its data
directory (0700), each file 0600 from its first byte (:mod:`services.secret_file`)
and reused on restart: ``secret`` (the fleet secret, from which each job's key
is derived, :mod:`services.keys`), ``consul-acl-token`` (the dev Consul agent's
management token, which only the agent holds), ``consul-acl-tokens.json`` (one
Consul token per role with that role's rules, :mod:`rtmctl.consul_roles`: each
child sends only its own role's; ``rtm up`` and the ``rtm`` commands the
operator's), ``operator-token`` (what ``--debug-faults`` endpoints
require) and ``seed.json`` (user tokens). Children get them through the
environment, never on their command line.

Trust (docs/trust.md): on first start ``DATA_DIR/tls/`` gets the fleet CA and
one certificate and key per process (named by its place in the plan, e.g.
``channel-server-0``, its instance id inside), plus ``operator`` for the
``rtm`` commands that talk to CHARM; every file 0600. A restart reuses them,
and with them the instance ids. Every process gets ``--tls-ca``,
``--tls-cert`` and ``--tls-key``; ``--wire-tls off`` exists for measurement
only and is never chosen unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from consul_dev.app import ACL_TOKEN_ENV, ACL_TOKENS_FILE_ENV
from consul_dev.app import SERVICE_NAME as CONSUL_DEV
from rtmctl.consul_roles import TOKENS_FILE, TokensFileError, ensure_role_tokens
from rtmctl.fleet_lock import hold_data_dir
from rtmctl.fleet_plan import CONSUL_PORT_OFFSET, RENEW_WITHIN, ProcessSpec, plan, regions_of
from rtmctl.launcher import LaunchError, RunningProcess, rtm_argv, rtm_command, start
from rtmctl.log_file import LOG_FILE_MAX_BYTES, LOG_FILE_MAX_BYTES_LIMIT, ProcessLogFile, log_dir, log_path
from services import regions, tls
from services.certs import FleetCertificates
from services.config import (
    CONSUL_HTTP_TOKEN_ENV,
    CONSUL_HTTP_TOKEN_FILE_ENV,
    CONSUL_TOKEN_ENV,
    Parser,
    consul_token_default,
    split_host_port,
)
from services.discovery import sync_client
from services.errors import BadDocument
from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, OPERATOR, PRESENCE, WEBAPP, PeerIdentity
from services.process import announce_ready
from services.ring import CHANNEL_RING_KEY, PRESENCE_RING_KEY, RingDocument
from services.secret_file import ensure_private_dir, ensure_secret_file

SECRET_FILE = "secret"
CONSUL_ACL_TOKEN_FILE = "consul-acl-token"
OPERATOR_TOKEN_FILE = "operator-token"
OPERATOR_TOKEN_ENV = "RTM_OPERATOR_TOKEN"
SECRET_ENV = "RTM_SECRET"
# Each child gets only the secrets its job needs (as deploy/ gives each container its own): the fleet
# secret where the tickets' key is derived (the webapp mints, gateways verify), the operator token
# where --debug-faults would serve, the dev agent's management token (its own --acl-token) and the
# path of its tokens file only to the agent, and to every other child its own role's Consul token
# (rtmctl.consul_roles), never another's.
FLEET_SECRET_HOLDERS = frozenset({WEBAPP, GATEWAY})
DEBUG_FAULTS_SERVERS = frozenset({CHANNEL_SERVER, PRESENCE})
# The secrets that rtm up hands out: a child never inherits one it was not given from rtm up's own
# environment (an operator's shell may export them, e.g. after sourcing deploy/.env); nor a Consul
# token of Consul's own tools (CONSUL_HTTP_TOKEN*), which it would read if RTM_CONSUL_TOKEN were unset.
FLEET_SECRET_ENVS = (
    SECRET_ENV,
    OPERATOR_TOKEN_ENV,
    ACL_TOKEN_ENV,
    ACL_TOKENS_FILE_ENV,
    CONSUL_TOKEN_ENV,
    CONSUL_HTTP_TOKEN_ENV,
    CONSUL_HTTP_TOKEN_FILE_ENV,
)

DEFAULT_PORT_BASE = 7400
SUPERVISE_INTERVAL_S = 0.5
RESTART_BACKOFF_S = 1.0
MAX_RESTARTS_PER_MINUTE = 5
SEED_USERS = 5
SEED_CHANNELS = 2
SEED_BOTS = 1
SEED_TIMEOUT_S = 120.0  # `rtm seed` of the default team takes well under a second
TLS_DIR = "tls"
OPERATOR_CERT = "operator"  # DATA_DIR/tls/operator.{crt,key}: the `rtm` commands' identity towards CHARM
OPERATOR_INSTANCE = "rtm-cli"


def ensure_secret(data_dir: Path) -> str:
    """The fleet secret in ``DATA_DIR/secret`` (made 0600 on first start)."""
    return ensure_secret_file(data_dir / SECRET_FILE)


def wait_for_ring(consul_addr: str, timeout_s: float, key: str = CHANNEL_RING_KEY, token: str = "") -> RingDocument:
    """Block until CHARM has written the ring at ``key`` (blocking queries, bounded)."""
    client = sync_client(consul_addr, token)
    deadline = time.monotonic() + timeout_s
    index = None
    while time.monotonic() < deadline:
        index, current = client.kv.get(key, index=index, wait="2s")
        try:
            doc = RingDocument.from_json(current["Value"] if current else None, key)
        except BadDocument:
            continue  # not a ring (yet): CHARM repairs or writes it
        if doc.slots and all(doc.slots.values()):
            return doc
    raise LaunchError(f"CHARM did not write a complete ring at {key} within {timeout_s}s")


WEBAPP_SEES_GATEWAYS_POLL_S = 0.05  # how often rtm up asks the webapp's /healthz at startup


def wait_for_webapp_gateways(webapp_url: str, gateways: int, timeout_s: float) -> None:
    """Block until the webapp's Consul watch has seen ``gateways`` gateways (its /healthz), so
    the first ``rtm.connect`` after "ready" gets a gateway, not ``service_unavailable``."""
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{webapp_url}/healthz", timeout=2.0) as resp:
                seen = int(json.loads(resp.read()).get("gateways", 0))
        except (OSError, ValueError):
            seen = -1
        if seen >= gateways:
            return
        time.sleep(WEBAPP_SEES_GATEWAYS_POLL_S)  # wait-ok: bounded poll of another process
    raise LaunchError(f"the webapp saw {max(seen, 0)} of {gateways} gateways within {timeout_s}s")


def write_region_map(consul_addr: str, region_names: list[str], token: str = "") -> None:
    """Each region falls back to the others in the order given (unless an operator wrote a map)."""
    client = sync_client(consul_addr, token)
    client.kv.put(regions.REGION_MAP_KEY, json.dumps(regions.default_map(region_names)), cas=0)


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir = Path(args.data_dir).resolve()
        ensure_private_dir(self.data_dir)
        self.running: dict[str, RunningProcess] = {}
        self.specs: dict[str, ProcessSpec] = {}
        self.consul_addr = args.consul or f"{args.host}:{args.port_base + CONSUL_PORT_OFFSET}"
        self.stopping = threading.Event()
        self.echo = sys.stdout if args.verbose else None
        self.log_dir = log_dir(self.data_dir) if args.log_file_max_bytes else None  # None: no log files
        self.role_tokens: dict[str, str] = {}  # role -> its Consul token (the dev agent only)
        self.lock_fd: int | None = None  # DATA_DIR/rtm-up.lock, held from up() on (hold_data_dir)

    def launch(self, spec: ProcessSpec) -> RunningProcess:
        env = self.child_env(spec.service)
        unset = [name for name in FLEET_SECRET_ENVS if name not in env]  # not from our own environment either
        proc = start(
            spec.name,
            spec.argv,
            env=env,
            unset=unset,
            echo=self.echo,
            ready_timeout_s=self.args.ready_timeout_s,
            pass_fds=() if self.lock_fd is None else (self.lock_fd,),  # the fleet holds its directory
            log_file=self.log_file(spec.name),
        )
        self.running[spec.name] = proc
        return proc

    def log_file(self, name: str) -> ProcessLogFile | None:
        """Where the process ``name``'s output goes (appended to; None with --log-file-max-bytes 0)."""
        if self.log_dir is None:
            return None
        return ProcessLogFile(log_path(self.log_dir, name), self.args.log_file_max_bytes)

    def child_env(self, service: str) -> dict[str, str]:
        """The secrets a child of ``service`` is started with (see :data:`FLEET_SECRET_HOLDERS`)."""
        env = dict(self.env)
        if service not in FLEET_SECRET_HOLDERS:
            env.pop(SECRET_ENV, None)
        if not (self.args.debug_faults and service in DEBUG_FAULTS_SERVERS):
            env.pop(OPERATOR_TOKEN_ENV, None)
        if service != CONSUL_DEV:
            env.pop(ACL_TOKEN_ENV, None)
            env.pop(ACL_TOKENS_FILE_ENV, None)
        if self.role_tokens:  # the dev agent: each role's own token; the agent itself sends none
            env.pop(CONSUL_TOKEN_ENV, None)
            if service in self.role_tokens:
                env[CONSUL_TOKEN_ENV] = self.role_tokens[service]
        return env

    def up(self) -> None:
        self.lock_fd = hold_data_dir(self.data_dir)  # a second fleet would share its database
        self.env = {
            SECRET_ENV: ensure_secret(self.data_dir),
            OPERATOR_TOKEN_ENV: ensure_secret_file(self.data_dir / OPERATOR_TOKEN_FILE),
        }
        if not self.args.consul:
            # The dev agent enforces ACLs (default deny): a management token that only the agent
            # holds, and one token per role whose rules are deploy/'s policies; each child gets
            # its own role's. rtm up itself acts as the operator (it writes the region map).
            self.env[ACL_TOKEN_ENV] = ensure_secret_file(self.data_dir / CONSUL_ACL_TOKEN_FILE)
            self.env[ACL_TOKENS_FILE_ENV] = str(self.data_dir / TOKENS_FILE)
            self.role_tokens = ensure_role_tokens(self.data_dir)
            self.consul_token = self.role_tokens[OPERATOR]
            host, port = split_host_port(self.consul_addr)
            spec = ProcessSpec(
                CONSUL_DEV, CONSUL_DEV, rtm_argv("consul-dev", "--host", host, "--port", str(port)), port
            )
            self.specs[spec.name] = spec
        else:  # a real Consul: its operator gave the token (--consul-token / RTM_CONSUL_TOKEN / CONSUL_HTTP_TOKEN)
            self.consul_token = self.args.consul_token
        self.env[CONSUL_TOKEN_ENV] = self.consul_token
        if not self.args.consul:
            self.launch(self.specs[CONSUL_DEV])
        self.seed = self.ensure_seed()
        write_region_map(self.consul_addr, regions_of(self.args), self.consul_token)
        specs = plan(self.args, self.data_dir, self.consul_addr, self.certificates())
        for spec in specs:
            self.specs[spec.name] = spec
        order = [CHANNEL_SERVER, PRESENCE, CHARM, ADMIN_SERVER, WEBAPP, GATEWAY]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for service in order:
                group = [s for s in specs if s.service == service]
                list(pool.map(self.launch, group))
                if service == CHARM:
                    wait_for_ring(self.consul_addr, self.args.ready_timeout_s, token=self.consul_token)
                    if self.args.presence_servers:
                        wait_for_ring(
                            self.consul_addr, self.args.ready_timeout_s, PRESENCE_RING_KEY, token=self.consul_token
                        )
        wait_for_webapp_gateways(
            self.fleet_info()["webapp_url"],
            sum(1 for s in specs if s.service == GATEWAY),
            self.args.ready_timeout_s,
        )
        self.write_fleet_json()

    def certificates(self) -> FleetCertificates | None:
        """The fleet CA and the operator's certificate (each process's is made by :func:`plan`)."""
        if self.args.wire_tls == tls.WIRE_TLS_OFF:
            print("rtm up: --wire-tls off: the internal wire is PLAINTEXT and unauthenticated", file=sys.stderr)
            return None
        certs = FleetCertificates(self.data_dir / TLS_DIR)
        certs.ensure_ca()
        certs.ensure(OPERATOR_CERT, PeerIdentity(OPERATOR, OPERATOR_INSTANCE), RENEW_WITHIN)
        return certs

    def ensure_seed(self) -> dict[str, Any]:
        path = self.data_dir / "seed.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        # Through the webapp's own entry point (`rtm seed`), which writes seed.json:
        # the tooling starts services, it does not reach into their code.
        argv = rtm_argv(
            "seed",
            "--data-dir",
            str(self.data_dir),
            "--users",
            str(self.args.seed_users),
            "--channels",
            str(SEED_CHANNELS),
            "--bots",
            str(SEED_BOTS),
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SEED_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise LaunchError(f"rtm seed failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return dict(json.loads(path.read_text()))  # rtm seed wrote it 0600: it holds user tokens

    def fleet_info(self) -> dict[str, Any]:
        processes = []
        for name, proc in self.running.items():
            ready = proc.ready
            processes.append(
                {
                    "name": name,
                    "service": ready.get("service", self.specs[name].service),
                    "id": ready.get("id", name),
                    "host": ready.get("host"),
                    "port": ready.get("port"),
                    "metrics_port": ready.get("metrics_port", ready.get("port")),
                    "pid": proc.pid,
                    **({"region": ready["region"]} if "region" in ready else {}),
                    **({"internal_port": ready["internal_port"]} if "internal_port" in ready else {}),
                }
            )
        webapp = next(p for p in processes if p["service"] == WEBAPP)
        return {
            "webapp_url": f"http://{webapp['host']}:{webapp['port']}",
            "api_url": f"http://{webapp['host']}:{webapp['port']}/api/",
            "consul_url": f"http://{self.consul_addr}",
            "data_dir": str(self.data_dir),
            "tls_dir": "" if self.args.wire_tls == tls.WIRE_TLS_OFF else str(self.data_dir / TLS_DIR),
            "log_dir": "" if self.log_dir is None else str(self.log_dir),
            "supervisor_pid": os.getpid(),
            "processes": processes,
        }

    def write_fleet_json(self) -> None:
        path = self.data_dir / "fleet.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.fleet_info(), indent=2))
        tmp.replace(path)

    def print_ready(self) -> None:
        info = self.fleet_info()
        print(f"\nrtm fleet is up ({len(info['processes'])} processes). Data: {self.data_dir}\n")
        print(f"  {'service':<15} {'instance':<22} {'address':<22} {'metrics':<8} pid")
        for p in sorted(info["processes"], key=lambda p: (p["service"], p["id"])):
            print(f"  {p['service']:<15} {p['id']:<22} {p['host']}:{p['port']:<12} {p['metrics_port']!s:<8} {p['pid']}")
        users = self.seed.get("users", [])
        alice = users[0] if users else {"name": "alice", "token": "?"}
        general = next((c for c in self.seed.get("channels", []) if c["name"] == "general"), {"id": "C?"})
        dd = self.dd_flag()
        rtm = rtm_command()
        print(
            f"""
  Browser:  {info["webapp_url"]}/   (the Slack-like client; docs/browser.md)
  Web API:  {info["api_url"]}
  Consul:   {info["consul_url"]}
  Written:  {self.data_dir}/fleet.json, {self.data_dir}/seed.json
  Logs:     {self.logs_where()}

Try it (in another terminal):
  {rtm} tail bob{dd}                              # watch events arrive as bob
  {rtm} post alice general "hello, fleet"{dd}     # post as alice
  curl -s {info["api_url"]}chat.postMessage -H 'Authorization: Bearer {alice["token"]}' \\
       -d channel={general["id"]} -d text=hello
Ctrl-C stops the fleet.""",
            flush=True,
        )

    def logs_where(self) -> str:
        if self.log_dir is None:
            return "to no file (--log-file-max-bytes 0); --verbose copies them here"
        return f"{self.log_dir}/<name>.log   ({rtm_command()} logs [NAME] [-f]{self.dd_flag()})"

    def dd_flag(self) -> str:
        """The ``--data-dir`` an ``rtm`` command needs to find this fleet ("" for the default)."""
        return "" if self.args.data_dir == "./.rtm" else f" --data-dir {self.args.data_dir}"

    def supervise(self) -> None:
        while not self.stopping.wait(SUPERVISE_INTERVAL_S):
            for name, proc in list(self.running.items()):
                if proc.alive() or self.stopping.is_set():
                    continue
                spec = self.specs[name]
                code = proc.popen.returncode
                proc.wait_output()  # its last lines read (and in its log file) before we print them
                where = "" if proc.log_file is None else f" (all of it: {proc.log_file.path})"
                print(
                    f"rtm up: {name} exited with {code}; last output{where}:\n{proc.logs()[-2000:]}",
                    file=sys.stderr,
                    flush=True,
                )
                now = time.monotonic()
                spec.restarts = [t for t in spec.restarts if now - t < 60] + [now]
                if len(spec.restarts) > MAX_RESTARTS_PER_MINUTE:
                    print(f"rtm up: {name} keeps crashing; not restarting it", file=sys.stderr, flush=True)
                    del self.running[name]
                    continue
                if self.stopping.wait(RESTART_BACKOFF_S):
                    return
                try:
                    self.launch(spec)
                    print(f"rtm up: restarted {name} (pid {self.running[name].pid})", flush=True)
                    self.write_fleet_json()
                except LaunchError as exc:
                    print(f"rtm up: restart of {name} failed: {exc}", file=sys.stderr, flush=True)

    def down(self) -> None:
        self.stopping.set()
        order = [GATEWAY, WEBAPP, ADMIN_SERVER, CHARM, CHANNEL_SERVER, PRESENCE, "consul-dev"]
        for service in order:
            group = [p for n, p in self.running.items() if self.specs[n].service == service]
            threads = [threading.Thread(target=p.stop) for p in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.running.clear()


def build_parser() -> Parser:
    parser = Parser(prog="rtm up", description="Start the whole fleet on this machine.")
    parser.add("--data-dir", "./.rtm", "database, secret, fleet.json and seed.json")
    parser.add("--port-base", DEFAULT_PORT_BASE, "every port derives from this; keep it below 32768 (ephemeral ports)")
    parser.add("--host", "127.0.0.1", "address every process binds and registers")
    parser.add_argument(
        "--consul",
        default=os.environ.get("RTM_CONSUL", ""),
        help="use this Consul (host:port) instead of starting the dev agent",
    )
    parser.add_argument(
        "--consul-token",
        default=consul_token_default(),
        help="ACL token for the Consul given by --consul (env RTM_CONSUL_TOKEN or CONSUL_HTTP_TOKEN), "
        "given to every process; with the dev agent, rtm up makes one token per role in "
        "DATA_DIR/consul-acl-tokens.json and gives each process its own",
    )
    parser.add("--admin-servers", 2, "admin servers")
    parser.add("--channel-servers", 3, "active channel servers (= slots of the channel ring)")
    parser.add("--spares", 1, "spare channel servers CHARM promotes when an active one fails")
    parser.add("--charms", 2, "CHARM ring managers (one leads)")
    parser.add("--presence-servers", 2, "active presence servers (= slots of the presence ring)")
    parser.add("--presence-spares", 1, "spare presence servers CHARM promotes when an active one fails")
    parser.add("--ttl-s", 2.0, "Consul TTL of channel servers: a partitioned server is replaced after this")
    parser.add("--debug-faults", False, "let tests inject faults (POST /debug/consul-partition on channel servers)")
    parser.add("--regions", "us-east,eu-west", "gateway regions, comma-separated")
    parser.add("--gateways-per-region", 1, "gateways in each region")
    parser.add("--default-region", "", "region of clients that send no hint (default: the first of --regions)")
    parser.add("--history-events", 100, "events of history per channel on channel servers")
    parser.add("--seed-users", SEED_USERS, "users in the demo team created on first start")
    parser.add("--ready-timeout-s", 30.0, "seconds each process may take to become ready")
    parser.add("--verbose", False, "copy every process's log lines to this terminal")
    parser.add(
        "--log-file-max-bytes",
        LOG_FILE_MAX_BYTES,
        "each process's output goes to DATA_DIR/logs/NAME.log, renamed NAME.log.1 at this size (0: no files)",
        at_least=0,
        at_most=LOG_FILE_MAX_BYTES_LIMIT,
    )
    parser.add(
        "--wire-tls",
        tls.WIRE_TLS_ON,
        "mutual TLS between fleet processes: on, or off (plaintext; measurement and debugging only)",
        choices=[tls.WIRE_TLS_ON, tls.WIRE_TLS_OFF],
    )
    return parser


def say(text: str, *, error: bool = False) -> None:
    """Print for the operator; a closed terminal or pipe must never stop the fleet's teardown."""
    try:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)
    except (OSError, ValueError):  # BrokenPipeError when whoever read our output is gone
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fleet = Fleet(args)

    def on_signal(signum: int, _frame: Any) -> None:
        fleet.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Whatever ends this function (a signal, a failed start, a reader of our output that went
    # away mid-print), the processes started so far are stopped: rtm up leaves none behind.
    try:
        try:
            fleet.up()
        except (LaunchError, OSError, TokensFileError) as exc:
            say(f"rtm up: failed to start the fleet: {exc}", error=True)
            return 1
        fleet.print_ready()
        if not sys.stdout.isatty():  # the machine-readable line, for scripts and tests
            announce_ready({"service": "fleet", "id": "rtm-up", **fleet.fleet_info()})
        fleet.supervise()
        return 0
    finally:
        started = bool(fleet.running)  # refused before it started anything: nothing to say it stops
        if started:
            say("\nrtm up: stopping the fleet...")
        fleet.down()
        if started:
            say("rtm up: stopped.")
