"""The dev agent's errors; each carries the HTTP status and body text real Consul sends::

ConsulError                    (500: what Consul's servers answer)
├── InvalidRequest             400: decode failures, "Missing service name", ...
├── NotFound                   404
│   ├── UnknownService         agent service ID not registered here
│   ├── UnknownCheck           agent check ID not registered here
│   ├── UnknownSession         session renew of an unknown session
│   └── ServiceNotRegistered   check registration naming an unknown ServiceID
├── RequestTooLarge            413: KV value above 512 KiB
└── ServerError                500: e.g. ``invalid session "..."``, bad session TTL
"""

from __future__ import annotations

from typing import ClassVar

from consul_dev.go_text import go_quote


class ConsulError(Exception):
    """Base of every error the model raises.

    ``status`` is the HTTP status real Consul answers with and ``str(err)`` is
    its body text. Errors raised by Consul's servers (RPC errors) reach HTTP
    clients as 500 with the error text, hence the default.
    """

    status: ClassVar[int] = 500


class InvalidRequest(ConsulError):
    """400: the request is malformed or fails validation."""

    status = 400


class NotFound(ConsulError):
    """404: the named object does not exist."""

    status = 404


class UnknownService(NotFound):
    """An agent service ID that is not registered on this agent."""

    def __init__(self, service_id: str) -> None:
        super().__init__(
            f"Unknown service ID {go_quote(service_id)}. Ensure that the service ID is passed, not the service name."
        )
        self.service_id = service_id


class UnknownCheck(NotFound):
    """An agent check ID that is not registered on this agent."""

    def __init__(self, check_id: str) -> None:
        super().__init__(
            f"Unknown check ID {go_quote(check_id)}. Ensure that the check ID is passed, not the check name."
        )
        self.check_id = check_id


class UnknownSession(NotFound):
    """Renew of a session that does not exist (or was invalidated)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session id '{session_id}' not found")
        self.session_id = session_id


class ServiceNotRegistered(NotFound):
    """A check registration names a ServiceID this agent does not have."""

    def __init__(self, service_id: str) -> None:
        super().__init__(f"ServiceID {go_quote(service_id)} does not exist")
        self.service_id = service_id


class RequestTooLarge(ConsulError):
    """413: a KV value above ``kv_max_value_size``."""

    status = 413


class ServerError(ConsulError):
    """500: an error Consul's servers return (bad session TTL, invalid session, ...)."""

    status = 500
