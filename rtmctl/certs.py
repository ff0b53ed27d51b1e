"""``rtm certs``: the fleet CA and named certificates in a directory, for deployments.

``rtm up`` makes its own (``DATA_DIR/tls/``); a deployment where every
process runs elsewhere (``deploy/docker-compose.yml``) makes them with this
command, which ``deploy/gen-cert.sh`` runs::

    rtm certs init   --dir D                       # D/ca.crt, D/ca.key (kept if there)
    rtm certs issue  --dir D SERVICE INSTANCE...   # D/<INSTANCE>.crt, .key: spiffe://rtm/SERVICE/INSTANCE
    rtm certs rotate --dir D                       # the next step of a two-CA rotation (run 3 times)
    rtm certs rotate --dir D --immediate           # a new CA at once, every certificate issued again
    rtm certs show   --dir D                       # name, identity, expiry of each; the rotation phase

``rotate`` without ``--immediate`` rolls the fleet to a new CA with an
overlap, one step per run, each followed by a rolling restart of the fleet
(services/certs.py's table): *begin* (trust a new CA beside the old), *reissue*
(every certificate from the new CA), *finish* (the old CA trusted no more). At
no point do two processes refuse each other; after *finish* a certificate of
the retired CA is refused. ``--immediate`` is for a leaked CA key: the old CA
must stop being trusted at once, whatever the gap costs.

It is :class:`services.certs.FleetCertificates` on a command line. Each
certificate is stored under its instance id, so instance ids are unique
across services in one directory (``issue`` refuses to overwrite another
service's certificate). ``issue`` is idempotent: a certificate that names the
same identity, comes from the current CA and is valid for longer than
``--renew-within-days`` is kept, anything else is issued anew.

Who may read the files (:class:`services.secret_file.FileAccess`): by
default each is 0600 and belongs to whoever runs the command.
``--owner UID:GID`` (root only) gives ``ca.crt`` and the issued files to that
user, still 0600 (deploy/'s containers run as uid 10001);
``--group-readable`` makes them 0640 to the creator's group instead, for a
non-root operator whose containers get that group (compose ``group_add``).
``ca.key`` is always 0600 and stays with its creator.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from services.certs import CA_FILE, CA_KEY_FILE, NEXT_CA_KEY_FILE, NEXT_STEP, FleetCertificates, expiry_of
from services.identity import SERVICES, BadIdentity, PeerIdentity
from services.secret_file import GROUP_READABLE_FILE_MODE, PRIVATE, SECRET_FILE_MODE, FileAccess

# `issue` renews a certificate that expires within this many days (certificates last CERT_VALID_DAYS).
RENEW_WITHIN_DAYS = 30.0
# A directory's CA key is readable only by its maker: this umask keeps group and others out,
# except the group's read bit for --group-readable.
PRIVATE_UMASK = 0o077
GROUP_READABLE_UMASK = 0o037


class CertsError(Exception):
    """A request ``rtm certs`` refuses (the message says what to do)."""


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` (numbers) -> (uid, gid); raises argparse.ArgumentTypeError."""
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError(f"--owner wants UID:GID in numbers, not {text!r}")
    return int(uid), int(gid)


def file_access(owner: tuple[int, int] | None, group_readable: bool) -> FileAccess:
    """How ``ca.crt`` and the issued files are created (see the module doc)."""
    mode = GROUP_READABLE_FILE_MODE if group_readable else SECRET_FILE_MODE
    if owner is None:
        return FileAccess(mode) if group_readable else PRIVATE
    return FileAccess(mode, owner[0], owner[1])


def identities(service: str, instances: list[str]) -> list[PeerIdentity]:
    """The identities ``issue`` makes; raises :class:`CertsError` for a bad service or instance."""
    if service not in SERVICES:
        raise CertsError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    found = []
    for instance in instances:
        reserved = {Path(CA_FILE).stem, Path(CA_KEY_FILE).stem, Path(NEXT_CA_KEY_FILE).stem}
        if instance in reserved or instance.startswith("."):
            raise CertsError(f"{instance!r} cannot be an instance id here (it names the CA's files)")
        try:
            found.append(PeerIdentity.from_uri(PeerIdentity(service, instance).uri()))
        except BadIdentity as exc:
            raise CertsError(str(exc)) from None
    return found


