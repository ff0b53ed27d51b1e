"""services.config: flags with a lower bound refuse values at or below it, given or from RTM_*."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from gateway.app import RESUME_TIMEOUT_S
from gateway.app import build_parser as gateway_parser


@pytest.mark.parametrize("flag", ["--resume-timeout-s", "--webapp-timeout-s"])
@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_a_timeout_flag_at_or_below_zero_is_refused_with_a_clear_error(
    flag: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        gateway_parser().parse_args([flag, bad])
    assert refused.value.code == 2
    assert f"argument {flag}: must be above 0.0, not {bad}" in capsys.readouterr().err


def test_a_timeout_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTM_RESUME_TIMEOUT_S", "0")
    with pytest.raises(SystemExit) as refused:
        gateway_parser()
    assert str(refused.value) == "RTM_RESUME_TIMEOUT_S=0.0: --resume-timeout-s must be above 0.0"


def test_good_values_pass_and_the_default_stands() -> None:
    args = gateway_parser().parse_args(["--webapp-timeout-s", "12.5"])
    assert args.webapp_timeout_s == 12.5 and args.resume_timeout_s == RESUME_TIMEOUT_S


@pytest.mark.parametrize(
    ("service", "flag"),
    [
        ("admin_server", "--given-up-hold-s"),
        ("admin_server", "--max-given-up-channels"),
        ("channel_server", "--pub-fence-hold-s"),
        ("channel_server", "--max-fenced-channels-per-connection"),
        ("gateway", "--max-pending-leaves"),
    ],
)
def test_holds_and_bounds_refuse_zero(service: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """0 would raise KeyError at the first held channel (an empty bound evicting) or turn a hold off."""
    build = importlib.import_module(f"{service}.app").build_parser
    with pytest.raises(SystemExit):
        build().parse_args([flag, "0"])
    assert f"argument {flag}: must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ""),
        ({"CONSUL_HTTP_TOKEN": "from-consul-env"}, "from-consul-env"),
        ({"RTM_CONSUL_TOKEN": "from-rtm-env", "CONSUL_HTTP_TOKEN": "from-consul-env"}, "from-rtm-env"),
        ({"CONSUL_HTTP_TOKEN_FILE": "FILE"}, "from-file"),
        ({"CONSUL_HTTP_TOKEN": "from-consul-env", "CONSUL_HTTP_TOKEN_FILE": "FILE"}, "from-consul-env"),
    ],
)
@pytest.mark.parametrize(
    "service", ["channel_server.app", "gateway.app", "webapp_stub.app", "charm.app", "presence.app", "admin_server.app"]
)
def test_every_fleet_process_reads_its_consul_token_where_consuls_tools_do(
    service: str, env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--consul-token`` defaults to RTM_CONSUL_TOKEN, then CONSUL_HTTP_TOKEN, then the first line
    of CONSUL_HTTP_TOKEN_FILE (as Consul's own CLI reads them); the flag wins over all."""
    for name in ("RTM_CONSUL_TOKEN", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "token").write_text("from-file\nsecond line is ignored\n")
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / "token") if value == "FILE" else value)
    build_parser = importlib.import_module(service).build_parser
    assert build_parser().parse_args([]).consul_token == expected
    assert build_parser().parse_args(["--consul-token", "from-flag"]).consul_token == "from-flag"


