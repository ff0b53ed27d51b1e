"""Logging setup: plain lines by default, one JSON object per line with RTM_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG_FORMAT_ENV = "RTM_LOG_FORMAT"  # "json": one JSON object per line (else plain lines)


class JsonFormatter(logging.Formatter):
    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "instance": self.instance,
            "msg": record.getMessage(),
        }
        for key in ("eid", "channel", "peer"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(instance: str, level: str = "INFO") -> None:
    """Configure the root logger for a process named ``instance`` (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get(LOG_FORMAT_ENV, "").lower() == "json":
        handler.setFormatter(JsonFormatter(instance))
    else:
        fmt = logging.Formatter(f"%(asctime)s {instance} %(levelname)s %(name)s: %(message)s")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
