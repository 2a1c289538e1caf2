"""server.bounce_notifications (SPEC §5) against a real Hedwig process and real sinks.

Mail is submitted over a loopback listener that allows AUTH PLAIN in
cleartext. The recipients' domain routes to a sink that refuses one mailbox
with 550; the sender's domain routes to a second sink, where a delivery
status notification would arrive. Only a sender that authenticated, and never
the null sender, gets one, and only when the key is on; the bounced/ copy is
kept in every case. Notifications are queued before the bounce is recorded, so
once the journal says "bounced" a notification is either in the spool or never
coming: the negative cases check the spool and the log, then give the sink a
short bounded wait anyway.
"""

from __future__ import annotations

import base64
import email
import email.policy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.conservation import metrics_conserved
from tests.support.proc import (
    outcome,
    HOST,
    HOSTNAME,
    HedwigProcess,
    RawClient,
    Replace,
    bounced_paths,
    dot_stuff,
    free_port,
    queued_id,
    read_journal,
    read_spool,
    to_toml,
    wait_until,
)
from tests.support.scrape import scrape_until
from tests.support.sink import Sink

USER, PASSWORD = "alice", "alice-dsn-secret"
SENDER = "alice@client.test"
BAD = "bad@far.test"
GOOD = "good@far.test"
BODY_MARK = "BODY-MUST-NOT-COME-BACK"
QUIET = 1.5  # seconds a sink is watched for a notification that must not come


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    """(far: the recipients' domain, refuses BAD; home: the senders' domain, refuses gone@)."""
    far = Sink(rcpt_reply={BAD: "550 5.1.1 no such user here"})
    home = Sink(rcpt_reply={"gone@client.test": "550 5.1.1 sender mailbox is gone"})
    try:
        yield far, home
    finally:
        far.stop()
        home.stop()


@pytest.fixture
def relay(tmp_path: Path, sinks: tuple[Sink, Sink]) -> Iterator[Callable[..., HedwigProcess]]:
    """relay(bounce_notifications=..., relay_networks=[...]) -> a started Hedwig with metrics."""
    far, home = sinks
    started: list[HedwigProcess] = []

    def start(**server: Any) -> HedwigProcess:
        proc = HedwigProcess(tmp_path / f"hedwig{len(started)}", {"server": {
            "auth": [{"username": USER, "password": PASSWORD}],
            "outbound_local": True,
            "retry_initial_delay": "1s",
            "retry_max_delay": "2s",
            "routes": Replace({"far.test": f"{HOST}:{far.port}", "client.test": f"{HOST}:{home.port}"}),
            "smtp": {"connect_timeout": "2s", "command_timeout": "3s"},
            "metrics": {"bind": f"{HOST}:{free_port()}"},
            **server,
        }})
        proc.config["server"]["listeners"][0]["allow_cleartext_auth"] = True
        proc.config_path.write_text(to_toml(proc.config))
        started.append(proc)
        proc.start()
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.close()