def issue(certs: FleetCertificates, wanted: list[PeerIdentity], renew_within: datetime.timedelta) -> list[str]:
    """Ensure a certificate for each identity (under its instance id); returns one line per identity.

    Raises :class:`CertsError` if there is no CA yet, or a name already holds
    another service's certificate (two services with one instance id)."""
    if not (certs.ca_path.exists() and (certs.dir / CA_KEY_FILE).exists()):
        raise CertsError(f"no fleet CA in {certs.dir}: run `rtm certs init --dir {certs.dir}` first")
    lines = []
    for identity in wanted:
        held = certs.existing_identity(identity.instance)
        if held is not None and held.service != identity.service:
            raise CertsError(
                f"{certs.paths(identity.instance).cert} holds {held.uri()}, not {identity.uri()}: "
                "instance ids must be unique across services"
            )
        kept = certs.is_current(identity.instance, identity, renew_within)
        paths = certs.ensure(identity.instance, identity, renew_within)
        lines.append(f"{'kept' if kept else 'issued'} {paths.cert} ({identity.uri()})")
    return lines


# What to do after each rotation step (the phase it left the directory in).
AFTER_STEP = {
    "trusting-both": "every process now trusts the old and the new CA: restart the fleet process by process, "
    "then run `rtm certs rotate` again (reissue)",
    "reissued": "every certificate is now the new CA's: restart the fleet process by process, "
    "then run `rtm certs rotate` again (finish)",
    "steady": "the old CA is trusted no more: restart the fleet process by process; the rotation is then complete",
}


def rotate(certs: FleetCertificates, immediate: bool) -> list[str]:
    if immediate:
        return [f"rotated: new {certs.ca_path}", *(f"issued {n}" for n in certs.rotate())]
    if not certs.ca_path.exists():
        raise CertsError(f"no fleet CA in {certs.dir}: run `rtm certs init --dir {certs.dir}` first")
    step = NEXT_STEP[certs.rotation_phase()]
    phase, issued = certs.rotation_step()
    return [f"rotation step {step}: now {phase}", *(f"issued {n}" for n in issued), AFTER_STEP[phase]]


def show(certs: FleetCertificates) -> list[str]:
    if not certs.ca_path.exists():
        raise CertsError(f"no fleet CA in {certs.dir}: run `rtm certs init --dir {certs.dir}` first")
    cas = certs.trusted_cas()
    lines = [f"{CA_FILE}  expires {expiry_of(pem):%Y-%m-%d}" for pem in cas]
    phase = certs.rotation_phase()
    if phase != "steady":
        lines.append(f"rotation: {phase} (next step: {NEXT_STEP[phase]})")
    for name in certs.names():
        identity = certs.existing_identity(name)
        expires = expiry_of(certs.paths(name).cert.read_bytes())
        lines.append(f"{name}  {identity.uri() if identity else '(no fleet identity)'}  expires {expires:%Y-%m-%d}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtm certs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for action, summary in (
        ("init", "create the fleet CA in DIR (kept if there)"),
        ("issue", "issue (or keep) a certificate per INSTANCE of SERVICE"),
        ("rotate", "the next step of a two-CA rotation (or --immediate: a new CA, every certificate anew)"),
        ("show", "list DIR's certificates with identity and expiry"),
    ):
        p = sub.add_parser(action, help=summary)
        p.add_argument("--dir", required=True, type=Path, help="the directory of the CA and the certificates")
        if action == "show":
            continue
        p.add_argument("--owner", type=parse_owner, default=None, help="UID:GID to give the files to (root only)")
        p.add_argument(
            "--group-readable", action="store_true", help="make the files 0640 to this user's group (not the CA key)"
        )
        if action == "rotate":
            p.add_argument(
                "--immediate",
                action="store_true",
                help="a new CA at once, the old one trusted no more (a leaked CA key); default: the next step "
                "of a two-CA rotation",
            )
        if action == "issue":
            p.add_argument("service", choices=SERVICES)
            p.add_argument("instances", nargs="+", metavar="INSTANCE")
            p.add_argument(
                "--renew-within-days",
                type=float,
                default=RENEW_WITHIN_DAYS,
                help="issue anew a certificate that expires within this many days",
            )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "show":
            lines = show(FleetCertificates(args.dir))
        else:
            os.umask(GROUP_READABLE_UMASK if args.group_readable else PRIVATE_UMASK)
            certs = FleetCertificates(args.dir, file_access(args.owner, args.group_readable))
            if args.action == "init":
                existed = certs.ca_path.exists()
                certs.ensure_ca()
                lines = [f"{'kept' if existed else 'created'} {certs.ca_path}"]
            elif args.action == "issue":
                wanted = identities(args.service, args.instances)
                lines = issue(certs, wanted, datetime.timedelta(days=args.renew_within_days))
            else:
                lines = rotate(certs, args.immediate)
    except CertsError as exc:
        print(f"rtm certs: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"rtm certs: {exc} (--owner needs root)", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
