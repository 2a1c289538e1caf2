"""`hedwig queue list | show | stats | retry | delete` against a real server and a real upstream.

SPEC §1 and §10: the tools read the spool of the config they are given, work
while the server runs (and when it does not), print the ids of the server's
`250` replies, `list --json` gives an array of entries with at least id, state,
attempts, recipients, next_attempt and last_error, `stats --json` an object
with a count per state. Retry makes a deferred message due now; after `delete`
returns the message is never delivered. User errors are one line, exit 2.

Every tool run is `python hedwig.py queue ... --config F` in a fresh process,
bounded by a timeout. Deferred mail waits an hour (retry_initial_delay), so a
delivery within seconds can only come from a retry.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.integration.test_delivery import delivery_config, message, send, sinks  # noqa: F401 - fixture
from tests.support.proc import HOST, REPO_ROOT, HedwigProcess, read_journal, wait_until
from tests.support.sink import closed_port

pytestmark = pytest.mark.timeout(60)

TOOL_TIMEOUT = 20
ENTRY_KEYS = {"id", "state", "attempts", "recipients", "next_attempt", "last_error"}
STATES = {"queued", "deferred", "bounced", "quarantined"}
SECRET = "never-print-this-body-line"


def queue(proc: HedwigProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`hedwig queue ARGS --config <proc's config>`, whether or not the server runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
    return subprocess.run([sys.executable, "hedwig.py", "queue", *args, "--config", str(proc.config_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert result.stderr == "", result.stderr
    return result.stdout


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, one line on stderr, nothing on stdout, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return lines[0]


def listing(proc: HedwigProcess, *args: str) -> list[dict[str, Any]]:
    entries = json.loads(ok(queue(proc, "list", "--json", *args)))
    assert isinstance(entries, list)
    for e in entries:
        assert ENTRY_KEYS <= set(e), e
        assert e["state"] in STATES
        assert isinstance(e["id"], str) and len(e["id"]) == 26
        assert e["attempts"] is None or isinstance(e["attempts"], int)
        assert isinstance(e["recipients"], list) and all(isinstance(r, str) for r in e["recipients"])
        assert e["next_attempt"] is None or time.strptime(e["next_attempt"], "%Y-%m-%dT%H:%M:%SZ")
        assert isinstance(e["last_error"], str)
    return entries


def stats(proc: HedwigProcess) -> dict[str, int]:
    counts = json.loads(ok(queue(proc, "stats", "--json")))
    assert {"queued", "deferred", "bounced"} <= set(counts)
    assert all(isinstance(v, int) for v in counts.values())
    return counts


def by_id(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in entries}


def delivered_to(sink, rcpt: str) -> int:
    return sum(rcpt in m.rcpt_tos for m in list(sink.messages))


def deferred(proc: HedwigProcess, *ids: str, timeout: float = 10.0) -> None:
    """Wait until each message's first failed attempt is journalled."""
    wait_until(lambda: all(read_journal(proc.spool)[0].get(i, {}).get("attempts", 0) >= 1 for i in ids),
               timeout, what=f"{ids} to be deferred")


def down_config(down: int, **server: Any) -> dict[str, Any]:
    """Everything to `down.test` goes to a port nothing listens on yet; retries wait an hour."""
    return delivery_config(routes={"down.test": f"{HOST}:{down}"}, retry_initial_delay="1h",
                           retry_max_delay="1h", max_retries=100, **server)


# -- reading ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_empty_spool_with_and_without_a_server(hedwig, tmp_path) -> None:
    never = HedwigProcess(tmp_path / "never")  # configured, never started: no spool at all
    assert listing(never) == []
    assert stats(never) == {"queued": 0, "deferred": 0, "bounced": 0, "quarantined": 0}
    assert "empty" in ok(queue(never, "list"))
    assert not never.spool.exists(), "a read-only tool created the spool"

    proc = hedwig()
    for running in (True, False):
        assert listing(proc) == [] and listing(proc, "--state", "deferred") == []
        assert set(stats(proc).values()) == {0}
        text = ok(queue(proc, "stats"))
        assert all(line.split()[-1] == "0" for line in text.splitlines()), text
        if running:
            proc.stop()


