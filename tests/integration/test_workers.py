"""The pre-fork master with `workers = 2` (SPEC §9, §10; issue 6).

The real entry point runs as a master and two workers; the tests signal the
master (and single workers) the way an operator or a crash would, then check
from outside: the SMTP port, the upstream sink, the spool files, the queue
tool, the log. Messages carry a unique Message-ID tag, so "delivered" means
the sink holds that tag; "acknowledged" means the client read a 250.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import time
from typing import Any

import pytest

from tests.integration.test_delivery import delivery_config, message, send, sinks  # noqa: F401 - fixture
from tests.integration.test_queue_tools import listing, ok, queue
from tests.support.load import Load
from tests.support.proc import HOST, HedwigProcess, RawClient, free_port, read_spool, to_toml, wait_until

pytestmark = pytest.mark.timeout(90)

DOMAIN = "sink.test"


def two_workers(sink_port: int, **server: Any) -> dict[str, Any]:
    return delivery_config(routes={DOMAIN: f"{HOST}:{sink_port}"}, workers=2, **server)


def tags_at(sink) -> set[str]:  # type: ignore[no-untyped-def]
    found = set()
    for m in sink.messages:
        hit = re.search(rb"^Subject: (\S+)\r$", m.data, re.M)
        if hit:
            found.add(hit.group(1).decode())
    return found


def accepted_by(proc: HedwigProcess, msg_id: str) -> int:
    """The pid of the worker that logged the acceptance of `msg_id`."""
    for line in proc.log_text().splitlines():
        if f"msg_id={msg_id} accepted" in line:
            return int(re.search(r" pid=(\d+) ", line).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no accept line for {msg_id}")


def test_both_workers_accept_connections(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port))
    first, second = proc.wait_workers(2)
    got = {}
    for stopped, serving in ((first, second), (second, first)):
        os.kill(stopped, signal.SIGSTOP)  # only the other one can take the connection
        try:
            msg_id = send(proc.port, [f"a@{DOMAIN}"], message(f"via-{serving}"))
        finally:
            os.kill(stopped, signal.SIGCONT)
        got[serving] = accepted_by(proc, msg_id)
    assert got == {first: first, second: second}
    sink.wait(lambda: len(sink.messages) == 2, 10, "both delivered")


def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port))
    workers = proc.wait_workers(2)
    load = Load(proc.port, total=300).start()
    wait_until(lambda: load.count() >= 80, 30, what="80 messages acknowledged")
    os.kill(workers[0], signal.SIGKILL)
    replacement = proc.wait_workers(2, exclude=(workers[0],))
    assert workers[1] in replacement
    load.join()
    assert load.count() >= 250, f"mail stopped flowing: {load.count()} acknowledged, {load.failures} failed"
    # Every acknowledged message arrives: the dead worker's too, through the worker that adopted them.
    sink.wait(lambda: set(load.acked) <= tags_at(sink), 30, "every acknowledged message delivered")
    assert re.search(rf"worker pid={workers[0]} died \(SIGKILL\)", proc.log_text())
    assert proc.running


def test_a_worker_without_heartbeat_is_killed_and_replaced(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port, worker_timeout="2s"))
    stuck, other = proc.wait_workers(2)
    os.kill(stuck, signal.SIGSTOP)  # alive, but its hub never runs: no heartbeat
    started = time.monotonic()
    replacement = proc.wait_workers(2, timeout=15, exclude=(stuck,))
    assert other in replacement and time.monotonic() - started >= 1.5
    assert f"worker pid={stuck} sent no heartbeat" in proc.log_text()
    msg_id = send(proc.port, [f"a@{DOMAIN}"], message("after-stuck"))
    sink.wait(lambda: "after-stuck" in tags_at(sink), 10, "delivered after the replacement")
    assert msg_id


def test_sighup_adds_a_listener_without_dropping_an_open_session(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port))
    old = proc.wait_workers(2)
    client = RawClient(proc.port)
    client.expect(220)
    client.cmd("EHLO client.test", 250)
    client.cmd("MAIL FROM:<sender@client.test>", 250)

    new_port = free_port()
    config = dict(proc.config)
    config["server"] = {**config["server"],
                        "listeners": [*config["server"]["listeners"], {"addr": f"{HOST}:{new_port}"}]}
    proc.config_path.write_text(to_toml(config))
    proc.signal(signal.SIGHUP)
    wait_until(lambda: len(set(proc.worker_pids()) - set(old)) == 2, 15, what="a new generation of 2 workers")

    def greets(port: int) -> bool:
        try:
            with smtplib.SMTP(HOST, port, timeout=5) as s:
                return s.noop()[0] == 250
        except OSError:
            return False

    wait_until(lambda: greets(new_port), 10, what="the new listener answers")
    # The session opened before the reload goes on where it was, on its old worker.
    client.cmd(f"RCPT TO:<kept@{DOMAIN}>", 250)
    client.cmd("DATA", 354)
    client.send(message("kept-session") + b".\r\n")
    assert client.expect(250).text.startswith("2.0.0")
    client.cmd("QUIT", 221)
    client.close()
    send(new_port, [f"b@{DOMAIN}"], message("new-listener"))
    send(proc.port, [f"c@{DOMAIN}"], message("old-listener"))
    sink.wait(lambda: {"kept-session", "new-listener", "old-listener"} <= tags_at(sink), 15, "all three delivered")
    # Once its session ended, the old generation exits; two workers remain.
    wait_until(lambda: not set(proc.worker_pids()) & set(old), 15, what="the old workers gone")
    assert len(proc.worker_pids()) == 2


def test_sighup_with_a_broken_config_keeps_the_running_one(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port))
    workers = sorted(proc.wait_workers(2))
    good = proc.config_path.read_text()
    proc.config_path.write_text(good + "\n[server.bogus]\nx = 1\n")
    proc.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in proc.log_text(), 10, what="the refusal logged")
    assert "server.bogus" in proc.log_text()
    assert sorted(proc.worker_pids()) == workers
    send(proc.port, [f"a@{DOMAIN}"], message("still-serving"))
    sink.wait(lambda: "still-serving" in tags_at(sink), 10, "delivered")


def test_sigterm_during_a_500_message_load(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(two_workers(sink.port))
    proc.wait_workers(2)
    load = Load(proc.port, total=500, threads=12).start()
    wait_until(lambda: load.count() >= 150, 40, what="150 messages acknowledged")
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    load.stop.set()
    load.join()
    # The ports are free, and every acknowledged message is delivered or still in the spool.
    with pytest.raises(OSError):
        RawClient(proc.port, timeout=2)
    queued_tags = {re.search(rb"^Subject: (\S+)\r$", body, re.M).group(1).decode()  # type: ignore[union-attr]
                   for _env, body in (read_spool(proc.spool).one(i) for i in read_spool(proc.spool).ids)}
    delivered = tags_at(sink)
    missing = set(load.acked) - delivered - queued_tags
    assert not missing, f"{len(missing)} acknowledged messages neither delivered nor queued"
    # And what was still queued goes out after a restart.
    proc.start().wait_ready()
    sink.wait(lambda: set(load.acked) <= tags_at(sink), 30, "the rest delivered after restart")


def test_workers_dying_at_boot_make_the_master_give_up(tmp_path) -> None:
    proc = HedwigProcess(tmp_path / "hedwig", delivery_config(workers=2))
    proc.spool.mkdir(parents=True)
    (proc.spool / "log").write_text("not a directory")  # every worker fails to open the spool
    try:
        proc.start()
        assert proc.wait(30) == 1
        text = proc.last_log()
        assert "workers keep dying before they are ready" in text, text
        assert text.count("cannot open spool") >= 5
        assert proc.worker_pids() == []
    finally:
        proc.close()


def test_queue_tools_against_two_workers(hedwig, sinks) -> None:
    from tests.support.sink import closed_port

    sink = sinks()
    proc = hedwig(delivery_config(routes={DOMAIN: f"{HOST}:{sink.port}", "later.test": f"{HOST}:{closed_port()}"},
                                  workers=2, retry_initial_delay="1h", retry_max_delay="2h"))
    first, second = proc.wait_workers(2)
    ids = {}
    for stopped, serving in ((first, second), (second, first)):  # one deferred message per worker, twice
        os.kill(stopped, signal.SIGSTOP)
        try:
            for n in range(2):
                ids[send(proc.port, ["x@later.test"], message(f"later-{serving}-{n}"))] = serving
        finally:
            os.kill(stopped, signal.SIGCONT)
    wait_until(lambda: all(e["state"] == "deferred" for e in listing(proc)) and len(listing(proc)) == 4,
               15, what="4 deferred messages")
    stats = json.loads(ok(queue(proc, "stats", "--json")))
    assert stats["deferred"] == 4
    one = next(i for i, pid in ids.items() if pid == first)
    assert "later.test" in ok(queue(proc, "show", one))
    # delete one message of each worker: each answer comes from the owner
    gone = [next(i for i, pid in ids.items() if pid == owner) for owner in (first, second)]
    for msg_id in gone:
        assert ok(queue(proc, "delete", msg_id)).strip() == f"{msg_id}: deleted"
    # retry --all reaches both workers: the two left are attempted again now
    assert ok(queue(proc, "retry", "--all")).strip() == "2 messages made due now"
    wait_until(lambda: all(e["attempts"] == 2 for e in listing(proc)), 15, what="second attempts")
    assert {e["id"] for e in listing(proc)} == set(ids) - set(gone)


def test_sighup_reads_the_certificates_again(hedwig, tmp_path) -> None:
    import shutil
    import ssl

    from tests.support.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(certs.cert, cert)
    shutil.copy(certs.key, key)
    proc = hedwig({"server": {"workers": 2, "listeners": [{"addr": f"{HOST}:{free_port()}",
                                                          "tls": {"cert_path": str(cert), "key_path": str(key),
                                                                  "mode": "starttls"}}]}}, ready=False)
    proc.port = int(proc.config["server"]["listeners"][0]["addr"].rsplit(":", 1)[1])
    proc.wait_ready()

    def served_cert() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP(HOST, proc.port, timeout=5) as s:
            s.starttls(context=context)
            return s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]

    def pem_der(path) -> bytes:  # type: ignore[no-untyped-def]
        return ssl.PEM_cert_to_DER_cert(path.read_text())

    assert served_cert() == pem_der(certs.cert)
    old = proc.wait_workers(2)
    shutil.copy(certs.bad_cert, cert)
    shutil.copy(certs.bad_key, key)
    proc.signal(signal.SIGHUP)
    wait_until(lambda: not set(proc.worker_pids()) & set(old) and len(proc.worker_pids()) == 2, 15,
               what="the new generation alone")
    assert served_cert() == pem_der(certs.bad_cert)
