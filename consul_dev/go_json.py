"""Request bodies read as Go's ``encoding/json`` decodes them into Consul's structs.

Keys match case-insensitively (plus Consul's snake_case aliases), unknown keys
are ignored, ``null`` leaves the zero value, a type mismatch fails the decode
with Go's wording (:class:`~consul_dev.errors.InvalidRequest`).
"""

from __future__ import annotations

from typing import Any, Final

from consul_dev.errors import InvalidRequest
from consul_dev.go_text import parse_go_duration_ns

Json = Any


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


MISSING: Final = object()


class GoDecoder:
    """Reads one decoded JSON object the way Go's ``encoding/json`` fills a Consul struct.

    Keys match exactly first, then case-insensitively, then through Consul's
    snake_case aliases; unknown keys are ignored; ``null`` leaves the zero
    value; a type mismatch raises :class:`InvalidRequest` with Go's wording.
    """

    def __init__(self, raw: Json, struct: str) -> None:
        if not isinstance(raw, dict):
            raise InvalidRequest(
                f"Request decode failed: json: cannot unmarshal {_json_kind(raw)} into Go value of type structs.{struct}"
            )
        self.raw: dict[str, Any] = raw
        self.struct = struct

    def get(self, name: str, *aliases: str) -> Any:
        if name in self.raw:
            return self.raw[name]
        lower = name.lower()
        for key, value in self.raw.items():
            if key.lower() == lower:
                return value
        for alias in aliases:
            if alias in self.raw:
                return self.raw[alias]
        return MISSING

    def present(self, name: str, *aliases: str) -> bool:
        value = self.get(name, *aliases)
        return value is not MISSING and value is not None

    def fail(self, name: str, value: Any, go_type: str) -> InvalidRequest:
        return InvalidRequest(
            f"Request decode failed: json: cannot unmarshal {_json_kind(value)} "
            f"into Go struct field {self.struct}.{name} of type {go_type}"
        )

    def string(self, name: str, *aliases: str) -> str:
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(name, value, "string")
        return value

    def integer(self, name: str, *aliases: str) -> int:
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, value, "int")
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(
                f"Request decode failed: json: cannot unmarshal number {value} into Go struct field "
                f"{self.struct}.{name} of type int"
            )
        return int(value)

    def boolean(self, name: str, *aliases: str) -> bool:
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(name, value, "bool")
        return value

    def string_list(self, name: str, *aliases: str) -> list[str] | None:
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return None
        if not isinstance(value, list):
            raise self.fail(name, value, "[]string")
        for item in value:
            if not isinstance(item, str):
                raise self.fail(name, item, "string")
        return list(value)

    def string_map(self, name: str, *aliases: str) -> dict[str, str] | None:
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, value, "map[string]string")
        for item in value.values():
            if not isinstance(item, str):
                raise self.fail(name, item, "string")
        return dict(value)

    def duration_ns(self, name: str, *aliases: str) -> int:
        """A duration given as a Go duration string or as a number of nanoseconds."""
        value = self.get(name, *aliases)
        if value is MISSING or value is None:
            return 0
        if isinstance(value, str):
            try:
                return parse_go_duration_ns(value)
            except ValueError as exc:
                raise InvalidRequest(f"Request decode failed: {exc}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        raise self.fail(name, value, "time.Duration")
