"""hedwig.log: structured fields as key=value text or as JSON keys, one line per record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hedwig.log import JsonFormatter, TextFormatter, fields, format_value


def record(msg: str, *args: object, extra: dict | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("hedwig.test", logging.INFO, __file__, 1, msg, args, None)
    for key, val in (extra or {}).items():
        setattr(rec, key, val)
    return rec


def test_text_puts_the_ids_first_then_the_message_then_the_fields() -> None:
    rec = record("accepted", extra=fields(client="127.0.0.1", msg_id="01ABC", session_id="1f",
                                          sender="a@b.test", rcpts=2, size=300))
    line = TextFormatter().format(rec)
    assert line.endswith(" hedwig.test pid=%d session_id=1f msg_id=01ABC accepted client=127.0.0.1 "
                         "sender=a@b.test rcpts=2 size=300" % rec.process), line


def test_text_without_fields_is_the_message() -> None:
    assert TextFormatter().format(record("spool %s: %d queued", "/x", 3)).endswith(" spool /x: 3 queued")


@pytest.mark.parametrize("value, text", [
    ("250 2.0.0 OK", '"250 2.0.0 OK"'),
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("a=b", '"a=b"'),
    ("line\r\nforged=1", '"line\\r\\nforged=1"'),  # one record, one line, no forged field
    ("<a@b.test>", "<a@b.test>"),
    (None, "-"),
    (True, "true"),
    (0.12345, "0.123"),
    (7, "7"),
])
def test_text_values(value: object, text: str) -> None:
    assert format_value(value) == text


def test_json_fields_are_keys() -> None:
    rec = record("attempt", extra=fields(msg_id="01ABC", domain="d.test", host=None, outcome="delivered",
                                         reply="250 OK", latency=0.012, msg="not the message"))
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["msg"] == "attempt"
    assert entry["msg_"] == "not the message"  # a field never overwrites the line's own keys
    assert {k: entry[k] for k in ("msg_id", "domain", "host", "outcome", "reply", "latency")} == {
        "msg_id": "01ABC", "domain": "d.test", "host": None, "outcome": "delivered",
        "reply": "250 OK", "latency": 0.012}
    assert {"ts", "level", "logger", "pid"} <= set(entry)


def test_json_is_one_line_and_takes_any_value() -> None:
    rec = record("x", extra=fields(path=Path("/a/b"), text="two\nlines"))
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert json.loads(line)["path"] == "/a/b"
