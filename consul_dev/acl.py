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
    which is nothing (``[]``, ``{}``; KV lists then answer 404 as for no keys, but
    ``?keys`` at the root an empty list, as Consul's ``KVSGetKeys``).
    The ``X-Consul-Results-Filtered-By-ACLs`` header is masked for the
    anonymous token, so it is not sent.

* the management token (``rtm consul-dev --acl-token T``): everything, as
  without ACLs;
* a token with rules (``rtm consul-dev --acl-tokens-file PATH``, see
  :func:`parse_token_file`): what its rules grant (:mod:`consul_dev.acl_rules`:
  exact over prefix, longest prefix wins, default deny). A refusal names the
  token's accessor (``Permission denied: token with AccessorID '...' lacks
  permission 'key:write' on "rtm/ring/channel"``); a list is filtered entry by
  entry (:mod:`consul_dev.acl_filter`) and, when something was removed, says so
  with ``X-Consul-Results-Filtered-By-ACLs: true``.

Not modelled: the ``/v1/acl/*`` API, policies and roles as objects of their
own (a token carries its rules), token TTLs, namespaces, ``acl.tokens.default``;
the compose stack's real Consul has them (``deploy/consul/``, ``docs/consul-acl.md``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Final

from consul_dev.acl_rules import NO_RULES, RuleSet, parse_rules
from consul_dev.acl_rules import Access as Access  # re-exported: the endpoints name them from here
from consul_dev.acl_rules import Resource as Resource
from consul_dev.acl_rules import RulesError as RulesError
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
    """What one resolved token may do: everything (management), or what its rules grant (else nothing)."""

    accessor_id: str
    allow_all: bool
    rules: RuleSet = NO_RULES

    @property
    def anonymous(self) -> bool:
        return self.accessor_id == ANONYMOUS_TOKEN_ACCESSOR_ID

    def allowed(self, resource: Resource, access: Access, name: str = "") -> bool:
        """True when the token may ``access`` ``resource`` ``name`` (Consul's ``Allow``)."""
        return self.allow_all or self.rules.allows(resource, access, name)

    def require(self, resource: Resource, access: Access, name: str) -> None:
        """Raise the :class:`PermissionDenied` every endpoint that names one object answers.

        Consul's ``acl.PermissionDeniedByACL`` text (``acl/errors.go``), which since Consul
        1.12 the KV and session endpoints send too (``KeyReadAllowed``, ``KeyWriteAllowed``,
        ``KeyWritePrefixAllowed``, ``SessionWriteAllowed``); ``name`` empty: no ``on "..."``.
        """
        if not self.allowed(resource, access, name):
            raise self.denied(resource, access, name)

    def require_key_write_prefix(self, prefix: str) -> None:
        """``KeyWritePrefix`` (a recursive delete): write on ``prefix`` and on every rule under it."""
        if not (self.allow_all or self.rules.allows_key_write_prefix(prefix)):
            raise self.denied(Resource.KEY, Access.WRITE, prefix)

    def denied(self, resource: Resource, access: Access, name: str) -> PermissionDenied:
        """The refusal, in Consul's words, naming this token (or the anonymous token)."""
        who = "anonymous token" if self.anonymous else f"token with AccessorID '{self.accessor_id}'"
        text = f"{PERMISSION_DENIED_TEXT}: {who} lacks permission '{resource.value}:{access.value}'"
        if name:
            text += f' on "{name}"'
        if self.anonymous:
            text += _ANONYMOUS_SUFFIX
        return PermissionDenied(text)


ALLOW_ALL: Final = Authorizer(MANAGEMENT_ACCESSOR_ID, allow_all=True)
ANONYMOUS_DENY: Final = Authorizer(ANONYMOUS_TOKEN_ACCESSOR_ID, allow_all=False)


@dataclass(frozen=True)
class Token:
    """One token the agent knows (besides the management token): its accessor, description and rules."""

    accessor_id: str
    description: str
    rules: RuleSet


def parse_token_file(text: str) -> dict[str, Token]:
    """The tokens of an ``--acl-tokens-file``: a JSON object, SecretID -> token; raises :class:`RulesError`.

    Each token is ``{"AccessorID": "...", "Description": "...", "Rules": {...}}``, its
    ``Rules`` in Consul's JSON rule syntax (an object, or a string holding one, as
    Consul's policy API carries ``Rules``; :mod:`consul_dev.acl_rules`). Secrets and
    accessor ids must be non-empty and unique; the anonymous accessor id is reserved.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RulesError(f"the tokens file is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RulesError("the tokens file must be a JSON object: SecretID -> token")
    tokens: dict[str, Token] = {}
    accessors: set[str] = set()
    for secret, body in doc.items():
        if not secret.strip() or secret != secret.strip():
            raise RulesError("a SecretID must be non-empty, without surrounding spaces")
        if not isinstance(body, dict) or not isinstance(body.get("AccessorID"), str):
            raise RulesError("each token must be an object with an AccessorID string")
        accessor = body["AccessorID"]
        if not accessor or accessor in accessors or accessor in (ANONYMOUS_TOKEN_ACCESSOR_ID, MANAGEMENT_ACCESSOR_ID):
            raise RulesError(f"AccessorID {accessor!r} is empty, reserved or used twice")
        accessors.add(accessor)
        description = body.get("Description", "")
        if not isinstance(description, str):
            raise RulesError(f"token {accessor}: Description must be a string")
        tokens[secret] = Token(accessor, description, _token_rules(accessor, body.get("Rules", {})))
    return tokens


def _token_rules(accessor: str, raw: Any) -> RuleSet:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            raise RulesError(
                f"token {accessor}: Rules must be Consul's JSON rule syntax (the dev agent does not parse HCL)"
            ) from None
    try:
        return parse_rules(raw)
    except RulesError as exc:
        raise RulesError(f"token {accessor}: {exc}") from None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AccessControl:
    """Resolves request tokens against the agent's management token and its tokens with rules.

    With neither, ACLs are off: every request is allowed, as Consul with
    ``acl.enabled = false`` (the header ``X-Consul-Default-ACL-Policy`` then
    says ``allow``). With either, the default policy is deny.
    """

    def __init__(self, management_token: str = "", tokens: Mapping[str, Token] | None = None) -> None:
        # Looked up by SHA-256 of the secret: the time a lookup takes says nothing about a secret.
        self._authorizers: dict[bytes, Authorizer] = {
            _digest(secret): Authorizer(token.accessor_id, allow_all=False, rules=token.rules)
            for secret, token in (tokens or {}).items()
        }
        if management_token:
            self._authorizers[_digest(management_token)] = ALLOW_ALL

    @property
    def enabled(self) -> bool:
        return bool(self._authorizers)

    @property
    def default_policy(self) -> str:
        return DEFAULT_POLICY_DENY if self.enabled else DEFAULT_POLICY_ALLOW

    def resolve(self, token: str) -> Authorizer:
        """The :class:`Authorizer` of ``token``; raises :class:`ACLNotFound` for an unknown one."""
        if not self.enabled:
            return ALLOW_ALL
        if token == "":
            return ANONYMOUS_DENY
        authz = self._authorizers.get(_digest(token))
        if authz is None:
            raise ACLNotFound()
        return authz


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
