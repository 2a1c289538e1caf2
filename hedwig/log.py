"""Logging setup: level names of SPEC §1, text or JSON lines on stderr.

A line is a message plus structured fields, passed as `extra=fields(...)`
(or `extra={"fields": {...}}`):

    log.info("accepted", extra=fields(session_id=sid, msg_id=mid, client=ip, rcpts=2))

- text:  `<ts> <level> <logger> pid=<pid> session_id=.. msg_id=.. accepted client=.. rcpts=2`
  (the ids in ID_FIELDS lead, then the message, then the other fields as
  key=value; a value with spaces, quotes, `=` or control characters is written
  as a JSON string, so one record is always one line and a client cannot forge
  a field);
- json:  one object per line, `{"ts", "level", "logger", "pid", "msg", ...}`
  with each field as a key of its own (a field named like one of those keys is
  stored as `<name>_`).

Callers log session_id / msg_id; nothing here or anywhere logs passwords,
AUTH arguments or message bodies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping

TRACE = 5
LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
          "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE}
logging.addLevelName(TRACE, "TRACE")

ID_FIELDS = ("session_id", "msg_id")  # text format: these come first, before the message
_BARE = re.compile(r'[^\s"=\\]+')  # a value written without quotes in the text format


def fields(**values: object) -> dict[str, dict[str, object]]:
    """The `extra=` of a log call carrying structured fields (None is written as `-` / null)."""
    return {"fields": values}


def _fields_of(record: logging.LogRecord) -> Mapping[str, object]:
    found = getattr(record, "fields", None)
    return found if isinstance(found, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def format_value(value: object) -> str:
    """One field value for the text format: bare when safe, else a JSON string."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e6 else repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        values = _fields_of(record)
        parts = [f"{_timestamp(record)} {record.levelname.lower()} {record.name} pid={record.process}"]
        parts += [f"{key}={format_value(values[key])}" for key in ID_FIELDS if key in values]
        message = record.getMessage()
        if message:
            parts.append(message)
        parts += [f"{key}={format_value(value)}" for key, value in values.items() if key not in ID_FIELDS]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        base = set(entry) | {"exc"}
        for key, value in _fields_of(record).items():
            entry[f"{key}_" if key in base else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger; HEDWIG_LOG_LEVEL overrides `level`."""
    name = os.environ.get("HEDWIG_LOG_LEVEL", "").strip().lower() or level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(name, logging.INFO))
