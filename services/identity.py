"""Who a fleet process is: the service names, and the identity a peer proves.

Every fleet process has one :class:`PeerIdentity`: its service (which is also
its role on the wire: what it may send, see ``docs/trust.md``), and its
instance id. The identity travels in the process's TLS certificate as a URI
subject alternative name, the way service meshes name workloads (SPIFFE)::

    spiffe://rtm/<service>/<instance>

A connection accepted by a fleet server is bound to the identity of the
certificate its peer presented (``PeerConnection.identity``); the handlers
check each op against that identity's role, never against what a message
says about its sender.
"""

from __future__ import annotations

from dataclasses import dataclass

# Service names: also the names processes register under in Consul.
WEBAPP = "webapp"
ADMIN_SERVER = "admin-server"
CHANNEL_SERVER = "channel-server"
GATEWAY = "gateway"
PRESENCE = "presence"
CHARM = "charm"
OPERATOR = "operator"  # the `rtm` command line: never registered, only a certificate

SERVICES: tuple[str, ...] = (WEBAPP, ADMIN_SERVER, CHANNEL_SERVER, GATEWAY, PRESENCE, CHARM, OPERATOR)

SPIFFE_PREFIX = "spiffe://rtm/"


class BadIdentity(ValueError):
    """A URI that does not name a fleet identity."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A fleet process: ``service`` (its role) and ``instance`` (its unique id)."""

    service: str
    instance: str

    @property
    def role(self) -> str:
        """What the identity may send; the service name is the role."""
        return self.service

    def uri(self) -> str:
        """The certificate's URI SAN for this identity."""
        return f"{SPIFFE_PREFIX}{self.service}/{self.instance}"

    @classmethod
    def from_uri(cls, uri: str) -> PeerIdentity:
        """Parse ``spiffe://rtm/<service>/<instance>``; raises :class:`BadIdentity`."""
        if not uri.startswith(SPIFFE_PREFIX):
            raise BadIdentity(f"not an rtm identity: {uri!r}")
        service, sep, instance = uri[len(SPIFFE_PREFIX) :].partition("/")
        if not sep or service not in SERVICES or not instance or "/" in instance:
            raise BadIdentity(f"not an rtm identity: {uri!r}")
        return cls(service, instance)

    def __str__(self) -> str:
        return f"{self.service}/{self.instance}"
