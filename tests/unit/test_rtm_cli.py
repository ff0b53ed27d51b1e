"""The ``rtm`` command line's own behaviour (rtmctl/cli.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import consul
import pytest

from rtmctl import cli, operator
from rtmctl.fleet_lock import hold_data_dir
from services import regions

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


def closed_port() -> int:
    """A port nobody listens on a moment later (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["ring", "show"],
        ["ring", "add-slot"],
        ["ring", "remove-slot", "cs-1"],
        ["drain", "us-east"],
        ["undrain", "us-east"],
    ],
)
def test_a_consul_that_cannot_be_reached_is_a_sentence_not_a_traceback(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No fleet at that address: one line naming the address and what to give (before: a requests
    ConnectionError traceback from every command but ``rtm status``, which printed urllib3's
    whole error on stdout)."""
    port = closed_port()
    assert cli.main([*command, "--data-dir", str(tmp_path), "--consul", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"rtm {command[0]}: cannot reach Consul at 127.0.0.1:{port}; is the fleet up?" in err, err


def test_kill_without_a_fleet_json_says_which_data_dir_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm kill`` in a directory ``rtm up`` never ran in (before: FileNotFoundError traceback)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(
            ["kill", "channel-server", "cs-1", "--data-dir", str(tmp_path), "--consul", f"127.0.0.1:{closed_port()}"]
        )
    assert (
        str(stopped.value)
        == f"rtm kill: no {tmp_path / 'fleet.json'}: is the fleet up? give the --data-dir that `rtm up` was started with"
    )


def test_ring_without_an_action_shows_the_ring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rtm ring`` alone means ``rtm ring show`` (before: argparse's "the following arguments are
    required: action", exit 2); here it gets as far as asking Consul."""
    port = closed_port()
    assert cli.main(["ring", "--data-dir", str(tmp_path), "--consul", f"127.0.0.1:{port}"]) == 1
    assert f"rtm ring: cannot reach Consul at 127.0.0.1:{port}" in capsys.readouterr().err


def test_status_with_a_token_consul_does_not_know_says_to_give_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consul answered "ACL not found" (a wrong ``--consul-token``): ``rtm status`` says Consul
    refused and which token to give (before: "cannot reach Consul at ...: ACL not found")."""

    class Refusing:
        class catalog:  # noqa: N801 (py-consul's attribute)
            @staticmethod
            def services() -> None:
                raise consul.ACLPermissionDenied("ACL not found")

    monkeypatch.setattr(operator, "operator_client", lambda args: Refusing())
    assert cli.main(["status", "--data-dir", str(tmp_path), "--consul-token", "wrong"]) == 1
    out = capsys.readouterr()
    assert "cannot reach" not in out.out + out.err
    assert out.err.startswith(
        "rtm status: Consul refused the request (ACL not found); give the fleet's Consul ACL token"
    )


def test_killing_a_process_that_is_already_gone_is_a_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm kill webapp webapp-0`` twice in a row: the second finds in fleet.json the pid the first
    killed, before ``rtm up`` has restarted it (before: a ProcessLookupError traceback)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=RUN_TIMEOUT_S)  # exited and reaped: no process has this pid now
    process = {"service": "webapp", "id": "webapp-0", "name": "webapp", "pid": gone.pid}
    (tmp_path / "fleet.json").write_text(json.dumps({"processes": [process]}))
    held = hold_data_dir(tmp_path)  # a fleet runs there
    try:
        assert cli.main(["kill", "webapp", "webapp-0", "--data-dir", str(tmp_path)]) == 1
    finally:
        os.close(held)
    assert capsys.readouterr().err == (
        f"rtm kill: webapp webapp-0 (pid {gone.pid}) is not running; `rtm up` restarts it: see rtm status\n"
    )


def test_kill_refuses_the_pids_of_a_fleet_that_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fleet.json stays after its ``rtm up`` stops, and its pids go to other processes: ``rtm kill``
    SIGKILLed whichever process had the pid now (redteam14). No fleet holds the directory: refused."""
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        process = {"service": "webapp", "id": "webapp-0", "name": "webapp", "pid": bystander.pid}
        (tmp_path / "fleet.json").write_text(json.dumps({"processes": [process]}))
        assert cli.main(["kill", "webapp", "webapp-0", "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rtm kill: no fleet runs from {tmp_path} now") and err.count("\n") == 1, err
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=RUN_TIMEOUT_S)
        assert bystander.stdin is not None
        bystander.stdin.close()


def test_a_process_whose_port_is_taken_says_so_in_one_line() -> None:
    """A second fleet on the same ports (``rtm up --data-dir other``, same ``--port-base``): the
    process that cannot bind says why and what to give, in one line (before: an OSError traceback
    from deep in the event loop, which ``rtm up`` printed as the reason it could not start)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "rtmctl.cli", "consul-dev", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"('127.0.0.1', {port}): address already in use" in done.stderr
    assert "another fleet holds it" in done.stderr and "give `rtm up` another --port-base" in done.stderr


@pytest.mark.parametrize("service", ["admin-server", "gateway"])
def test_a_process_run_alone_without_a_consul_says_where_it_looked(tmp_path: Path, service: str) -> None:
    """``rtm admin-server --port P`` run alone (docs/design.md, "The processes") with no Consul at
    ``--consul``: one line naming the address and how to get a Consul (before: aiohttp's
    ClientConnectorError traceback), and what it had opened is closed (before, the gateway's
    Consul client was reported as an unclosed session under that line)."""
    consul_port = closed_port()
    argv = [sys.executable, "-m", "rtmctl.cli", service, "--wire-tls", "off"]
    argv += ["--port", str(closed_port()), "--metrics-port", str(closed_port()), "--consul", f"127.0.0.1:{consul_port}"]
    if service == "gateway":
        argv += ["--secret", "s" * 32, "--data-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr
    assert f"cannot start: Connect call failed ('127.0.0.1', {consul_port}) (nothing listens there" in done.stderr
    assert "`rtm consul-dev` is one, `rtm up` starts one with the fleet" in done.stderr


class FakeKv:
    """The part of py-consul's KV that ``rtm drain`` uses, over a dict."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def get(self, key: str, keys: bool = False) -> tuple[int, Any]:
        if keys:
            return 1, sorted(k for k in self.data if k.startswith(key)) or None
        return 1, {"Value": self.data[key]} if key in self.data else None

    def put(self, key: str, value: str) -> bool:
        self.data[key] = value.encode()
        return True


class FakeConsul:
    def __init__(self, data: dict[str, bytes]) -> None:
        self.kv = FakeKv(data)

    class health:  # noqa: N801 (py-consul's attribute)
        @staticmethod
        def service(name: str) -> tuple[int, list[Any]]:
            return 1, []


def test_draining_the_last_good_region_warns_that_no_gateway_takes_clients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rtm drain`` of one region, then of the other: the second says that now nothing takes clients
    (before: the same line as the first, and ``rtm tail`` then said only "service_unavailable")."""
    region_map = {"us-east": ["eu-west"], "eu-west": ["us-east"]}
    fake = FakeConsul({regions.REGION_MAP_KEY: json.dumps(region_map).encode()})
    monkeypatch.setattr(operator, "operator_client", lambda args: fake)
    assert cli.main(["drain", "us-east", "--data-dir", str(tmp_path)]) == 0
    assert "every region is drained" not in capsys.readouterr().err
    assert cli.main(["drain", "eu-west", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out == "region eu-west drained: its gateways move their clients to the nearest good region\n"
    assert out.err.startswith("rtm drain: every region is drained now: no gateway takes clients")