@pytest.mark.timeout(90)
def test_list_show_stats_with_queued_deferred_and_bounced_mail(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply={"nobody@bad.test": "550 5.1.1 no such user"})
    down = closed_port()
    proc = hedwig(delivery_config(
        routes={"slow.test": f"{HOST}:{sink.port}", "bad.test": f"{HOST}:{sink.port}",
                "down.test": f"{HOST}:{down}"},
        retry_initial_delay="1h", retry_max_delay="1h",
        # one message a minute to slow.test: the second one waits for a token, never attempted
        rate_limits={"enabled": True, "domain_limits": {"slow.test": 1}},
    ))
    body = f"{SECRET}\r\n".encode()
    first = send(proc.port, ["a@slow.test"], message("first", body))
    sink.wait(lambda: delivered_to(sink, "a@slow.test") == 1, what="the first slow.test message")
    waiting = send(proc.port, ["b@slow.test", "c@slow.test"], message("waiting", body))
    later = send(proc.port, ["d@down.test"], message("later", body))
    lost = send(proc.port, ["nobody@bad.test"], message("lost", body))
    deferred(proc, later)
    wait_until(lambda: read_journal(proc.spool)[1].get(lost) == "bounced", 10, what="the bounce")

    for running in (True, False):
        entries = by_id(listing(proc))
        assert set(entries) == {waiting, later, lost}, entries  # delivered mail is gone
        assert entries[waiting]["state"] == "queued" and entries[waiting]["attempts"] == 0
        assert entries[waiting]["recipients"] == ["b@slow.test", "c@slow.test"]
        assert entries[later]["state"] == "deferred" and entries[later]["attempts"] == 1
        assert entries[later]["recipients"] == ["d@down.test"]
        assert "refused" in entries[later]["last_error"].lower(), entries[later]
        next_at = time.mktime(time.strptime(entries[later]["next_attempt"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert next_at > time.time() + 2400  # an hour away, ±20 %
        assert entries[lost]["state"] == "bounced" and entries[lost]["recipients"] == ["nobody@bad.test"]
        assert "5.1.1 no such user" in entries[lost]["last_error"]
        assert [e["id"] for e in listing(proc, "--state", "deferred")] == [later]
        assert [e["id"] for e in listing(proc, "--state", "bounced")] == [lost]
        assert stats(proc) == {"queued": 1, "deferred": 1, "bounced": 1, "quarantined": 0}

        table = ok(queue(proc, "list")).splitlines()
        assert table[0].split()[:2] == ["ID", "STATE"]
        rows = {line.split()[0]: line.split()[1] for line in table[1:]}
        assert rows == {waiting: "queued", later: "deferred", lost: "bounced"}
        assert first not in "\n".join(table)
        counts = dict(line.split() for line in ok(queue(proc, "stats")).splitlines())
        assert (counts["queued"], counts["deferred"], counts["bounced"]) == ("1", "1", "1")

        shown = ok(queue(proc, "show", later))
        for needle in (later, "deferred", "<sender@client.test>", "d@down.test", "attempts:     1",
                       "Subject: later", "Message-ID: <later@client.test>", "size:"):
            assert needle in shown, (needle, shown)
        shown_bounce = ok(queue(proc, "show", lost.lower()))  # ids are case-insensitive
        assert "bounced" in shown_bounce and "Subject: lost" in shown_bounce and "5.1.1" in shown_bounce
        assert "Subject: waiting" in ok(queue(proc, "show", waiting))
        for text in (shown, shown_bounce, ok(queue(proc, "show", waiting)), "\n".join(table)):
            assert SECRET not in text, "a queue tool printed a message body"
        if running:
            assert proc.stop() == 0


# -- retry ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retry_one_message_then_all_while_the_server_runs(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(down_config(down))
    one, two, three = (send(proc.port, [f"{n}@down.test"], message(n)) for n in ("one", "two", "three"))
    deferred(proc, one, two, three)
    sink = sinks(port=down)  # the upstream is back; the next attempts are an hour away

    assert ok(queue(proc, "retry", one)).strip() == f"{one}: due now"
    sink.wait(lambda: delivered_to(sink, "one@down.test") == 1, timeout=5, what="the retried message")
    wait_until(lambda: read_journal(proc.spool)[1].get(one) == "delivered", 5, what="its done line")
    time.sleep(1.0)  # the others stay where they were
    assert [m.rcpt_tos for m in sink.messages] == [["one@down.test"]]
    assert {e["id"]: e["state"] for e in listing(proc)} == {two: "deferred", three: "deferred"}

    assert ok(queue(proc, "retry", "--all")).strip() == "2 messages made due now"
    sink.wait(lambda: len(sink.messages) == 3, timeout=5, what="the rest")
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == ["one@down.test", "three@down.test", "two@down.test"]
    wait_until(lambda: listing(proc) == [], 5, what="an empty queue")


@pytest.mark.timeout(90)
def test_retry_with_no_server_running(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(down_config(down))
    one, two = (send(proc.port, [f"{n}@down.test"], message(n)) for n in ("one", "two"))
    deferred(proc, one, two)
    assert proc.stop() == 0

    assert ok(queue(proc, "retry", one)).strip() == f"{one}: due now"
    assert ok(queue(proc, "retry", one)).strip() == f"{one}: already due"
    entries = by_id(listing(proc))
    assert entries[one]["attempts"] == 1  # a retry is not an attempt
    sink = sinks(port=down)
    proc.start().wait_ready()
    sink.wait(lambda: delivered_to(sink, "one@down.test") == 1, timeout=5, what="the retried message")
    time.sleep(1.0)
    assert delivered_to(sink, "two@down.test") == 0
    assert proc.stop() == 0

    assert ok(queue(proc, "retry", "--all")).strip() == "1 message made due now"
    proc.start().wait_ready()
    sink.wait(lambda: delivered_to(sink, "two@down.test") == 1, timeout=5, what="the rest")
    assert len(sink.messages) == 2


# -- delete ---------------------------------------------------------------------------------


def never_delivered(sink, rcpt: str, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert delivered_to(sink, rcpt) == 0, f"{rcpt} was delivered after delete returned"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_delete_while_the_server_runs_is_final(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(down_config(down))
    gone, kept = (send(proc.port, [f"{n}@down.test"], message(n)) for n in ("gone", "kept"))
    deferred(proc, gone, kept)

    assert ok(queue(proc, "delete", gone)).strip() == f"{gone}: deleted"
    assert read_journal(proc.spool)[1].get(gone) == "deleted"  # durable before the tool returned
    assert [e["id"] for e in listing(proc)] == [kept]
    sink = sinks(port=down)
    ok(queue(proc, "retry", "--all"))
    sink.wait(lambda: delivered_to(sink, "kept@down.test") == 1, timeout=5, what="the kept message")
    never_delivered(sink, "gone@down.test")

    assert "deleted already" in user_error(queue(proc, "delete", gone))
    assert "deleted already" in user_error(queue(proc, "show", gone))
    proc.restart()  # and not after a restart either
    never_delivered(sink, "gone@down.test", 1.0)


@pytest.mark.timeout(60)
def test_delete_waits_for_the_attempt_in_flight(hedwig, sinks) -> None:
    attempt = threading.Event()
    replies = {"slow": True}

    def rcpt_reply(address: str) -> str:
        if address.startswith("busy@") and replies["slow"]:
            attempt.set()
            time.sleep(1.5)  # the attempt is in flight meanwhile
            return "451 4.3.0 not now"
        return "250 OK"

    sink = sinks(rcpt_reply=rcpt_reply)
    proc = hedwig(delivery_config(routes={"up.test": f"{HOST}:{sink.port}"}, retry_initial_delay="1h",
                                  retry_max_delay="1h"))
    busy = send(proc.port, ["busy@up.test"], message("busy"))
    assert attempt.wait(5), "no delivery attempt"
    started = time.monotonic()
    assert ok(queue(proc, "delete", busy)).strip() == f"{busy}: deleted"
    assert time.monotonic() - started < 9
    replies["slow"] = False
    ok(queue(proc, "retry", "--all"))
    other = send(proc.port, ["other@up.test"], message("other"))
    sink.wait(lambda: delivered_to(sink, "other@up.test") == 1, what="mail after the delete")
    never_delivered(sink, "busy@up.test")
    states, done = read_journal(proc.spool)
    assert done[busy] == "deleted"
    assert states[busy]["attempts"] == 1, "deleted before the attempt in flight had ended"
    assert done.get(other) == "delivered" or read_journal(proc.spool)[1][other] == "delivered"


@pytest.mark.timeout(60)
def test_delete_with_no_server_running(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(down_config(down))
    gone, kept = (send(proc.port, [f"{n}@down.test"], message(n)) for n in ("gone", "kept"))
    deferred(proc, gone, kept)
    assert proc.stop() == 0

    assert ok(queue(proc, "delete", gone)).strip() == f"{gone}: deleted"
    assert [e["id"] for e in listing(proc)] == [kept]
    sink = sinks(port=down)
    proc.start().wait_ready()
    assert "1 queued" in proc.last_log()
    ok(queue(proc, "retry", "--all"))
    sink.wait(lambda: delivered_to(sink, "kept@down.test") == 1, timeout=5, what="the kept message")
    never_delivered(sink, "gone@down.test")


@pytest.mark.timeout(60)
def test_unknown_and_malformed_ids_are_user_errors(hedwig) -> None:
    proc = hedwig()
    unknown = "06H1BJPYP2A24XD7D4T7J77E0R"
    for running in (True, False):
        for command in ("delete", "retry", "show"):
            line = user_error(queue(proc, command, unknown))
            assert unknown in line and "not in the queue" in line, line
            line = user_error(queue(proc, command, "not-an-id"))
            assert "not-an-id" in line and "not a message id" in line, line
        assert "--state" in user_error(queue(proc, "list", "--state", "lost"))
        if running:
            proc.stop()
    assert user_error(queue(proc, "retry")).startswith("hedwig: ")  # neither ID nor --all


@pytest.mark.timeout(60)
def test_a_second_server_on_the_same_spool_is_refused(hedwig) -> None:
    first = hedwig()
    second = hedwig({"storage": {"base_path": str(first.spool)}}, ready=False)
    assert second.wait(15) == 1
    assert "in use by another process" in second.log_text()
    assert first.running


# -- under load ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_queue_tools_running_next_to_a_loaded_server_do_not_disturb_it(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"*": f"{HOST}:{sink.port}"}))
    senders, per_sender = 4, 40
    accepted: list[str] = []
    errors: list[BaseException] = []
    tool_runs: list[str] = []
    done = threading.Event()

    def load(n: int) -> None:
        try:
            for i in range(per_sender):
                accepted.append(send(proc.port, [f"r{n}-{i}@load.test"], message(f"load-{n}-{i}")))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def tools() -> None:
        rng = random.Random(3)
        try:
            while not done.is_set():
                entries = listing(proc)
                tool_runs.append("list")
                stats(proc)
                tool_runs.append("stats")
                if entries:
                    pick = rng.choice(entries)["id"]
                    result = queue(proc, "show", pick)  # it may be delivered meanwhile
                    assert result.returncode in (0, 2), result.stderr
                    tool_runs.append("show")
                ok(queue(proc, "retry", "--all"))
                tool_runs.append("retry")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(senders)]
    watcher = threading.Thread(target=tools)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sink.wait(lambda: len(sink.messages) >= senders * per_sender, timeout=30, what="every message")
    done.set()
    watcher.join(30)
    assert not errors, errors
    assert len(accepted) == senders * per_sender
    assert {"list", "stats", "retry"} <= set(tool_runs)
    subjects = [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in sink.messages]
    assert len(subjects) == len(set(subjects)) == senders * per_sender  # each exactly once
    wait_until(lambda: listing(proc) == [], 10, what="an empty queue")
    log = proc.log_text()
    assert "Traceback" not in log and " error " not in log, log[-3000:]
    assert proc.stop() == 0
