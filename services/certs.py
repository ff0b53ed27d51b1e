"""The fleet's certificate authority and the certificates it issues.

Pure functions make certificates (PEM bytes in, PEM bytes out, the clock is
an argument); :class:`FleetCertificates` keeps them in one directory, the way
``rtm up`` and ``deploy/`` use it::

    DIR/ca.crt      the fleet CA (what every process trusts)
    DIR/ca.key      the CA's private key (only the issuer needs it)
    DIR/<name>.crt  one certificate per process, its identity as a URI SAN
    DIR/<name>.key  spiffe://rtm/<service>/<instance>

Every file is created with mode 0600 in one step (``os.open(..., 0o600)``
on a temporary name, then renamed: :mod:`services.secret_file`), never
chmod-ed afterwards. Files meant for a process that runs as another user
(deploy/'s containers run as uid 10001) can be made with a
:class:`~services.secret_file.FileAccess` instead: given to that uid (0600),
or 0640 to a group; the CA key is always 0600 and its maker's. Keys are
ECDSA P-256: a handshake signs once per side, and P-256 signs in tens of
microseconds where RSA-2048 takes a millisecond.

``ca.crt`` is a *trust bundle*: one CA, or two during a rotation. Its first
certificate is the issuing CA (the pair of ``ca.key``); every process trusts
every certificate in it (OpenSSL loads them all).

Rotation without a moment of mutual refusal (:meth:`FleetCertificates.rotation_step`,
``rtm certs rotate``) takes three steps, each followed by a rolling restart of
the fleet (processes read their files at start)::

    phase          ca.crt (trusted)       issuer    leaves from   next step
    steady         [old]                  old       old           begin: a new CA, trusted beside the old
    trusting-both  [old, new]             old       old           reissue: every leaf from the new CA
    reissued       [new, old]             new       new           finish: the old CA is dropped
    steady         [new]                  new       new

At every point of every roll each pair of processes trusts the other's leaf:
during the first roll every leaf is still the old CA's, which everyone trusts;
during the second every process already trusts both; during the third every
leaf is already the new CA's. After the third, a certificate of the retired CA
is refused everywhere. The CA's key for the next phase waits in
``ca-next.key`` (0600) between *begin* and *reissue*.

:meth:`FleetCertificates.rotate` is the all-at-once rotation (a leaked CA key:
no overlap wanted, the old CA must stop being trusted at once).
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.identity import BadIdentity, PeerIdentity
from services.secret_file import PRIVATE, FileAccess, ensure_private_dir, replace_secret_file

CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 365
# Certificates start this long before "now": clocks of a fleet's machines differ a little.
NOT_BEFORE_SKEW_S = 300
CA_COMMON_NAME = "rtm fleet CA"
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NEXT_CA_KEY_FILE = "ca-next.key"  # the new CA's key between a rotation's begin and reissue steps

# Rotation phases (FleetCertificates.rotation_phase), and the step each one takes next.
STEADY = "steady"
TRUSTING_BOTH = "trusting-both"
REISSUED = "reissued"
NEXT_STEP = {STEADY: "begin", TRUSTING_BOTH: "reissue", REISSUED: "finish"}


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where one process finds its credentials: the CA to trust, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(now: datetime.datetime, valid_days: int = CA_VALID_DAYS, common_name: str = CA_COMMON_NAME) -> Issued:
    """A self-signed fleet CA valid from ``now`` (less the skew) for ``valid_days``.

    Its name is ``common_name`` plus a random tag, so two CAs trusted side by side
    during a rotation never share a subject (chain building looks issuers up by name).
    """
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {secrets.token_hex(4)}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=NOT_BEFORE_SKEW_S))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    identity: PeerIdentity,
    now: datetime.datetime,
    valid_days: float = CERT_VALID_DAYS,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """A certificate for ``identity`` signed by ``ca``, usable as TLS client and server.

    The identity is the URI SAN ``spiffe://rtm/<service>/<instance>``; the
    common name repeats it for humans (``openssl x509 -text``).
    """
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the fleet CA key must be an EC key")
    key = _new_key()
    start = not_before or now - datetime.timedelta(seconds=NOT_BEFORE_SKEW_S)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri())]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def identity_of(cert_pem: bytes) -> PeerIdentity:
    """The fleet identity in a certificate's URI SAN; raises :class:`BadIdentity`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BadIdentity("certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise BadIdentity(f"certificate must carry exactly one URI SAN, has {len(uris)}")
    return PeerIdentity.from_uri(uris[0])


