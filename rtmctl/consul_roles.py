"""One Consul ACL token per fleet role, as ``rtm up`` gives them to its dev Consul agent.

Each role's rules are those of ``deploy/consul/policies/<role>.hcl`` (real
Consul in ``deploy/``), in Consul's JSON rule syntax, so the two places agree
(``tests/unit/test_consul_roles.py`` parses the HCL files and compares):

* every role reads what the fleet shares: ``service_prefix ""``,
  ``node_prefix ""`` and ``key_prefix "rtm/"`` (rings, region map, drained flags);
* each service writes only its own registrations: ``service "<its name>" write``
  (Consul scopes service rules by name, not instance);
* CHARM alone writes the rings (``key_prefix "rtm/ring/"``), its leader key
  (``key "rtm/charm/leader"``) and sessions (``session_prefix ""``: its leader lock);
* the operator (the ``rtm`` commands, and ``rtm up`` itself, which writes the
  default region map) alone writes the drained-regions flags and the region
  map, and registers nothing.

``DATA_DIR/consul-acl-tokens.json`` (0600, :mod:`services.secret_file`) is the
dev agent's ``--acl-tokens-file``: SecretID -> ``{"AccessorID", "Description",
"Rules"}``. A token is found again by its description (``rtm <role>``, as
``deploy/consul/acl-init.sh`` names them): its SecretID and AccessorID are kept
across restarts, its rules are rewritten from this module (as ``acl-init.sh``
updates a policy from its file and keeps the token).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, OPERATOR, PRESENCE, WEBAPP
from services.regions import DRAINED_PREFIX, REGION_MAP_KEY
from services.ring import CHARM_LEADER_KEY
from services.secret_file import create_secret_file, new_token, replace_secret_file

TOKENS_FILE: Final = "consul-acl-tokens.json"
# The services that register themselves (each writes only its own name), and the operator.
SERVICE_ROLES: Final = (WEBAPP, ADMIN_SERVER, CHANNEL_SERVER, PRESENCE, CHARM, GATEWAY)
ROLES: Final = (*SERVICE_ROLES, OPERATOR)
FLEET_KEY_PREFIX: Final = "rtm/"  # every document the fleet keeps in Consul KV
RING_KEY_PREFIX: Final = "rtm/ring/"  # services.ring.CHANNEL_RING_KEY and PRESENCE_RING_KEY

READ: Final = {"policy": "read"}
WRITE: Final = {"policy": "write"}

Rules = dict[str, dict[str, dict[str, str]]]


class TokensFileError(ValueError):
    """``DATA_DIR/consul-acl-tokens.json`` exists but is not a tokens file (remove it to have new tokens made)."""


def description(role: str) -> str:
    """How a role's token is described (and found again): ``rtm <role>``, as ``acl-init.sh`` says."""
    return f"rtm {role}"


def role_rules(role: str) -> Rules:
    """The Consul rules (JSON syntax) of ``role``; raises ValueError for an unknown role."""
    if role not in ROLES:
        raise ValueError(f"no Consul role {role!r}; the roles are {', '.join(ROLES)}")
    rules: Rules = {
        "service_prefix": {"": dict(READ)},
        "node_prefix": {"": dict(READ)},
        "key_prefix": {FLEET_KEY_PREFIX: dict(READ)},
    }
    if role in SERVICE_ROLES:
        rules["service"] = {role: dict(WRITE)}
    if role == CHARM:
        rules["key_prefix"][RING_KEY_PREFIX] = dict(WRITE)
        rules["key"] = {CHARM_LEADER_KEY: dict(WRITE)}
        # The leader lock is a session on the agent's node (the dev agent's is "rtm-dev",
        # deploy/'s the Consul container's hostname): any node, as in deploy/.
        rules["session_prefix"] = {"": dict(WRITE)}
    if role == OPERATOR:
        rules["key_prefix"][DRAINED_PREFIX] = dict(WRITE)
        rules["key"] = {REGION_MAP_KEY: dict(WRITE)}
    return rules


def _read_tokens(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokensFileError(f"{path} is not JSON ({exc}); remove it to have new tokens made") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise TokensFileError(f"{path} is not a tokens file (SecretID -> token); remove it to have new tokens made")
    return doc


def ensure_role_tokens(data_dir: Path) -> dict[str, str]:
    """Each role's SecretID (role -> secret), made on first start and kept on restart.

    Writes ``DATA_DIR/consul-acl-tokens.json`` (0600 from its first byte; replaced
    atomically when a role was missing or its rules changed). Raises
    :class:`TokensFileError` for a file that is not a tokens file.
    """
    path = data_dir / TOKENS_FILE
    existing = _read_tokens(path) if path.exists() else {}
    by_description = {body.get("Description"): (secret, body) for secret, body in existing.items()}
    doc: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    for role in ROLES:
        secret, body = by_description.get(description(role), ("", {}))
        accessor = body.get("AccessorID")
        if not secret or not isinstance(accessor, str) or not accessor:
            secret, accessor = new_token(), str(uuid.uuid4())
        secrets[role] = secret
        doc[secret] = {"AccessorID": accessor, "Description": description(role), "Rules": role_rules(role)}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if not path.exists():
        create_secret_file(path, text)
    elif doc != existing:
        replace_secret_file(path, text)
    return secrets


def role_token(data_dir: Path, role: str) -> str:
    """The SecretID of ``role`` in ``DATA_DIR/consul-acl-tokens.json``; "" when there is none."""
    path = data_dir / TOKENS_FILE
    if not path.exists():
        return ""
    doc: Mapping[str, Any] = _read_tokens(path)
    return next((secret for secret, body in doc.items() if body.get("Description") == description(role)), "")
