"""``rtm top``'s model (rtmctl/top.py), sans I/O: hand-made scrapes in, rows out."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path

import pytest

from rtmctl import top
from rtmctl.operator import FLEET_HINT
from rtmctl.top import CPU, ERRORS, OPEN_FDS, RSS, STARTED, Process, Scrape, TopModel
from tests.support import DEFAULT_WAIT_S, interruptible_child

MAX_READ_LINES = 8  # of the child's output: two tables of one process (title, header, row, total) and a blank line

WEBAPP = Process("webapp", "webapp", pid=100, host="127.0.0.1", metrics_port=9001)
GATEWAY = Process("gw-us-east-0", "gateway", pid=200, host="127.0.0.1", metrics_port=9002)
CS = Process("cs-1", "channel-server", pid=300, host="127.0.0.1", metrics_port=9003)


def webapp_scrape(at: float, cpu: float, posts: float, errors: float = 0.0, started: float = 1000.0) -> Scrape:
    return Scrape(
        at,
        {
            CPU: cpu,
            RSS: 64 * top.MIB,
            OPEN_FDS: 30.0,
            STARTED: started,
            "rtm_webapp_posts_total": posts,
            "rtm_webapp_requests_total": posts * 2,
            ERRORS: errors,
        },
    )


def gateway_scrape(at: float, deliveries: float, connections: float) -> Scrape:
    return Scrape(at, {CPU: 1.0, "rtm_gw_deliveries_total": deliveries, "rtm_gw_connections": connections})


def work(row: top.Row) -> dict[str, str]:
    return dict(row.work)


def test_the_second_table_has_rates_from_the_growth_of_each_counter_over_the_time_between() -> None:
    model = TopModel()
    first = model.table([WEBAPP, GATEWAY], {"webapp": webapp_scrape(10.0, 1.0, 100), "gw-us-east-0": None})
    assert first.first
    [gw, web] = first.rows  # by service, then name
    assert (gw.name, gw.up, gw.cpu_percent) == ("gw-us-east-0", False, None)
    assert web.up and web.cpu_percent is None and web.errors_per_s is None
    assert web.rss_mib == 64.0 and web.open_fds == 30.0
    assert work(web) == {"posts/s": "-", "req/s": "-"}

    second = model.table(
        [WEBAPP, GATEWAY],
        {"webapp": webapp_scrape(12.0, 1.5, 140, errors=6), "gw-us-east-0": gateway_scrape(12.0, 10, 3)},
    )
    assert not second.first
    [gw, web] = second.rows
    assert web.cpu_percent == pytest.approx(25.0)  # 0.5 CPU seconds in 2 s
    assert work(web) == {"posts/s": "20.0", "req/s": "40.0"}
    assert web.errors_per_s == pytest.approx(3.0)
    assert gw.up and gw.cpu_percent is None  # its first good scrape: no rate yet, but its gauge
    assert work(gw) == {"deliv/s": "-", "conns": "3"}
    assert second.total.service == "2/2 up" and second.total.cpu_percent == pytest.approx(25.0)


def test_a_restarted_process_shows_no_rate_and_never_a_negative_one() -> None:
    """rtm up restarted the webapp: another pid in fleet.json, its counters from 0 again."""
    model = TopModel()
    model.table([WEBAPP], {"webapp": webapp_scrape(10.0, cpu=50.0, posts=5000)})
    restarted = Process("webapp", "webapp", pid=101, host="127.0.0.1", metrics_port=9001)
    [row] = model.table([restarted], {"webapp": webapp_scrape(12.0, cpu=0.5, posts=3, started=2000.0)}).rows
    assert (row.pid, row.up, row.cpu_percent, row.errors_per_s) == (101, True, None, None)
    assert work(row) == {"posts/s": "-", "req/s": "-"}
    [row] = model.table([restarted], {"webapp": webapp_scrape(14.0, cpu=0.7, posts=13, started=2000.0)}).rows
    assert row.cpu_percent == pytest.approx(10.0) and work(row)["posts/s"] == "5.0"


def test_a_counter_that_went_down_in_the_same_run_gives_no_rate() -> None:
    """Same pid, no start time to tell: a counter lower than before is a reset, not -x/s."""
    model = TopModel()
    model.table([CS], {"cs-1": Scrape(1.0, {"rtm_cs_events_in_total": 50, "rtm_cs_events_out_total": 80})})
    [row] = model.table([CS], {"cs-1": Scrape(2.0, {"rtm_cs_events_in_total": 7, "rtm_cs_events_out_total": 90})}).rows
    assert work(row) == {"in/s": "-", "out/s": "10.0"}
    assert row.cpu_percent is None  # no process_* series (no /proc): unknown, not 0


def test_a_process_down_for_a_round_gets_its_rate_over_the_whole_time_since_its_last_scrape() -> None:
    model = TopModel()
    model.table([WEBAPP], {"webapp": webapp_scrape(10.0, 1.0, 100)})
    down = model.table([WEBAPP], {"webapp": None})
    assert [r.up for r in down.rows] == [False] and down.total.service == "0/1 up" and not down.total.up
    assert top.format_row(down.rows[0]).split()[:4] == ["webapp", "webapp", "100", "down"]
    [row] = model.table([WEBAPP], {"webapp": webapp_scrape(14.0, 2.0, 140)}).rows
    assert row.cpu_percent == pytest.approx(25.0) and work(row)["posts/s"] == "10.0"


def test_a_new_process_appears_with_its_gauges_and_its_rates_on_the_next_table() -> None:
    model = TopModel()
    model.table([WEBAPP], {"webapp": webapp_scrape(10.0, 1.0, 100)})
    table = model.table(
        [WEBAPP, GATEWAY], {"webapp": webapp_scrape(11.0, 1.1, 100), "gw-us-east-0": gateway_scrape(11.0, 5, 2)}
    )
    assert [r.name for r in table.rows] == ["gw-us-east-0", "webapp"]
    assert work(table.rows[0]) == {"deliv/s": "-", "conns": "2"}
    table = model.table([WEBAPP, GATEWAY], {"webapp": None, "gw-us-east-0": gateway_scrape(12.0, 25, 4)})
    assert work(table.rows[0]) == {"deliv/s": "20.0", "conns": "4"}


def test_a_process_gone_from_fleet_json_is_forgotten() -> None:
    model = TopModel()
    model.table([WEBAPP, CS], {"webapp": webapp_scrape(1.0, 1.0, 1), "cs-1": Scrape(1.0, {})})
    assert [r.name for r in model.table([WEBAPP], {"webapp": webapp_scrape(2.0, 1.0, 1)}).rows] == ["webapp"]
    [row] = model.table([CS], {"cs-1": Scrape(3.0, {CPU: 1.0})}).rows  # back: its old scrape was dropped
    assert row.cpu_percent is None


def test_the_table_as_text_has_a_header_a_line_per_process_and_a_total() -> None:
    model = TopModel()
    model.table([WEBAPP, GATEWAY], {"webapp": webapp_scrape(10.0, 1.0, 100), "gw-us-east-0": None})
    table = model.table([WEBAPP, GATEWAY], {"webapp": webapp_scrape(12.0, 1.5, 140), "gw-us-east-0": None})
    lines = top.format_table(table, "rtm top").splitlines()
    assert lines[0] == "rtm top" and lines[1].split()[:4] == ["NAME", "SERVICE", "PID", "STATE"]
    assert lines[2].split()[:4] == ["gw-us-east-0", "gateway", "200", "down"]
    assert lines[3].split() == [
        "webapp",
        "webapp",
        "100",
        "up",
        "25.0",
        "64.0",
        "30",
        "0.0",
        "posts/s",
        "20.0",
        "req/s",
        "40.0",
    ]
    assert lines[4].split() == ["total", "1/2", "up", "25.0", "64.0", "30", "0.0"]
    assert top.FIRST_NOTE in top.format_table(TopModel().table([WEBAPP], {"webapp": None}), "rtm top")


def test_parse_sums_the_wanted_samples_over_their_labels() -> None:
    text = (
        "# TYPE rtm_errors_total counter\n"
        'rtm_errors_total{kind="auth"} 2.0\n'
        'rtm_errors_total{kind="bad_frame"} 3.0\n'
        'rtm_errors_created{kind="auth"} 1.7e9\n'
        "# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 1.25\n"
        "# TYPE rtm_other gauge\n"
        "rtm_other 9.0\n"
    )
    assert top.parse(text) == {ERRORS: 5.0, CPU: 1.25}


def test_a_fleet_json_entry_listening_everywhere_is_scraped_on_loopback() -> None:
    entry = {"name": "gw", "service": "gateway", "pid": 7, "host": "0.0.0.0", "metrics_port": 9100, "port": 1}
    assert Process.from_fleet(entry).url == "http://127.0.0.1:9100/metrics"
    assert Process.from_fleet({**entry, "host": "::1"}).url == "http://[::1]:9100/metrics"


def test_without_fleet_json_it_says_so_in_one_sentence_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert top.main(["--data-dir", str(tmp_path), "--count", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"rtm top: no {tmp_path / 'fleet.json'}: {FLEET_HINT}\n"


def test_the_real_command_prints_tables_until_ctrl_c_and_ends_quietly(tmp_path: Path) -> None:
    """In a child, into a pipe: a table per interval (a process on a closed port is down, the view
    goes on), and Ctrl-C ends it with exit 0 and nothing on stderr."""
    with socket.socket() as probe:  # a port nobody listens on a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = {"name": "cs-1", "service": "channel-server", "pid": 1, "host": "127.0.0.1", "metrics_port": port}
    (tmp_path / "fleet.json").write_text(json.dumps({"processes": [entry]}))
    argv = [sys.executable, "-m", "rtmctl.cli", "top", "--interval-s", "0.1", "--data-dir", str(tmp_path)]
    with interruptible_child(argv) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(MAX_READ_LINES)]
        assert lines.count(b"\n") >= 1, lines  # two tables, a blank line between
        assert any(line.split()[:4] == [b"cs-1", b"channel-server", b"1", b"down"] for line in lines), lines
        proc.send_signal(signal.SIGINT)  # as Ctrl-C
        assert proc.wait(timeout=DEFAULT_WAIT_S) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""


def test_the_defaults() -> None:
    args = top.build_parser().parse_args([])
    assert (args.interval_s, args.count, args.data_dir) == (2.0, 0, "./.rtm")


def test_rtm_top_is_an_rtm_command_with_a_one_line_summary() -> None:
    from rtmctl.cli import COMMANDS, USAGE

    module, summary = COMMANDS["top"]
    assert module == "rtmctl.top" and "\n" not in summary
    assert f"  {'top':<15} {summary}" in USAGE
