"""Ring slots on the command line: ``rtm logs cs-1`` and ``rtm kill channel-server cs-1`` both mean
the process that serves the slot now, read from the ring document in Consul (the dev agent as its
own process, driven through py-consul), by one resolver (rtmctl/operator.py ``slot_owner``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import consul
import pytest

from rtmctl import cli, launcher, logs
from rtmctl.fleet_lock import hold_data_dir
from rtmctl.log_file import ProcessLogFile, log_dir, log_path
from services.identity import CHANNEL_SERVER, PRESENCE
from services.ring import CHANNEL_RING_KEY, PRESENCE_RING_KEY, RingDocument
from tests.support import DEFAULT_WAIT_S, consul_dev_agent

# name (= instance id, as rtm up names them) -> service
PROCESSES = {
    "cs-aaaaaa": CHANNEL_SERVER,
    "cs-bbbbbb": CHANNEL_SERVER,
    "cs-cccccc": CHANNEL_SERVER,
    "ps-dddddd": PRESENCE,
}


@pytest.fixture(scope="module")
def agent() -> Iterator[launcher.RunningProcess]:
    with consul_dev_agent("consul-dev") as proc:
        yield proc


@dataclass
class FleetDir:
    """A data directory as `rtm up` leaves it: fleet.json (its Consul, each process with a pid: a
    sleeping child stands in for each) and each process's log file; and a client of that Consul."""

    path: Path
    client: consul.Consul
    processes: dict[str, subprocess.Popen[bytes]]


@pytest.fixture
def fleet_dir(tmp_path: Path, agent: launcher.RunningProcess) -> Iterator[FleetDir]:
    sleepers = {name: subprocess.Popen(["sleep", "600"]) for name in PROCESSES}
    held = hold_data_dir(tmp_path)  # its fleet runs: rtm kill acts only then
    try:
        for name in PROCESSES:
            writer = ProcessLogFile(log_path(log_dir(tmp_path), name))
            writer.open()
            writer.write(f"{name} says hello\n")
            writer.close()
        processes = [
            {"name": name, "id": name, "service": service, "pid": sleepers[name].pid}
            for name, service in PROCESSES.items()
        ]
        port = agent.ready["port"]
        (tmp_path / "fleet.json").write_text(
            json.dumps({"consul_url": f"http://127.0.0.1:{port}", "processes": processes})
        )
        yield FleetDir(tmp_path, consul.Consul(host="127.0.0.1", port=port), sleepers)
    finally:
        os.close(held)
        for sleeper in sleepers.values():
            sleeper.kill()
            sleeper.wait()


def put_ring(client: consul.Consul, key: str, version: int, slots: dict[str, str | None]) -> None:
    assert client.kv.put(key, RingDocument(version, slots).to_json().decode())


def rtm_logs(data_dir: Path, capsys: pytest.CaptureFixture[str], *names: str) -> tuple[int, str, str]:
    code = logs.main([*names, "-n", "1", "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def test_rtm_logs_of_a_slot_shows_the_process_serving_it_now(
    fleet_dir: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, client = fleet_dir.path, fleet_dir.client
    put_ring(client, CHANNEL_RING_KEY, 3, {"cs-0": "cs-aaaaaa", "cs-1": "cs-bbbbbb", "cs-2": None})
    put_ring(client, PRESENCE_RING_KEY, 1, {"ps-0": "ps-dddddd"})
    assert rtm_logs(data_dir, capsys, "cs-1") == (0, "cs-bbbbbb says hello\n", "")
    code, out, _ = rtm_logs(data_dir, capsys, "cs-0", "ps-0", "cs-aaaaaa")  # a slot and its owner: once
    assert (code, out) == (0, "[cs-aaaaaa] cs-aaaaaa says hello\n[ps-dddddd] ps-dddddd says hello\n")
    # CHARM gives the slot to the spare: the slot's log is the spare's from then on
    put_ring(client, CHANNEL_RING_KEY, 4, {"cs-0": "cs-aaaaaa", "cs-1": "cs-cccccc", "cs-2": None})
    assert rtm_logs(data_dir, capsys, "cs-1") == (0, "cs-cccccc says hello\n", "")
    # a slot without an owner, a slot the ring does not have: one sentence each, exit 1
    for slot in ("cs-2", "cs-7"):
        code, out, err = rtm_logs(data_dir, capsys, slot)
        assert (code, out) == (1, "") and err == (
            f"rtm logs: the channel-server ring has no slot {slot} with an owner now (see rtm status)\n"
        )
    put_ring(client, PRESENCE_RING_KEY, 2, {"ps-0": "ps-eeeeee"})  # an owner with no log in this directory
    code, _, err = rtm_logs(data_dir, capsys, "ps-0")
    assert code == 1 and err == f"rtm logs: slot ps-0 is served by ps-eeeeee, which has no log in {log_dir(data_dir)}\n"


def test_rtm_kill_of_a_slot_kills_the_process_serving_it_now(
    fleet_dir: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """The resolver rtm logs shares: ``rtm kill channel-server cs-1`` SIGKILLs the slot's owner."""
    data_dir, client = fleet_dir.path, fleet_dir.client
    put_ring(client, CHANNEL_RING_KEY, 5, {"cs-0": "cs-aaaaaa", "cs-1": "cs-cccccc"})
    killed = fleet_dir.processes["cs-cccccc"]
    assert cli.main(["kill", CHANNEL_SERVER, "cs-1", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out == f"killed {CHANNEL_SERVER} cs-cccccc (pid {killed.pid}) with SIGKILL\n"
    assert killed.wait(timeout=DEFAULT_WAIT_S) == -signal.SIGKILL
    assert all(p.poll() is None for name, p in fleet_dir.processes.items() if name != "cs-cccccc")


def test_a_forged_ring_kills_nothing_outside_the_services_own_processes(
    fleet_dir: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever writes the ring document names slot owners: an owner that is another service's process,
    or its pid, is no channel server of fleet.json, and nothing is killed (redteam14: a guard). ``rtm logs
    cs-1`` shows such an owner's log: reading, which the operator may do of every process anyway."""
    data_dir, client = fleet_dir.path, fleet_dir.client
    presence_pid = str(fleet_dir.processes["ps-dddddd"].pid)
    for owner in ("ps-dddddd", presence_pid):
        put_ring(client, CHANNEL_RING_KEY, 6, {"cs-0": "cs-aaaaaa", "cs-1": owner})
        with pytest.raises(SystemExit) as refused:
            cli.main(["kill", CHANNEL_SERVER, "cs-1", "--data-dir", str(data_dir)])
        assert "no channel-server named 'cs-1'" in str(refused.value)
    assert all(p.poll() is None for p in fleet_dir.processes.values())