# Bounded flags: (the process, the flag, values it takes, a value out of bounds, the bound named).
# -0.001 or NaN: below what the flag means; inf: a wait that never ends (every batch open, every
# post or slot held for ever); 5 or 0.5 where milliseconds were meant.
WEBAPP, ADMIN = "webapp_stub.app", "admin_server.app"
BOUNDED_FLAGS = [
    (WEBAPP, "--min-commit-interval-s", {"0": 0.0, "1": 1.0}, "-0.001", "at least 0.0"),
    (WEBAPP, "--min-commit-interval-s", {}, "nan", "at least 0.0"),
    (WEBAPP, "--min-commit-interval-s", {}, "inf", "at least 0.0"),
    (WEBAPP, "--min-commit-interval-s", {}, "5", "at most 1.0"),
    (WEBAPP, "--group-commit-window-s", {"0.002": 0.002}, "inf", "at least 0.0"),
    (WEBAPP, "--group-commit-window-s", {}, "nan", "at least 0.0"),
    (WEBAPP, "--group-commit-window-s", {}, "5", "at most 1.0"),
    # the paced interval's cap (every post under load may wait this long) and the rate it grows from
    (WEBAPP, "--commit-interval-cap-s", {"0": 0.0, "0.05": 0.05}, "-1", "at least 0.0"),
    (WEBAPP, "--commit-interval-cap-s", {}, "nan", "at least 0.0"),
    (WEBAPP, "--commit-interval-cap-s", {}, "20", "at most 1.0"),
    (WEBAPP, "--commit-pacing-base-rate-per-s", {"2000": 2000.0}, "0", "above 0.0"),
    (WEBAPP, "--commit-pacing-base-rate-per-s", {}, "inf", "above 0.0"),
    (WEBAPP, "--commit-pacing-base-rate-per-s", {}, "1e9", "at most 1000000.0"),
    (WEBAPP, "--handoff-interval-cap-s", {"0": 0.0, "0.05": 0.05}, "-0.01", "at least 0.0"),
    (WEBAPP, "--handoff-interval-cap-s", {}, "2", "at most 1.0"),
    (WEBAPP, "--handoff-batch-events", {"1": 1, "256": 256}, "0", "at least 1"),
    (WEBAPP, "--handoff-batch-events", {}, "257", "at most 256"),
    (WEBAPP, "--handoff-pacing-base-rate-per-s", {"2000": 2000.0}, "0", "above 0.0"),
    (WEBAPP, "--handoff-pacing-base-rate-per-s", {}, "1e9", "at most 1000000.0"),
    # how long auth.revoke may wait for its event's fan-out before it answers
    (WEBAPP, "--revoke-fanout-wait-s", {"0.5": 0.5, "60": 60.0}, "0", "above 0"),
    (WEBAPP, "--revoke-fanout-wait-s", {}, "nan", "above 0"),
    (WEBAPP, "--revoke-fanout-wait-s", {}, "3600", "at most 60.0"),
    # the public port's limits (webapp_stub/http_limits.py): connections, and a request's arrival
    (WEBAPP, "--max-http-connections", {"0": 0, "20000": 20000}, "-1", "at least 0"),
    (WEBAPP, "--max-http-connections-per-address", {"0": 0, "8": 8}, "2000000", "at most 1000000"),
    (WEBAPP, "--http-request-timeout-s", {"0.5": 0.5, "60": 60.0}, "0", "above 0.0"),
    (WEBAPP, "--http-request-timeout-s", {}, "nan", "above 0.0"),
    (WEBAPP, "--http-request-timeout-s", {}, "7200", "at most 3600.0"),
    # files (webapp_stub/file_transfer.py): the largest upload, pending files per user, their time
    (WEBAPP, "--max-file-bytes", {"1": 1, "1073741824": 1024**3}, "0", "at least 1"),
    (WEBAPP, "--max-file-bytes", {}, "1073741825", "at most 1073741824"),
    (WEBAPP, "--max-pending-files-per-user", {"1": 1, "20": 20}, "0", "at least 1"),
    (WEBAPP, "--max-pending-files-per-user", {}, "10001", "at most 10000"),
    (WEBAPP, "--pending-file-ttl-s", {"60": 60.0}, "0", "above 0.0"),
    (WEBAPP, "--pending-file-ttl-s", {}, "nan", "above 0.0"),
    (WEBAPP, "--pending-file-ttl-s", {}, "1e7", "at most 604800.0"),
    # files' storage: one user's bytes, and the free space left for the database (0: no reserve)
    (WEBAPP, "--max-file-storage-bytes-per-user", {"1": 1, "1073741824": 1024**3}, "0", "at least 1"),
    (WEBAPP, "--max-file-storage-bytes-per-user", {}, str(1024**5 + 1), f"at most {1024**5}"),
    (WEBAPP, "--min-free-disk-bytes", {"0": 0, "1073741824": 1024**3}, "-1", "at least 0"),
    (WEBAPP, "--min-free-disk-bytes", {}, str(1024**5 + 1), f"at most {1024**5}"),
    # the kernel's accept queue of the client-facing listeners
    (WEBAPP, "--listen-backlog", {"4096": 4096}, "0", "above 0"),
    ("gateway.app", "--listen-backlog", {"1": 1}, "70000", "at most 65535"),
    # the nap: the longest the webapp's loop may be unresponsive under load (0: off)
    (WEBAPP, "--commit-nap-s", {"0": 0.0}, "inf", "at least 0.0"),
    (WEBAPP, "--commit-nap-s", {}, "nan", "at least 0.0"),
    (WEBAPP, "--commit-nap-s", {}, "0.5", "at most 0.05"),
    # how long an unanswered publish, and a slot behind a ring barrier, may be held
    (ADMIN, "--forward-timeout-s", {"60": 60.0}, "0", "above 0.0"),
    (ADMIN, "--forward-timeout-s", {}, "nan", "above 0.0"),
    (ADMIN, "--forward-timeout-s", {}, "3600", "at most 60.0"),
    (ADMIN, "--ring-barrier-s", {"0.3": 0.3}, "0", "above 0.0"),
    (ADMIN, "--ring-barrier-s", {}, "inf", "above 0.0"),
    (ADMIN, "--ring-barrier-s", {}, "3600", "at most 60.0"),
    # each process's log file under rtm up (0: none), rotated at this size
    ("rtmctl.fleet", "--log-file-max-bytes", {"0": 0, "16777216": 16 * 1024 * 1024}, "-1", "at least 0"),
    ("rtmctl.fleet", "--log-file-max-bytes", {}, "2000000000", "at most 1073741824"),
    # rtm top: how often it scrapes the whole fleet, and how many tables (0: until Ctrl-C)
    ("rtmctl.top", "--interval-s", {"0.1": 0.1, "2": 2.0, "60": 60.0}, "0.05", "at least 0.1"),
    ("rtmctl.top", "--interval-s", {}, "nan", "at least 0.1"),
    ("rtmctl.top", "--interval-s", {}, "inf", "at least 0.1"),
    ("rtmctl.top", "--interval-s", {}, "61", "at most 60.0"),
    ("rtmctl.top", "--count", {"0": 0, "2": 2}, "-1", "at least 0"),
    ("rtmctl.top", "--count", {}, "2000000", "at most 1000000"),
]


