"""Process lifecycle shared by every rtm process.

``run_service(start)`` installs uvloop when available, runs ``start()`` (an
async function that starts serving and returns an async ``stop`` callable),
prints the ready line, waits for SIGTERM or SIGINT, then calls ``stop``:
deregister first, stop accepting, drain with a bound, close. A second signal
while stopping exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from services.errors import CONFIG_ERROR_EXIT_CODE, ConfigError

# The line a process prints once it is registered and serving; launchers wait for it.
READY_PREFIX = "RTM-READY "

log = logging.getLogger("rtm.process")

StopFn = Callable[[], Awaitable[None]]
StartFn = Callable[[], Awaitable[tuple[dict[str, Any], StopFn]]]

STOP_TIMEOUT_S = 10.0
# What a process that cannot start says, instead of a traceback, when it cannot bind its port or its
# Consul refuses the connection (run alone: docs/design.md, "The processes").
START_HINTS = {
    errno.EADDRINUSE: "another fleet holds it, or an outgoing connection when the port is in the kernel's "
    "ephemeral range (32768 and up on Linux): give `rtm up` another --port-base, below that range",
    errno.ECONNREFUSED: "nothing listens there: is Consul running at --consul (default RTM_CONSUL, "
    "CONSUL_HTTP_ADDR, then 127.0.0.1:8500)? `rtm consul-dev` is one, `rtm up` starts one with the fleet",
}


def announce_ready(info: dict[str, Any]) -> None:
    """Print the one ready line that the launcher and ``rtm up`` wait for."""
    sys.stdout.write(READY_PREFIX + json.dumps(info, sort_keys=True) + "\n")
    sys.stdout.flush()


def install_event_loop_policy() -> str:
    """Use uvloop when installed; return the loop's name for the logs."""
    if os.environ.get("RTM_NO_UVLOOP"):
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run_service(start: StartFn) -> int:
    """Run one service until SIGTERM/SIGINT; return the process exit code."""
    loop_name = install_event_loop_policy()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        signals_seen = 0

        def on_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("second signal %s while stopping: exiting now", signum)
                os._exit(1)
            log.info("signal %s: stopping", signum)
            stop_requested.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            info, stop = await start()
        except OSError as exc:  # aiohttp's ClientConnectorError is one, with the refusal's errno
            if exc.errno not in START_HINTS:
                raise
            log.error("cannot start: %s (%s)", exc.strerror, START_HINTS[exc.errno])
            return 1
        info.setdefault("loop", loop_name)
        info.setdefault("pid", os.getpid())
        announce_ready(info)
        await stop_requested.wait()
        try:
            await asyncio.wait_for(stop(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("stop did not finish within %ss", STOP_TIMEOUT_S)
            return 1
        return 0

    profiler = _start_profiler()
    try:
        return asyncio.run(main())
    finally:
        if profiler is not None:
            profiler()


# ``RTM_CPROFILE_DIR=/some/dir``: the process runs under cProfile and writes
# ``<dir>/<service>-<pid>.prof`` when it stops cleanly (docs/publish-path.md).
# py-spy cannot see the frames of callbacks that uvloop runs, so this is how the
# publish path was profiled; off unless the variable is set.
CPROFILE_DIR_ENV = "RTM_CPROFILE_DIR"


def _start_profiler() -> Callable[[], None] | None:
    directory = os.environ.get(CPROFILE_DIR_ENV)
    if not directory:
        return None
    import cProfile

    profiler = cProfile.Profile()
    name = os.path.basename(sys.argv[0]) if len(sys.argv) < 2 else "-".join(a for a in sys.argv[1:2])
    path = os.path.join(directory, f"{name}-{os.getpid()}.prof")
    profiler.enable()

    def stop() -> None:
        profiler.disable()
        os.makedirs(directory, exist_ok=True)
        profiler.dump_stats(path)
        log.info("cProfile written to %s", path)

    return stop


class Service(Protocol):
    """What every fleet process's main class offers."""

    async def start(self) -> dict[str, Any]:
        """Start serving and registering; return the ready info."""

    async def stop(self) -> None:
        """Deregister, stop accepting, drain with a bound, close."""


# How long a service that failed to start gets to close what it had opened (stop_half_started).
HALF_STARTED_STOP_TIMEOUT_S = 2.0


async def stop_half_started(service: Service) -> None:
    """Close what a service that failed to start had opened (its Consul client among them, else
    asyncio reports an unclosed session under the reason it could not start), as far as its
    ``stop()`` can: best effort, bounded by :data:`HALF_STARTED_STOP_TIMEOUT_S`."""
    try:
        await asyncio.wait_for(service.stop(), HALF_STARTED_STOP_TIMEOUT_S)
    except Exception:  # parts that never started may not stop cleanly; the start's error is what counts
        log.debug("stopping a service that did not start", exc_info=True)


def run_main(args: Any, id_prefix: str, make: Callable[[Any], Service]) -> int:
    """The ``main`` of a fleet process: name the instance, set up logs, run ``make(args)``."""
    from services import logs, tls
    from services.config import instance_id

    # Without --instance-id, a process is who its certificate says it is.
    args.instance_id = instance_id(id_prefix, args.instance_id or tls.cert_instance(args))
    logs.configure(args.instance_id, args.log_level)

    async def start() -> tuple[dict[str, Any], StopFn]:
        service = make(args)
        try:
            return await service.start(), service.stop
        except Exception:
            await stop_half_started(service)
            raise

    try:
        return run_service(start)
    except ConfigError as exc:  # a bad flag: said in one line, as argparse says its own
        print(f"rtm {id_prefix}: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
