"""Sans-I/O model of Consul's ACL enforcement, as the dev agent applies it.

Real Consul with ``acl { enabled = true, default_policy = "deny" }`` resolves
the token of every request (``?token=``, else ``X-Consul-Token``, else
``Authorization: Bearer``; see :func:`request_token`) before it looks at the
request, and then:

* an unknown token: 403 ``ACL not found``, on every endpoint that resolves
  tokens (all of them but ``/v1/status/*`` and ``/v1/catalog/datacenters``);
* no token: the *anonymous* token, which under default deny has no rights:

  - endpoints that name one object answer 403 with the detailed text Consul
    sends since 1.12 (deploy/ runs 1.19), KV, session and agent endpoints
    alike (``Permission denied: anonymous token lacks permission 'key:read' on
    "rtm/ring/channel". The anonymous token is used implicitly when a request
    does not specify a token.``; ``service:write``, ``session:write``,
    ``agent:read``, ... as the endpoint needs); before 1.12 the KV and session
    endpoints sent a bare ``Permission denied``;
  - list endpoints (health, catalog, agent services/checks, session lists,
    KV ``recurse``/``keys``) are *filtered*: 200 with what the token may see,
    which is nothing (``[]``, ``{}``; KV lists then answer 404 as for no keys).
    The ``X-Consul-Results-Filtered-By-ACLs`` header is masked for the
    anonymous token, so it is not sent.

* the management token: everything, as without ACLs.

The dev agent enforces one token, the management token it was started with
(``rtm consul-dev --acl-token T``): all or nothing. It does not model
policies, roles, the ``/v1/acl/*`` API, or tokens with partial rights; the
compose stack's real Consul does (``deploy/consul/``, ``docs/consul-acl.md``).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import ClassVar, Final

from consul_dev.errors import ConsulError

ANONYMOUS_TOKEN_ACCESSOR_ID: Final = "00000000-0000-0000-0000-000000000002"  # acl.AnonymousTokenID
# The accessor id the dev agent reports for its one management token (real
# Consul's bootstrap token gets a random one; the dev agent never prints it).
MANAGEMENT_ACCESSOR_ID: Final = "00000000-0000-0000-0000-00000000000a"
DEFAULT_POLICY_DENY: Final = "deny"
DEFAULT_POLICY_ALLOW: Final = "allow"
ACL_NOT_FOUND_TEXT: Final = "ACL not found"
PERMISSION_DENIED_TEXT: Final = "Permission denied"
_ANONYMOUS_SUFFIX: Final = ". The anonymous token is used implicitly when a request does not specify a token."


class Resource(StrEnum):
    """Consul's ACL resources the dev agent checks (``acl.Resource``)."""

    AGENT = "agent"
    NODE = "node"
    SERVICE = "service"
    KEY = "key"
    SESSION = "session"


class Access(StrEnum):
    """Access levels (``acl.AccessLevel.String()``)."""

    READ = "read"
    WRITE = "write"


class ACLNotFound(ConsulError):
    """403 ``ACL not found``: the request's token is unknown to Consul."""

    status: ClassVar[int] = 403

    def __init__(self) -> None:
        super().__init__(ACL_NOT_FOUND_TEXT)


class PermissionDenied(ConsulError):
    """403 ``Permission denied`` (bare, or with the resource the token lacks)."""

    status: ClassVar[int] = 403


class Rule(Enum):
    """How one endpoint applies ACLs."""

    OPEN = "open"  # no token is resolved (status, datacenters, rtm's own /healthz and /metrics)
    FILTER = "filter"  # list read: a denied token sees an empty result
    CHECK = "check"  # the handler checks the named object and raises PermissionDenied


@dataclass(frozen=True)
class Authorizer:
    """What one resolved token may do: everything (management) or nothing (anonymous under deny)."""

    accessor_id: str
    allow_all: bool

    @property
    def anonymous(self) -> bool:
        return self.accessor_id == ANONYMOUS_TOKEN_ACCESSOR_ID

    def allowed(self, resource: Resource, access: Access, name: str = "") -> bool:
        """True when the token may ``access`` ``resource`` ``name`` (the dev agent: all or nothing)."""
        return self.allow_all

    def require(self, resource: Resource, access: Access, name: str) -> None:
        """Raise the :class:`PermissionDenied` every endpoint that names one object answers.

        Consul's ``acl.PermissionDeniedByACL`` text (``acl/errors.go``), which since Consul
        1.12 the KV and session endpoints send too (``KeyReadAllowed``, ``KeyWriteAllowed``,
        ``KeyWritePrefixAllowed``, ``SessionWriteAllowed``); ``name`` empty: no ``on "..."``.
        """
        if self.allowed(resource, access, name):
            return
        who = "anonymous token" if self.anonymous else f"token with AccessorID '{self.accessor_id}'"
        text = f"{PERMISSION_DENIED_TEXT}: {who} lacks permission '{resource.value}:{access.value}'"
        if name:
            text += f' on "{name}"'
        if self.anonymous:
            text += _ANONYMOUS_SUFFIX
        raise PermissionDenied(text)


ALLOW_ALL: Final = Authorizer(MANAGEMENT_ACCESSOR_ID, allow_all=True)
ANONYMOUS_DENY: Final = Authorizer(ANONYMOUS_TOKEN_ACCESSOR_ID, allow_all=False)


class AccessControl:
    """Resolves request tokens against the agent's one management token.

    With no management token ACLs are off: every request is allowed, as Consul
    with ``acl.enabled = false`` (the header ``X-Consul-Default-ACL-Policy``
    then says ``allow``).
    """

    def __init__(self, management_token: str = "") -> None:
        self._token = management_token.encode()

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    @property
    def default_policy(self) -> str:
        return DEFAULT_POLICY_DENY if self.enabled else DEFAULT_POLICY_ALLOW

    def resolve(self, token: str) -> Authorizer:
        """The :class:`Authorizer` of ``token``; raises :class:`ACLNotFound` for an unknown one.

        Compared in constant time, so the answer time says nothing about the secret.
        """
        if not self.enabled:
            return ALLOW_ALL
        if token == "":
            return ANONYMOUS_DENY
        if hmac.compare_digest(token.encode(), self._token):
            return ALLOW_ALL
        raise ACLNotFound()


def request_token(query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The request's token as Consul's ``parseTokenInternal`` reads it.

    ``?token=`` first, then ``X-Consul-Token``, then ``Authorization: Bearer
    <token>`` (the scheme is case-sensitive, the first word after it is the
    token); "" when none is given (the anonymous token).
    """
    token = query.get("token", "")
    if token:
        return token
    token = headers.get("X-Consul-Token", "")
    if token:
        return token
    parts = headers.get("Authorization", "").split(" ")
    if len(parts) > 1 and parts[0] == "Bearer":
        value = " ".join(parts[1:]).strip()
        return value.split(" ")[0].strip()
    return ""
