"""SPEC §8 metrics, §9 health and systemd notify, from a real pre-forked Hedwig (hedwig/master.py).

The master serves `/metrics` (every worker's multiprocess files summed),
`/healthz`, `/readyz` and tells NOTIFY_SOCKET READY / RELOADING / STOPPING.
Mail goes in through raw sockets over several connections (so both workers
accept some: the accept log lines carry the worker's pid=) and out to an
aiosmtpd sink scripted per domain: ok.test is delivered, later.test gets
`451` at RCPT (deferred; the retry is an hour away, so it stays queued) and
gone.test gets `550` (bounced). Each scrape is parsed with prometheus_client's
parser (tests/support/scrape.py) and polled until it settles, then compared
with what was sent, exactly. What each metric counts is hedwig/metrics.py's
docstring: the unit is the message; a rate-limit wait is no attempt.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_delivery import delivery_config, message, send, sinks  # noqa: F401 - fixture
from tests.support.proc import HOST, HedwigProcess, RawClient, free_port, queued_id, read_spool, wait_until
from tests.support.scrape import Scrape, http_request, scrape, scrape_until

OK, LATER, GONE = "ok.test", "later.test", "gone.test"

SPEC_NAMES = (
    "hedwig_queue_depth", "hedwig_retry_attempts_total", "hedwig_connection_pool_entries",
    "hedwig_dkim_signing_latency_seconds", "hedwig_emails_received_total", "hedwig_emails_sent_total",
    "hedwig_emails_deferred_total", "hedwig_emails_bounced_total", "hedwig_emails_dropped_total",
    "hedwig_worker_jobs_processed_total", "hedwig_worker_job_duration_seconds",
    "hedwig_send_latency_seconds", "hedwig_send_attempts_total",
)
COUNTERS = ("received", "sent", "deferred", "bounced", "dropped", "retry", "jobs")
NAME = {"received": "hedwig_emails_received_total", "sent": "hedwig_emails_sent_total",
        "deferred": "hedwig_emails_deferred_total", "bounced": "hedwig_emails_bounced_total",
        "dropped": "hedwig_emails_dropped_total", "retry": "hedwig_retry_attempts_total",
        "jobs": "hedwig_worker_jobs_processed_total", "depth": "hedwig_queue_depth"}
ACCEPT_RE = re.compile(r" pid=(\d+) session_id=\S+ msg_id=(\w+) accepted ")
STOP_LIMIT = 15.0  # SPEC §10: several workers exit within 15 s once sessions end


def upstream(address: str) -> str:
    """The sink's RCPT reply: later.test 451, gone.test 550, anything else 250."""
    domain = address.rpartition("@")[2]
    return {LATER: "451 4.3.0 try again later", GONE: "550 5.1.1 no such user"}.get(domain, "250 OK")


def observed(sink_port: int, *, metrics_port: int | None = None, health_port: int | None = None,
             **server: Any) -> dict[str, Any]:
    """Two workers, every test domain routed to the sink, retries an hour away, the HTTP doors."""
    config = delivery_config(routes={d: f"{HOST}:{sink_port}" for d in (OK, LATER, GONE)},
                             workers=2, retry_initial_delay="1h", retry_max_delay="2h", **server)
    if metrics_port is not None:
        config["server"]["metrics"] = {"bind": f"{HOST}:{metrics_port}"}
    if health_port is not None:
        config["server"]["health"] = {"bind": f"{HOST}:{health_port}"}
    return config


def send_over_connections(proc: HedwigProcess, plan: list[tuple[str, ...]], per_connection: int) -> list[str]:
    """Each plan entry is one message to `x@<domain>` for its domains; a new connection every
    `per_connection` messages. Returns the queue ids, in plan order."""
    ids: list[str] = []
    for start in range(0, len(plan), per_connection):
        with RawClient(proc.port) as client:
            client.expect(220)
            client.cmd("EHLO client.test", 250)
            for i, domains in enumerate(plan[start:start + per_connection], start):
                rcpts = [f"r{i}@{d}" for d in domains]
                ids.append(send(proc.port, rcpts, message(f"m{i}"), client=client))
            client.cmd("QUIT", 221)
    return ids


def accepted_by(proc: HedwigProcess) -> dict[str, int]:
    """msg_id -> pid of the worker whose accept line names it (this start's log only)."""
    return {m[2]: int(m[1]) for m in ACCEPT_RE.finditer(proc.last_log())}