@pytest.mark.parametrize(("module", "flag", "takes", "bad", "bound"), BOUNDED_FLAGS)
def test_a_bounded_flag_takes_its_range_and_refuses_the_rest(
    module: str, flag: str, takes: dict[str, float], bad: str, bound: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build = importlib.import_module(module).build_parser
    dest = flag.removeprefix("--").replace("-", "_")
    for text, value in takes.items():
        assert getattr(build().parse_args([flag, text]), dest) == value
    with pytest.raises(SystemExit):
        build().parse_args([flag, bad])
    assert f"argument {flag}: must be {bound}, not {bad}" in capsys.readouterr().err


def test_the_defaults_of_the_commit_pacing_and_the_ring_barrier() -> None:
    webapp = importlib.import_module(WEBAPP).build_parser().parse_args([])
    assert (webapp.commit_nap_s, webapp.commit_interval_cap_s, webapp.commit_pacing_base_rate_per_s) == (
        0.008,
        0.02,
        500.0,
    )
    admin = importlib.import_module(ADMIN).build_parser().parse_args([])
    assert (admin.forward_timeout_s, admin.ring_barrier_s) == (2.0, 4.0)


def test_an_interval_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTM_MIN_COMMIT_INTERVAL_S", "-1")
    with pytest.raises(SystemExit) as refused:
        importlib.import_module("webapp_stub.app").build_parser()
    assert str(refused.value) == "RTM_MIN_COMMIT_INTERVAL_S=-1.0: --min-commit-interval-s must be at least 0.0"


def test_help_shows_each_default_but_never_a_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rtm up --help`` did not say that --port-base is 7400 nor --data-dir ./.rtm (the README's
    first question); now each flag's help ends with its default, the environment's when set, except
    flags that may hold a secret (rtm up gives its children the fleet secret through RTM_SECRET)."""
    from rtmctl.fleet import build_parser as up_parser
    from webapp_stub.app import build_parser as webapp_parser

    monkeypatch.setenv("RTM_PORT_BASE", "26000")
    monkeypatch.setenv("RTM_SECRET", "s3cr3t-never-shown")
    up = " ".join(up_parser().format_help().split())
    assert "(env RTM_PORT_BASE; default 26000)" in up and "(env RTM_DATA_DIR; default ./.rtm)" in up
    webapp = " ".join(webapp_parser().format_help().split())
    assert "s3cr3t" not in webapp and "(env RTM_SECRET)" in webapp