def submit(proc: HedwigProcess, sender: str, rcpts: list[str], *, login: bool, tag: str) -> str:
    data = (f"From: {sender or 'daemon@client.test'}\r\nTo: {', '.join(rcpts)}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@client.test>\r\n\r\n{BODY_MARK} {tag}\r\n").encode()
    with RawClient(proc.port) as c:
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        if login:
            c.cmd("AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(), 235)
        c.cmd(f"MAIL FROM:<{sender}>", 250)
        for rcpt in rcpts:
            c.cmd(f"RCPT TO:<{rcpt}>", 250)
        c.cmd("DATA", 354)
        c.send(dot_stuff(data) + b".\r\n")
        msg_id = queued_id(c.expect(250).text)
        c.cmd("QUIT", 221)
    return msg_id


def assert_bounced_kept(proc: HedwigProcess, msg_id: str, rcpt: str) -> None:
    eml, reason = bounced_paths(proc.spool, msg_id)
    assert eml.is_file() and reason.is_file(), list(proc.spool.glob("bounced/**/*"))
    assert f"<{rcpt}>" in reason.read_text()


def assert_no_dsn(proc: HedwigProcess, home: Sink, msg_id: str) -> None:
    """No notification queued for `msg_id` (it would be durable before its bounce), none arrives."""
    assert read_spool(proc.spool).ids == {msg_id}, "a notification was queued"
    assert "dsn queued" not in proc.log_text()
    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        assert home.messages == [], home.messages
        time.sleep(0.05)


@pytest.mark.timeout(40)
def test_an_authenticated_senders_bounce_gets_a_dsn(relay, sinks) -> None:
    far, home = sinks
    proc = relay(bounce_notifications=True)
    msg_id = submit(proc, SENDER, [GOOD, BAD], login=True, tag="dsn-auth")
    assert outcome(proc, msg_id) == "bounced"
    assert_bounced_kept(proc, msg_id, BAD)
    assert [m.rcpt_tos for m in far.messages] == [[GOOD]]
    envelope, _ = read_spool(proc.spool).one(msg_id)
    assert envelope["auth"] == USER  # recorded by the session that took the AUTH

    home.wait(lambda: len(home.messages) == 1, timeout=10, what="the notification")
    [got] = home.messages
    assert (got.mail_from, got.rcpt_tos) == ("<>", [SENDER])
    assert BODY_MARK.encode() not in got.data
    dsn = email.message_from_bytes(got.data, policy=email.policy.compat32)
    assert dsn["To"] == f"<{SENDER}>"
    assert dsn["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"  # helo_hostname
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, headers = dsn.get_payload()
    assert f"<{BAD}>: 550 5.1.1 no such user here" in human.get_payload()
    assert GOOD not in human.get_payload()  # delivered: not reported
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert [(b["Final-Recipient"], b["Action"], b["Status"], b["Remote-MTA"], b["Diagnostic-Code"])
            for b in per_rcpt] == [
        (f"rfc822; {BAD}", "failed", "5.1.1", f"dns; {HOST}", "smtp; 550 5.1.1 no such user here")]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: dsn-auth" in headers.get_payload()

    # The notification was ordinary queued mail: delivered, counted as received.
    dsn_ids = set(read_spool(proc.spool).ids) - {msg_id}
    assert len(dsn_ids) == 1
    dsn_id = dsn_ids.pop()
    assert outcome(proc, dsn_id) == "delivered"
    assert read_spool(proc.spool).one(dsn_id)[0]["sender"] == ""
    metrics_port = int(proc.config["server"]["metrics"]["bind"].rsplit(":", 1)[1])
    m = scrape_until(metrics_port, lambda s: s.value("hedwig_emails_sent_total") == 1
                     and s.value("hedwig_queue_depth") == 0, 10, "the notification counted sent")
    assert m.value("hedwig_emails_received_total") == 2 and m.value("hedwig_emails_bounced_total") == 1
    metrics_conserved(m)
    assert PASSWORD not in proc.log_text()


@pytest.mark.timeout(40)
def test_a_dsn_that_bounces_causes_no_other(relay, sinks) -> None:
    _far, home = sinks
    proc = relay(bounce_notifications=True)
    msg_id = submit(proc, "gone@client.test", [BAD], login=True, tag="dsn-loop")
    assert outcome(proc, msg_id) == "bounced"
    wait_until(lambda: len(read_journal(proc.spool)[1]) == 2, 10, what="the notification to finish")
    done = read_journal(proc.spool)[1]
    [dsn_id] = set(done) - {msg_id}
    assert done[dsn_id] == "bounced"  # the sender's mailbox refused it with 550
    assert_bounced_kept(proc, dsn_id, "gone@client.test")
    time.sleep(QUIET)  # a third message would be queued before the notification's bounce was recorded
    assert read_spool(proc.spool).ids == {msg_id, dsn_id}
    assert proc.log_text().count("dsn queued") == 1
    assert home.messages == []


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", ["unauthenticated", "null sender", "disabled"])
def test_no_dsn(relay, sinks, case: str) -> None:
    _far, home = sinks
    # Loopback may relay without AUTH here, so the unauthenticated sender is accepted.
    proc = relay(bounce_notifications=case != "disabled", relay_networks=["127.0.0.0/8"])
    sender = "" if case == "null sender" else SENDER
    msg_id = submit(proc, sender, [BAD], login=case != "unauthenticated", tag=case.replace(" ", "-"))
    assert outcome(proc, msg_id) == "bounced"
    assert_bounced_kept(proc, msg_id, BAD)
    assert_no_dsn(proc, home, msg_id)
