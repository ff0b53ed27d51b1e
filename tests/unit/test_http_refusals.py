"""webapp_stub/http_refusals.py: aiohttp's refusals of malformed HTTP are counted and lose their
traceback; anything else it logs keeps its level and traceback."""

from __future__ import annotations

import logging
import sys

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from webapp_stub.http_refusals import REFUSAL_KIND, refusal_logger


def logged(exc: BaseException) -> tuple[list[str], list[logging.LogRecord]]:
    counted: list[str] = []
    logger = refusal_logger(counted.append)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    try:
        try:
            raise exc
        except type(exc):
            logger.exception("Error handling request from %s", "127.0.0.1", exc_info=sys.exc_info())
    finally:
        logger.parent.removeHandler(handler)  # type: ignore[union-attr]
    return counted, records


def test_a_malformed_request_is_counted_and_logged_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        counted, records = logged(
            BadHttpMessage("Invalid character in Content-Length: 1%s\n\n  b'Content-Length: 1%s'")
        )
    assert counted == [REFUSAL_KIND]
    [record] = records
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert record.getMessage() == (
        "Error handling request from 127.0.0.1: refused with 400 (Invalid character in Content-Length: 1%s)"
    )


def test_a_malformed_request_is_not_logged_at_info() -> None:
    counted, records = logged(BadHttpMessage("bad"))
    assert counted == [REFUSAL_KIND] and records == []


def test_anything_else_keeps_its_level_and_traceback() -> None:
    counted, records = logged(RuntimeError("a bug of ours"))
    assert counted == []
    [record] = records
    assert record.levelno == logging.ERROR and record.exc_info is not None
