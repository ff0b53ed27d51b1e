"""The ``rtm`` command line's own behaviour (rtmctl/cli.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

RUN_TIMEOUT_S = 60.0


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """``rtm status | head``: the pipe's reader is gone before rtm writes; rtm leaves quietly
    (before: a BrokenPipeError traceback, and another when Python flushed stdout at exit)."""
    with socket.socket() as probe:  # a port nobody listens on: status says it cannot reach Consul
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "rtmctl.cli",
                "status",
                "--data-dir",
                str(tmp_path),
                "--consul",
                f"127.0.0.1:{port}",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr and b"BrokenPipeError" not in done.stderr, done.stderr.decode()
