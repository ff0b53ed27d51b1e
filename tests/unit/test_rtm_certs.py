"""``rtm certs`` (rtmctl/certs.py) and what it adds to services/certs.py and services/secret_file.py:
idempotent issuing, renewal, refusals, and files made for another user."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest

from rtmctl import certs as cli
from services.certs import CERT_VALID_DAYS, FleetCertificates, identity_of
from services.identity import PeerIdentity
from services.secret_file import FileAccess, create_secret_file

CONTAINER_UID = 10001


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_then_issue_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "tls")
    assert run(capsys, "init", "--dir", d)[1].startswith("created ")
    assert run(capsys, "init", "--dir", d)[1].startswith("kept ")
    code, out, _ = run(capsys, "issue", "--dir", d, "admin-server", "admin-server-1", "admin-server-2")
    assert code == 0 and out.count("issued ") == 2
    first = (tmp_path / "tls" / "admin-server-1.crt").read_bytes()
    assert identity_of(first) == PeerIdentity("admin-server", "admin-server-1")
    code, out, _ = run(capsys, "issue", "--dir", d, "admin-server", "admin-server-1")
    assert code == 0 and out.startswith("kept ") and (tmp_path / "tls" / "admin-server-1.crt").read_bytes() == first
    for path in (tmp_path / "tls").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    code, out, _ = run(capsys, "show", "--dir", d)
    assert code == 0 and "spiffe://rtm/admin-server/admin-server-2" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["issue", "gateway", "gw-1"], "rtm certs init"),  # no CA yet
        (["issue", "gateway", "ca"], "names the CA's files"),
        (["issue", "gateway", ".hidden"], "names the CA's files"),
        (["issue", "gateway", "a/b"], "not an rtm identity"),
    ],
)
def test_issue_refuses_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    d = str(tmp_path / "tls")
    if "gw-1" not in argv:
        run(capsys, "init", "--dir", d)
    code, out, err = run(capsys, argv[0], "--dir", d, *argv[1:])
    assert code == 1 and says in err and not out
    assert not list((tmp_path / "tls").glob("[!c]*.crt")), "nothing issued"


def test_show_of_a_directory_without_a_ca_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rtm certs show --dir`` a wrong or empty directory (before: a FileNotFoundError traceback)."""
    d = tmp_path / "tls"
    code, out, err = run(capsys, "show", "--dir", str(d))
    assert (code, out) == (1, "")
    assert err == f"rtm certs: no fleet CA in {d}: run `rtm certs init --dir {d}` first\n"


def test_issue_refuses_to_overwrite_another_services_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "tls")
    run(capsys, "init", "--dir", d)
    run(capsys, "issue", "--dir", d, "charm", "x-1")
    before = (tmp_path / "tls" / "x-1.crt").read_bytes()
    code, _, err = run(capsys, "issue", "--dir", d, "gateway", "x-1")
    assert code == 1 and "unique across services" in err
    assert (tmp_path / "tls" / "x-1.crt").read_bytes() == before


def test_unknown_service_is_refused_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["issue", "--dir", str(tmp_path), "mailman", "m-1"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["issue", "--dir", str(tmp_path), "--owner", "rtm", "gateway", "g"])


class LaterCertificates(FleetCertificates):
    """The directory seen ``days`` from now."""

    def __init__(self, directory: Path, days: float) -> None:
        super().__init__(directory)
        self.days = days

    def _now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.days)