def listening(proc: HedwigProcess) -> int:
    """How many workers of this start have logged that they listen (before they report ready)."""
    return proc.last_log().count(f" listening on {HOST}:{proc.port}\n")


def counters(m: Scrape) -> dict[str, float]:
    return {key: m.value(NAME[key]) for key in (*COUNTERS, "depth")}


def attempts(m: Scrape) -> dict[tuple[str, str], float]:
    """{(domain, status): value} of hedwig_send_attempts_total."""
    return {(ls["domain"], ls["status"]): v for ls, v in m.matching("hedwig_send_attempts_total")}


def latency_counts(m: Scrape) -> dict[str, float]:
    return {ls["domain"]: v for ls, v in m.matching("hedwig_send_latency_seconds_count")}


def stays(port: int, predicate: Callable[[Scrape], bool], seconds: float, what: str) -> None:
    """`predicate` holds on every scrape for `seconds` (a gauge set every second must not drift)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = scrape(port)
        assert predicate(m), f"{what} no longer holds:\n{m.text}"
        time.sleep(0.1)


def expect(counts: dict[str, float], **want: float) -> Callable[[Scrape], bool]:
    """A scrape predicate: every counter (and the depth) as in `counts` updated with `want`."""
    wanted = {key: 0.0 for key in (*COUNTERS, "depth")} | counts | want
    return lambda m: counters(m) == wanted


# -- /metrics ----------------------------------------------------------------------------------------


@pytest.mark.timeout(45)
def test_metrics_sum_both_workers_and_queue_depth_is_read_back_after_a_restart(hedwig, sinks) -> None:
    """14 messages over 7 connections: 6 delivered, 4 deferred (451), 3 bounced (550) and one
    to ok.test and gone.test (bounced: one bounced recipient makes the message bounced, while
    ok.test's transaction succeeded). The scrape equals that exactly; after a restart on the
    same spool the counters are 0 again and the queue depth is the 4 deferred at once."""
    sink = sinks(rcpt_reply=upstream)
    metrics_port = free_port()
    proc = hedwig(observed(sink.port, metrics_port=metrics_port))
    workers = proc.wait_workers(2)
    plan = [(OK,), (LATER,), (GONE,), (OK,), (OK, GONE), (LATER,), (OK,),
            (GONE,), (OK,), (LATER,), (GONE,), (OK,), (LATER,), (OK,)]
    ids = send_over_connections(proc, plan, per_connection=2)
    extra = 0  # more single ok.test messages, one per connection, until both workers accepted one
    while len(set(accepted_by(proc).values())) < 2 and extra < 20:
        ids += send_over_connections(proc, [(OK,)], per_connection=1)
        extra += 1
    by = accepted_by(proc)
    assert set(by) == set(ids), (sorted(ids), by)
    assert set(by.values()) == set(workers), f"accepts by pid {Counter(by.values())}, workers {workers}"

    want = {"received": 14 + extra, "sent": 6 + extra, "deferred": 4, "bounced": 4, "jobs": 14 + extra,
            "depth": 4}
    m = scrape_until(metrics_port, expect(want), 15, what=f"counters {want}")
    for name in SPEC_NAMES:
        assert name in m.names, f"{name} missing from /metrics:\n{m.text}"
    assert m.types["hedwig_queue_depth"] == m.types["hedwig_connection_pool_entries"] == "gauge"
    assert attempts(m) == {(OK, "success"): 7 + extra, (LATER, "failure"): 4, (GONE, "failure"): 4}, m.text
    assert latency_counts(m) == {OK: 7 + extra, LATER: 4, GONE: 4}, m.text
    assert m.value("hedwig_worker_job_duration_seconds_count") == 14 + extra
    assert m.value("hedwig_dkim_signing_latency_seconds_count") == 0  # no [server.dkim]
    assert 0 <= m.value("hedwig_connection_pool_entries") <= 2 * 100  # pool_size per worker
    assert sum(len(msg.rcpt_tos) for msg in sink.messages) == 7 + extra

    assert proc.stop() == 0
    proc.start().wait_ready()
    proc.wait_workers(2)
    # The queue depth counts what the spool held at start, not only what came since.
    m = scrape_until(metrics_port, expect({}, depth=4), 3, what="the 4 deferred, counted after the restart")
    assert attempts(m) == {} and latency_counts(m) == {}, m.text
    stays(metrics_port, expect({}, depth=4), 2.5, "depth 4 and every counter 0 (two ticks of both workers)")


@pytest.mark.timeout(30)
def test_disable_outbound_counts_dropped_mail(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply=upstream)
    metrics_port = free_port()
    proc = hedwig(observed(sink.port, metrics_port=metrics_port, disable_outbound=True))
    send_over_connections(proc, [(OK,), (LATER,), (GONE,), (OK, GONE)], per_connection=1)
    m = scrape_until(metrics_port, expect({}, received=4, dropped=4, jobs=4), 10, what="4 dropped")
    assert attempts(m) == {} and latency_counts(m) == {}, m.text
    assert sink.connections == 0


@pytest.mark.timeout(45)
def test_a_killed_workers_gauge_leaves_the_sum_and_its_adopter_counts_its_queue(hedwig, sinks) -> None:
    """SIGKILL the worker that accepted most deferred messages: its counters stay in the sum
    (they happened), its queue depth leaves it, and the worker that adopts its writer counts
    those messages instead, so the depth is the deferred total again, and stays it."""
    sink = sinks(rcpt_reply=upstream)
    metrics_port = free_port()
    proc = hedwig(observed(sink.port, metrics_port=metrics_port))
    workers = proc.wait_workers(2)
    ids = send_over_connections(proc, [(OK,), (LATER,)] * 4, per_connection=1)
    done = {"received": 8, "sent": 4, "deferred": 4, "jobs": 8}
    scrape_until(metrics_port, expect(done, depth=4), 15, what="4 sent, 4 deferred and queued")
    by = accepted_by(proc)
    deferred_by = Counter(by[i] for i in ids[1::2])
    victim, held = deferred_by.most_common(1)[0]
    assert victim in workers and held > 0, (deferred_by, workers)

    log_mark = len(proc.last_log())
    os.kill(victim, signal.SIGKILL)
    proc.wait_workers(2, exclude=(victim,))
    m = scrape_until(metrics_port, expect(done, depth=4), 10,
                     what=f"depth 4 again once pid {victim}'s {held} queued messages were adopted")
    # Taken over by a live worker's next look, or by the replacement taking the free writer name.
    since = proc.last_log()[log_mark:]
    adopted = [int(n) for n in re.findall(r"adopted (\d+) queued messages|: (\d+) queued, ", since) for n in n if n]
    assert sum(adopted) == held, (adopted, held, since)
    stays(metrics_port, expect(done, depth=4), 2.5, "the sum after the kill")
    assert attempts(m) == {(OK, "success"): 4, (LATER, "failure"): 4}, m.text

    # The replacement and the adopter go on counting into the same sum.
    send_over_connections(proc, [(OK,), (LATER,)], per_connection=1)
    more = {"received": 10, "sent": 5, "deferred": 5, "jobs": 10}
    m = scrape_until(metrics_port, expect(more, depth=5), 10, what="2 more messages counted")
    assert attempts(m) == {(OK, "success"): 5, (LATER, "failure"): 5}, m.text


# -- /healthz and /readyz --------------------------------------------------------------------------


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    status, _headers, body = http_request(port, path, method)
    return status, body


@pytest.mark.timeout(45)
def test_health_and_readiness_through_start_and_a_graceful_stop(hedwig, sinks) -> None:
    """/readyz answers 200 only once the SMTP port greets; while a SIGTERM waits for a session
    in the middle of DATA, /healthz and /readyz say 503 stopping; the session's message is still
    accepted and the server exits 0."""
    sink = sinks(rcpt_reply=upstream)
    health_port = free_port()
    proc = hedwig(observed(sink.port, health_port=health_port), ready=False)
    before: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, f"/readyz never 200: {before}\n{proc.log_text()}"
        assert proc.running, proc.log_text()
        try:
            status, body = get(health_port, "/readyz")
        except OSError:  # the master has not bound yet
            time.sleep(0.005)
            continue
        if status == 200:
            ready_with = listening(proc)
            break
        before.append((status, body))
        time.sleep(0.005)  # poll interval: short, the workers start within ~20 ms of the bind
    # Ready means both workers listen, and a connection made now gets its 220.
    assert ready_with == 2, proc.log_text()
    with RawClient(proc.port, timeout=2) as client:
        client.expect(220)
        client.cmd("QUIT", 221)
    assert body == b"ready\n"
    assert all(b == (503, b"starting\n") for b in before), before

    assert get(health_port, "/healthz") == (200, b"ok\n")
    status, headers, body = http_request(health_port, "/healthz", "HEAD")
    assert (status, body) == (200, b""), (status, headers, body)
    status, headers, body = http_request(health_port, "/readyz", "HEAD")
    assert (status, body) == (200, b""), (status, headers, body)
    assert get(health_port, "/nothing-here")[0] == 404
    assert get(health_port, "/metrics")[0] == 404  # no [server.metrics]
    assert get(health_port, "/healthz", "POST")[0] == 405

    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        client.cmd("MAIL FROM:<sender@client.test>", 250)
        client.cmd(f"RCPT TO:<mid@{LATER}>", 250)
        client.cmd("DATA", 354)
        client.send(b"Subject: in flight\r\n\r\nthe first half\r\n")
        proc.signal(signal.SIGTERM)
        statuses: dict[str, tuple[int, bytes]] = {}

        def stopping() -> bool:
            statuses["/healthz"] = get(health_port, "/healthz")
            statuses["/readyz"] = get(health_port, "/readyz")
            return all(s == 503 for s, _ in statuses.values())

        wait_until(stopping, 5, interval=0.05, what="/healthz and /readyz to say 503")
        assert statuses == {"/healthz": (503, b"stopping\n"), "/readyz": (503, b"stopping\n")}
        assert proc.running  # the worker still waits for this session
        client.send(b"the second half\r\n.\r\n")
        msg_id = queued_id(client.expect(250).text)
    assert proc.wait(STOP_LIMIT) == 0
    envelope, body = read_spool(proc.spool).one(msg_id)  # nothing lost: queued for its retry
    assert envelope["recipients"] == [f"mid@{LATER}"] and body.endswith(b"the second half\r\n")


@pytest.mark.timeout(30)
def test_metrics_and_health_on_one_address_serve_all_three_paths(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply=upstream)
    port = free_port()
    proc = hedwig(observed(sink.port, metrics_port=port, health_port=port))
    proc.wait_workers(2)
    wait_until(lambda: get(port, "/readyz") == (200, b"ready\n"), 5, interval=0.05, what="/readyz 200")
    assert get(port, "/healthz") == (200, b"ok\n")
    m = scrape(port)
    assert set(SPEC_NAMES) - {"hedwig_send_attempts_total", "hedwig_send_latency_seconds"} <= m.names, m.text
    assert get(port, "/metrics?x=1")[0] == 200  # a query string is not part of the path
    assert get(port, "/favicon.ico")[0] == 404


# -- systemd notify ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket standing for systemd's NOTIFY_SOCKET (a short path: 108 bytes max)."""
    directory = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="hw-notify-"))
    path = str(directory / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)


