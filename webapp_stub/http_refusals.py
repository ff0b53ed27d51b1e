"""Requests aiohttp refuses as malformed HTTP on the public port: counted, never a traceback.

aiohttp answers a request it cannot parse (a negative or doubled ``Content-Length``, a NUL or bare
LF in the head, a bad chunk size, a line over 8,190 bytes, a ``Content-Encoding`` it cannot
decode such as ``br`` without Brotli) with its own 400 and closes the connection, which is right;
but it logged each one at ERROR with a traceback, so any client could fill the webapp's log with
tracebacks at will. Its server logger on the public port is :func:`refusal_logger`'s: such a
refusal is counted in ``rtm_errors_total{kind="bad_http_request"}`` (as the webapp's other refusals
of client input are) and logged on one line at DEBUG. Everything else aiohttp logs there (an
exception escaping a handler: a bug of ours) keeps its level and traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webapp_stub.http_front import KEEPALIVE_TIMEOUT_S

AIOHTTP_SERVER_LOGGER = "aiohttp.server"
REFUSAL_KIND = "bad_http_request"


class HttpRefusals(logging.Filter):
    """Turns aiohttp's log record of a malformed request into a count and a one-line debug record."""

    def __init__(self, count: Callable[[str], None]) -> None:
        super().__init__()
        self.count = count

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or record.levelno <= logging.DEBUG:
            return True  # not a refusal, or one aiohttp logs at debug itself (not HTTP at all): as it is
        self.count(REFUSAL_KIND)
        first_line = str(exc.message).strip().partition("\n")[0].replace("%", "%%")  # record.args still apply
        record.msg = f"{record.msg}: refused with {exc.code} ({first_line})"
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(AIOHTTP_SERVER_LOGGER).isEnabledFor(logging.DEBUG)


def refusal_logger(count: Callable[[str], None]) -> logging.Logger:
    """aiohttp's server logger for one public port (``AppRunner(..., logger=)``): a child of
    ``aiohttp.server`` in all but name (its level and handlers), with :class:`HttpRefusals` on it.
    Not registered with :mod:`logging`, so each webapp in a process counts its own."""
    logger = logging.Logger(AIOHTTP_SERVER_LOGGER)
    logger.parent = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    logger.addFilter(HttpRefusals(count))
    return logger


def public_runner(app: web.Application, count: Callable[[str], None], shutdown_timeout_s: float) -> web.AppRunner:
    """The aiohttp runner of the public port: no access log; ``keepalive_timeout`` (aiohttp's default is
    an hour; it also bounds a head's arrival there); its server logger :func:`refusal_logger`'s."""
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        logger=refusal_logger(count),
    )
