"""The ``rtm`` command: every process of the fleet, ``rtm up``, and a small client.

Each subcommand hands its remaining arguments to the module that owns it, so
``rtm channel-server --help`` shows that process's own flags.
"""

from __future__ import annotations

import importlib
import os
import sys

from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, PRESENCE, WEBAPP

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("rtmctl.fleet", "start the whole fleet on this machine and supervise it"),
    "consul-dev": ("consul_dev.app", "the embedded dev Consul agent"),
    WEBAPP: ("webapp_stub.app", "the webapp (Slack Web API, SQLite)"),
    ADMIN_SERVER: ("admin_server.app", "one Admin Server"),
    CHANNEL_SERVER: ("channel_server.app", "one Channel Server"),
    GATEWAY: ("gateway.app", "one Gateway Server"),
    CHARM: ("charm.app", "one CHARM ring manager"),
    PRESENCE: ("presence.app", "one Presence Server"),
    "certs": ("rtmctl.certs", "make the fleet CA and named certificates in a directory (deployments)"),
    "ring": ("rtmctl.ring", "show the rings, add or remove a slot (through the CHARM leader)"),
    "kill": ("rtmctl.operator", "SIGKILL one process of a running fleet (demos and tests)"),
    "drain": ("rtmctl.operator", "drain a gateway region: its clients move to the nearest good region"),
    "undrain": ("rtmctl.operator", "let a drained region take clients again"),
    "seed": ("webapp_stub.seed", "create the demo team in a data directory"),
    "tail": ("rtmctl.demo_client", "connect as a seeded user and print events as they arrive"),
    "post": ("rtmctl.demo_client", "post a message as a seeded user"),
    "status": ("rtmctl.operator", "print the fleet: instances, health, rings, CHARM leader, dead letters"),
    "top": ("rtmctl.top", "a live table of the fleet's processes: CPU %, memory, fds, errors/s, work/s"),
    "logs": ("rtmctl.logs", "print (and with -f follow) what the fleet's processes logged, from DATA_DIR/logs"),
    "users": ("rtmctl.users", "add your own person, bot or app (add NAME [--bot|--app] [--join C,...]), or list users"),
    "backup": ("rtmctl.backup", "write a consistent copy of the webapp's database while the fleet runs (OUT, 0600)"),
    "restore": ("rtmctl.restore", "put a backup in a data directory for rtm up to start from (BACKUP --data-dir D)"),
    "deadletter": ("rtmctl.operator", "list the webapp's dead letters, or redrive one (list | redrive CHANNEL:SEQ)"),
}

USAGE = "usage: rtm COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<15} {summary}" for name, (_, summary) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"rtm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        if command in ("tail", "post", "status", "kill", "drain", "undrain", "deadletter"):
            return int(module.main([command, *rest]))
        return int(module.main(rest))
    except BrokenPipeError:  # `rtm status | head`: the reader is gone; leave quietly (Python's signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
