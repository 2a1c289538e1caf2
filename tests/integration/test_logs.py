"""SPEC §8 logs from a real Hedwig process: JSON lines, the accept and attempt fields, no secrets.

Mail goes in through a raw socket after AUTH PLAIN on a cleartext listener
(`allow_cleartext_auth`), comes out at an aiosmtpd sink (one recipient
refused with 550) or at a closed port (deferred); outcomes are read from the
spool's journal with tests/support/proc.py's independent reader, then the
whole log is read back.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.proc import (
    HOST,
    HedwigProcess,
    RawClient,
    Replace,
    dot_stuff,
    queued_id,
    read_journal,
    to_toml,
    wait_until,
)
from tests.support.sink import Sink, closed_port

SENDER = "sender@client.test"
USER, PASSWORD = "carol", "pw-9d2e77-secret"
WRONG_PASSWORD = "guess-41b0c3-wrong"
BODY_MARKER = "body-marker-5e8a1f"

ACCEPT_FIELDS = {"msg_id", "session_id", "client", "sender", "rcpts", "size"}
ATTEMPT_FIELDS = {"msg_id", "domain", "host", "outcome", "reply", "latency"}


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def start(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> HedwigProcess:
    """A server whose listener allows AUTH without TLS (loopback submission port)."""
    proc = HedwigProcess(tmp_path / "hedwig", config, env=env)
    proc.config["server"]["listeners"][0]["allow_cleartext_auth"] = True
    proc.config_path.write_text(to_toml(proc.config))
    return proc.start().wait_ready()


def message(tag: str) -> bytes:
    return (f"From: {SENDER}\r\nSubject: {tag} {BODY_MARKER}\r\n\r\n"
            f"{BODY_MARKER} text of {tag}\r\n").encode()


def send(c: RawClient, rcpts: list[str], data: bytes) -> str:
    c.cmd(f"MAIL FROM:<{SENDER}>", 250)
    for rcpt in rcpts:
        c.cmd(f"RCPT TO:<{rcpt}>", 250)
    c.cmd("DATA", 354)
    c.send(dot_stuff(data) + b".\r\n")
    return queued_id(c.expect(250).text)


def entries(proc: HedwigProcess) -> list[dict[str, Any]]:
    """Every log line as JSON (each must be one object)."""
    found = []
    for line in proc.log_text().splitlines():
        if line.startswith("--- start"):
            continue
        entry = json.loads(line)  # raises on a line that is not JSON
        assert isinstance(entry, dict) and {"ts", "level", "logger", "pid", "msg"} <= set(entry), line
        found.append(entry)
    return found


@pytest.mark.timeout(40)
def test_json_logs_carry_the_accept_and_attempt_fields_and_no_secrets(tmp_path: Path) -> None:
    sink = Sink(rcpt_reply={"gone@sink.test": "550 5.1.1 no such user"})
    proc = start(tmp_path, {
        "log": {"format": "json", "level": "info"},
        "server": {
            "auth": [{"username": USER, "password": PASSWORD}],
            "relay_networks": [],  # relaying needs the AUTH
            "outbound_local": True,
            "retry_initial_delay": "1h",
            "retry_max_delay": "1h",
            "routes": Replace({"sink.test": f"{HOST}:{sink.port}", "later.test": f"{HOST}:{closed_port()}"}),
            "smtp": {"connect_timeout": "2s", "command_timeout": "3s"},
        },
    })
    try:
        with RawClient(proc.port) as c:  # a wrong password first: its failure is logged, it is not
            c.expect(220)
            c.cmd("EHLO client.test", 250)
            c.cmd(f"AUTH PLAIN {plain(USER, WRONG_PASSWORD)}", 535)
            c.cmd("QUIT", 221)
        with RawClient(proc.port) as c:
            c.expect(220)
            c.cmd("EHLO client.test", 250)
            c.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 235)
            delivered = send(c, ["alice@sink.test", "bob@sink.test"], message("delivered"))
            bounced = send(c, ["gone@sink.test"], message("bounced"))
            deferred = send(c, ["dave@later.test"], message("deferred"))
            c.cmd("QUIT", 221)

        def settled() -> bool:
            states, done = read_journal(proc.spool)
            return (done.get(delivered) == "delivered" and done.get(bounced) == "bounced"
                    and states.get(deferred, {}).get("attempts") == 1)

        wait_until(settled, 15, interval=0.05, what="delivered, bounced and deferred outcomes")
        assert proc.stop() == 0
    finally:
        proc.close()
        sink.stop()

    text = proc.log_text()
    for secret in (BODY_MARKER, PASSWORD, WRONG_PASSWORD, plain(USER, PASSWORD), plain(USER, WRONG_PASSWORD)):
        assert secret not in text, f"{secret!r} appears in the log"
    log = entries(proc)

    # SPEC §8: one line per accepted message, its fields as JSON keys.
    for msg_id, rcpts in ((delivered, 2), (bounced, 1), (deferred, 1)):
        [accept] = [e for e in log if e["msg"] == "accepted" and e.get("msg_id") == msg_id]
        assert ACCEPT_FIELDS <= set(accept), accept
        assert (accept["client"], accept["sender"], accept["rcpts"]) == ("127.0.0.1", SENDER, rcpts), accept
        assert isinstance(accept["size"], int) and accept["size"] > len(message("x")), accept

    # ... and one per delivery attempt (per recipient: each has its own outcome and reply).
    attempts = [e for e in log if e["msg"] == "attempt"]
    for entry in attempts:
        assert ATTEMPT_FIELDS <= set(entry), entry
        assert isinstance(entry["latency"], (int, float)) and 0 <= entry["latency"] < 15, entry

    def attempts_of(msg_id: str) -> list[dict[str, Any]]:
        return [e for e in attempts if e["msg_id"] == msg_id]

    ok = attempts_of(delivered)
    assert sorted(e["rcpt"] for e in ok) == ["alice@sink.test", "bob@sink.test"]
    assert all(e["outcome"] == "delivered" and e["domain"] == "sink.test" for e in ok), ok
    assert all(f":{sink.port}" in e["host"] and e["reply"].startswith("250") for e in ok), ok
    [refused] = attempts_of(bounced)
    assert (refused["outcome"], refused["domain"]) == ("bounced", "sink.test"), refused
    assert refused["reply"].startswith("550") and "no such user" in refused["reply"], refused
    [later] = attempts_of(deferred)
    assert (later["outcome"], later["domain"], later["host"]) == ("deferred", "later.test", None), later
    assert later["reply"], later

    # the message-level outcome lines are structured too
    assert any(e["msg"] == "delivered" and e.get("msg_id") == delivered and e.get("rcpts") == 2 for e in log)
    assert any(e["msg"] == "bounced" and e.get("msg_id") == bounced for e in log)
    assert any(e["msg"] == "auth failed" and e.get("client") == "127.0.0.1" for e in log)


@pytest.mark.timeout(30)
def test_hedwig_log_level_error_suppresses_info_lines(tmp_path: Path) -> None:
    # [log] level = "debug", but the environment wins (SPEC §1).
    proc = start(tmp_path, {"log": {"format": "json", "level": "debug"}}, env={"HEDWIG_LOG_LEVEL": "error"})
    try:
        with RawClient(proc.port) as c:
            c.expect(220)
            c.cmd("EHLO client.test", 250)
            msg_id = send(c, ["erin@any.test"], message("quiet"))
            c.cmd("QUIT", 221)
        # the base config routes "*" to a closed port: one deferred attempt, which logs at info
        wait_until(lambda: read_journal(proc.spool)[0].get(msg_id, {}).get("attempts") == 1, 10,
                   interval=0.05, what="the attempt to be journalled")
        assert proc.stop() == 0
    finally:
        proc.close()
    levels = [e["level"] for e in entries(proc)]
    assert set(levels) <= {"error"}, proc.log_text()