def test_a_certificate_near_its_expiry_or_from_an_old_ca_is_issued_anew(tmp_path: Path) -> None:
    identity = PeerIdentity("gateway", "gw-1")
    certs = FleetCertificates(tmp_path)
    certs.ensure(identity.instance, identity)
    month = datetime.timedelta(days=cli.RENEW_WITHIN_DAYS)
    assert certs.is_current(identity.instance, identity, month)
    later = LaterCertificates(tmp_path, CERT_VALID_DAYS - 10)
    assert later.is_current(identity.instance, identity)  # without a renewal window: kept (rtm up's way)
    assert not later.is_current(identity.instance, identity, month)
    before = later.paths(identity.instance).cert.read_bytes()
    later.ensure(identity.instance, identity, month)
    assert later.paths(identity.instance).cert.read_bytes() != before
    assert later.is_current(identity.instance, identity, month)
    # a certificate from before a rotation is not current: the new CA did not sign it
    other = FleetCertificates(tmp_path / "other")
    other.ensure(identity.instance, identity)
    (tmp_path / "gw-1.crt").write_bytes(other.paths(identity.instance).cert.read_bytes())
    assert not certs.is_current(identity.instance, identity, month)


def test_group_readable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "tls")
    assert run(capsys, "init", "--dir", d, "--group-readable")[0] == 0
    assert run(capsys, "issue", "--dir", d, "--group-readable", "presence", "presence-1")[0] == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "tls").iterdir()}
    assert modes == {
        "ca.key": 0o600,
        "ca.crt": 0o640,
        "presence-1.crt": 0o640,
        "presence-1.key": 0o640,
    }


@pytest.mark.skipif(os.getuid() != 0, reason="giving files away needs root")
def test_owner_gives_the_files_to_the_containers_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "tls")
    owner = f"{CONTAINER_UID}:{CONTAINER_UID}"
    assert run(capsys, "init", "--dir", d, "--owner", owner)[0] == 0
    assert run(capsys, "issue", "--dir", d, "--owner", owner, "charm", "charm-1")[0] == 0
    for path in (tmp_path / "tls").iterdir():
        st = path.stat()
        want = (0o600, 0, 0) if path.name == "ca.key" else (0o600, CONTAINER_UID, CONTAINER_UID)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == want, path
    assert run(capsys, "rotate", "--dir", d, "--owner", owner, "--immediate")[0] == 0
    for path in (tmp_path / "tls").iterdir():
        assert path.stat().st_uid == (0 if path.name == "ca.key" else CONTAINER_UID), path


@pytest.mark.skipif(os.getuid() == 0, reason="root may give files away")
def test_owner_without_root_is_refused_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "init", "--dir", str(tmp_path / "tls"), "--owner", "10001:10001")
    assert code == 1 and "needs root" in err
    assert not list((tmp_path / "tls").glob("*.crt")) and not list((tmp_path / "tls").glob(".*"))


def test_file_access_is_0600_or_0640_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileAccess(0o644)
    path = tmp_path / "s"
    old = os.umask(cli.GROUP_READABLE_UMASK)
    try:
        create_secret_file(path, "x\n", FileAccess(0o640, None, os.getgid()))
    finally:
        os.umask(old)
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid, path.read_text()) == (0o640, os.getgid(), "x\n")


def test_rotate_takes_one_step_of_a_two_ca_rotation_per_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "tls")
    assert run(capsys, "rotate", "--dir", d)[0] == 1  # no CA yet: says what to do
    assert run(capsys, "init", "--dir", d)[0] == 0
    assert run(capsys, "issue", "--dir", d, "gateway", "gw-1")[0] == 0
    code, out, _ = run(capsys, "rotate", "--dir", d)
    assert code == 0 and "step begin: now trusting-both" in out and "run `rtm certs rotate` again" in out
    assert "rotation: trusting-both (next step: reissue)" in run(capsys, "show", "--dir", d)[1]
    code, out, _ = run(capsys, "rotate", "--dir", d)
    assert code == 0 and "step reissue: now reissued" in out and "issued gw-1" in out
    code, out, _ = run(capsys, "rotate", "--dir", d)
    assert code == 0 and "step finish: now steady" in out and "rotation is then complete" in out
    assert "rotation:" not in run(capsys, "show", "--dir", d)[1]
    assert run(capsys, "issue", "--dir", d, "gateway", "ca-next")[0] == 1  # the next CA's key file name