def write_private(path: Path, data: bytes, access: FileAccess = PRIVATE) -> None:
    """Write PEM ``data`` to ``path``, created 0600 (or ``access``) in one step (:mod:`services.secret_file`)."""
    replace_secret_file(path, data.decode("ascii"), access)


def first_certificate(pem: bytes) -> bytes:
    """The first certificate of a PEM bundle (of ``ca.crt``: the issuing CA)."""
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(serialization.Encoding.PEM)


def bundle(*pems: bytes) -> bytes:
    """Certificates (PEM) as one trust bundle, in order."""
    return b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem in pems)


def expiry_of(cert_pem: bytes) -> datetime.datetime:
    """When a certificate stops being valid (UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


class FleetCertificates:
    """The fleet CA and its certificates in one directory (see the module doc).

    ``access`` is how ``ca.crt`` and every issued certificate and key are
    created (default: 0600, this process's user); ``ca.key`` is always 0600.
    """

    def __init__(self, directory: Path | str, access: FileAccess = PRIVATE) -> None:
        self.dir = Path(directory)
        self.access = access

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_FILE

    def _now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    def ensure_ca(self) -> Issued:
        """The CA, created on first use (0700 directory, 0600 files), reused after."""
        ensure_private_dir(self.dir)
        cert, key = self.ca_path, self.dir / CA_KEY_FILE
        if cert.exists() and key.exists():
            return Issued(first_certificate(cert.read_bytes()), key.read_bytes())
        ca = make_ca(self._now())
        write_private(key, ca.key_pem)
        write_private(cert, ca.cert_pem, self.access)
        return ca

    def paths(self, name: str) -> CertPaths:
        return CertPaths(self.ca_path, self.dir / f"{name}.crt", self.dir / f"{name}.key")

    def existing_identity(self, name: str) -> PeerIdentity | None:
        """The identity of the certificate stored under ``name``, if there is one."""
        path = self.paths(name).cert
        if not path.exists():
            return None
        try:
            return identity_of(path.read_bytes())
        except (BadIdentity, ValueError):
            return None

    def names(self) -> list[str]:
        """The names of the stored certificates (not the CA's), sorted."""
        return sorted(p.stem for p in self.dir.glob("*.crt") if p.name != CA_FILE)

    def is_current(self, name: str, identity: PeerIdentity, renew_within: datetime.timedelta | None = None) -> bool:
        """Whether ``name`` holds a certificate for ``identity`` with its key, from
        the current CA and (given ``renew_within``) not expiring within it."""
        paths = self.paths(name)
        if self.existing_identity(name) != identity or not paths.key.exists():
            return False
        if renew_within is None:
            return True
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        ca = x509.load_pem_x509_certificates(self.ca_path.read_bytes())[0]  # the issuing CA
        fresh = cert.not_valid_after_utc - renew_within > self._now()
        return fresh and cert.issuer == ca.subject and _signed_by(cert, ca)

    def ensure(self, name: str, identity: PeerIdentity, renew_within: datetime.timedelta | None = None) -> CertPaths:
        """Credentials for ``identity`` under ``name``: reused when the stored
        certificate names the same identity (and, given ``renew_within``, is
        from the current CA and valid for longer than that), issued (by the
        CA) otherwise."""
        paths = self.paths(name)
        if self.is_current(name, identity, renew_within):
            return paths
        issued = issue(self.ensure_ca(), identity, self._now())
        write_private(paths.key, issued.key_pem, self.access)
        write_private(paths.cert, issued.cert_pem, self.access)
        return paths

    def rotate(self) -> list[str]:
        """All at once: a new CA, every stored certificate issued again from it
        (same names, same identities), the old CA trusted no more. Returns the
        names re-issued. Processes pick the new files up when restarted; until
        then they refuse the new certificates and the new ones refuse them: for
        a roll without that, :meth:`rotation_step` (see the module doc)."""
        ca = make_ca(self._now())
        done = self._reissue_all(ca)
        write_private(self.dir / CA_KEY_FILE, ca.key_pem)
        write_private(self.ca_path, ca.cert_pem, self.access)
        (self.dir / NEXT_CA_KEY_FILE).unlink(missing_ok=True)
        return done

    def _reissue_all(self, ca: Issued) -> list[str]:
        done = []
        for name in self.names():
            identity = self.existing_identity(name)
            if identity is None:
                continue
            issued = issue(ca, identity, self._now())
            write_private(self.paths(name).key, issued.key_pem, self.access)
            write_private(self.paths(name).cert, issued.cert_pem, self.access)
            done.append(name)
        return done

    def trusted_cas(self) -> list[bytes]:
        """The CA certificates of the trust bundle (PEM), the issuing one first."""
        return [
            c.public_bytes(serialization.Encoding.PEM)
            for c in x509.load_pem_x509_certificates(self.ca_path.read_bytes())
        ]

    def rotation_phase(self) -> str:
        """Where a two-CA rotation stands: :data:`STEADY`, :data:`TRUSTING_BOTH` or :data:`REISSUED`."""
        if (self.dir / NEXT_CA_KEY_FILE).exists():
            return TRUSTING_BOTH
        return REISSUED if len(self.trusted_cas()) > 1 else STEADY

    def rotation_step(self) -> tuple[str, list[str]]:
        """Take the next step of a rotation with a two-CA overlap (the module doc's
        table); returns (the phase now, the names re-issued). After each step the
        fleet must be restarted, process by process, before the next.

        Each step writes the file that marks its phase last: a *reissue*
        interrupted half-way is taken again whole by the next call; a *begin*
        interrupted before ``ca-next.key`` is written is undone by the next
        call (a *finish*, back to the old CA alone), after which it can begin again."""
        phase = self.rotation_phase()
        cas = self.trusted_cas()
        if phase == STEADY:  # begin: a new CA beside the old, the old still issues
            new = make_ca(self._now())
            write_private(self.ca_path, bundle(cas[0], new.cert_pem), self.access)
            write_private(self.dir / NEXT_CA_KEY_FILE, new.key_pem)
            return TRUSTING_BOTH, []
        if phase == TRUSTING_BOTH:  # reissue: every leaf from the new CA, which now issues
            key_pem = (self.dir / NEXT_CA_KEY_FILE).read_bytes()
            new = Issued(_certificate_of_key(cas, key_pem), key_pem)
            done = self._reissue_all(new)
            write_private(self.ca_path, bundle(new.cert_pem, *(c for c in cas if c != new.cert_pem)), self.access)
            write_private(self.dir / CA_KEY_FILE, new.key_pem)
            (self.dir / NEXT_CA_KEY_FILE).unlink()
            return REISSUED, done
        # finish: the old CA is trusted no more
        write_private(self.ca_path, cas[0], self.access)
        return STEADY, []


def _certificate_of_key(cas: list[bytes], key_pem: bytes) -> bytes:
    """The CA certificate (of ``cas``) whose public key is ``key_pem``'s."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    want = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for pem in cas:
        public = x509.load_pem_x509_certificate(pem).public_key()
        if public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == want:
            return pem
    raise ValueError(f"no certificate in the trust bundle belongs to {NEXT_CA_KEY_FILE}")


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``cert`` (a CA rotated since leaves the old leaves unsigned by it)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
