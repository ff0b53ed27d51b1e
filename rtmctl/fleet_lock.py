"""Who holds a data directory: one ``rtm up`` and the fleet it started, no second one.

A second fleet on the same directory would share its SQLite database and overwrite its
``fleet.json``, orphaning the first (session 12). :func:`hold_data_dir` locks
``DATA_DIR/rtm-up.lock`` before anything else starts; :func:`running_supervisor` names the
``rtm up`` that wrote ``fleet.json``, for the refusal's message; :func:`data_dir_in_use` tells a
tool whether a fleet holds the directory now.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from rtmctl.launcher import LaunchError


def running_supervisor(data_dir: Path) -> int | None:
    """The pid of the ``rtm up`` that wrote ``DATA_DIR/fleet.json``, if that process still runs
    (an ``rtm ... up`` command line, where ``/proc`` shows it: a reused pid is not taken for it)."""
    try:
        pid = int(json.loads((data_dir / "fleet.json").read_text())["supervisor_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid
    return pid if "up" in (a.decode(errors="replace") for a in argv) and any(b"rtm" in a for a in argv) else None


UP_LOCK_FILE = "rtm-up.lock"


def hold_data_dir(data_dir: Path) -> int:
    """Lock ``DATA_DIR/rtm-up.lock`` (``flock``, exclusive) for this ``rtm up`` and the fleet it
    starts; returns the descriptor. Every child inherits it, so a fleet whose supervisor was
    killed with SIGKILL still holds the directory. The lock is taken before anything else, so two
    starts racing on one directory cannot both pass. Raises :class:`LaunchError` if it is held."""
    fd = os.open(data_dir / UP_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = running_supervisor(data_dir)
        lock = data_dir / UP_LOCK_FILE
        how = (
            f"rtm up, pid {pid}: stop it first (Ctrl-C there, or SIGTERM to that pid)"
            if pid is not None
            else f"processes of a fleet whose rtm up is gone hold {lock} (`fuser {lock}` lists them): stop them first"
        )
        raise LaunchError(f"a fleet from {data_dir} is already running ({how}), or give another --data-dir") from None
    return fd


def data_dir_in_use(data_dir: Path) -> bool:
    """Whether an ``rtm up`` (or a process of its fleet) holds ``DATA_DIR/rtm-up.lock`` now. A probe:
    a shared lock taken and let go at once (an ``rtm up`` starting in that instant would be refused)."""
    try:
        fd = os.open(data_dir / UP_LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor lets go of the probe's lock
    return False
