"""``--public-url`` (webapp_stub/client.py: public_base_url): what the webapp's permalinks start
with behind an edge proxy, and the values refused at start."""

from __future__ import annotations

import pytest

from webapp_stub.client import public_base_url


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("", ""),
        ("https://edge:8443", "https://edge:8443"),
        ("https://edge:8443/", "https://edge:8443"),
        ("http://127.0.0.1:7401", "http://127.0.0.1:7401"),
        ("https://[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_a_public_url_is_kept_as_scheme_and_host(given: str, base: str) -> None:
    assert public_base_url(given) == base


@pytest.mark.parametrize(
    "given",
    [
        "edge:8443",
        "ftp://edge",
        "https://",
        "https://edge/rtm",
        "https://edge?x=1",
        "https://edge#top",
        "https://user@edge",
        "https://edge:99999",
        "wss://edge:8443",
    ],
)
def test_anything_else_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match="--public-url"):
        public_base_url(given)