def datagram(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        raise AssertionError(f"no notification within {timeout}s") from None


def nothing_more(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    found = []
    try:
        while True:
            found.append(sock.recv(4096).decode())
    except BlockingIOError:
        return found


@pytest.mark.timeout(45)
def test_systemd_hears_ready_reloading_ready_and_stopping(tmp_path: Path, sinks, notify_socket) -> None:
    sock, path = notify_socket
    sink = sinks(rcpt_reply=upstream)
    proc = HedwigProcess(tmp_path / "hedwig", observed(sink.port), env={"NOTIFY_SOCKET": path})
    try:
        proc.start()
        assert datagram(sock, 10) == "READY=1", proc.log_text()
        assert listening(proc) == 2, proc.log_text()  # READY means both workers listen and greet
        with RawClient(proc.port, timeout=2) as client:
            client.expect(220)
            client.cmd("QUIT", 221)
        assert nothing_more(sock) == []  # once, from the master only (workers are not told the socket)
        old = proc.wait_workers(2)

        before = time.monotonic_ns() // 1000
        proc.signal(signal.SIGHUP)
        reloading = datagram(sock, 10)
        after = time.monotonic_ns() // 1000
        m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
        assert m, reloading
        assert before <= int(m[1]) <= after, (before, m[1], after)  # CLOCK_MONOTONIC, shared by processes
        assert datagram(sock, 10) == "READY=1", proc.log_text()
        assert listening(proc) == 4, proc.log_text()  # and the new generation listens
        new = proc.wait_workers(2, exclude=tuple(old))
        assert not set(new) & set(old)
        with RawClient(proc.port, timeout=2) as client:
            client.expect(220)
            client.cmd("QUIT", 221)
        assert nothing_more(sock) == []

        proc.signal(signal.SIGTERM)
        assert datagram(sock, 5) == "STOPPING=1"
        assert proc.wait(STOP_LIMIT) == 0
        assert nothing_more(sock) == []
    finally:
        proc.close()
