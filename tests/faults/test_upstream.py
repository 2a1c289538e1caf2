"""Upstream faults under load: every acknowledged message ends up delivered once the fault is gone.

Each scenario relays a small load (tests/support/load.py: tagged messages
over several client connections) to a real aiosmtpd sink that misbehaves
(tests/support/sink.py), with second-scale outbound timeouts and retries
(1 s, at most 2 s apart). While the fault lasts every message meets it at
least once (its deferral is in the journal); then the fault is removed and
everything must be delivered, with nothing bounced: a temporary failure is
never a verdict. The end is checked at a quiet moment by the conservation
check (tests/support/conservation.py), from outside (sink + spool) and from
the server's counters.

Duplicates: a message the upstream took in full but never answered (the
final dot's reply timed out, or the connection closed before it) may have
been delivered; Hedwig cannot know and sends it again (at-least-once, the
transport logs "may be delivered twice"). The sink records such copies in
`unanswered`, so the duplicates must be exactly those copies -- never a
message that got its 250 -- and are reported under "fault injection".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.faults.test_kill import quiet
from tests.integration.test_delivery import delivery_config, sinks  # noqa: F401 - fixture
from tests.support.certs import make_certs
from tests.support.conservation import Report, conserved, metrics_conserved
from tests.support.load import Load, sink_tags, tag_of
from tests.support.proc import HOST, HedwigProcess, deep_merge, free_port, read_journal, wait_until
from tests.support.sink import Sink

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

DOMAIN = "upstream.test"
TOTAL = 120
THREADS = 4


# -- helpers shared by the fault modules ----------------------------------------------------------


def faulty_relay(routes: dict[str, str], metrics_port: int, *, smtp: dict[str, Any] | None = None,
                 **server: Any) -> dict[str, Any]:
    """A relay with quick timeouts and retries, enough attempts to outlast any fault, and /metrics."""
    config = delivery_config(routes=routes, max_retries=50, **server)
    config["server"]["metrics"] = {"bind": f"{HOST}:{metrics_port}"}
    return deep_merge(config, {"server": {"smtp": smtp or {}}})


def run_load(port: int, total: int, *, rcpts: Sequence[str], prefix: str, threads: int = THREADS) -> dict[str, str]:
    """Send `total` messages over `threads` connections; every one must be acknowledged."""
    load = Load(port, total, threads, rcpt=rcpts, per_connection=total, prefix=prefix).start()
    load.join()
    assert not load.refused and not load.unsure and load.failures == 0, (load.refused, load.failures)
    assert len(load.acked) == total
    return dict(load.acked)


def deferred_once(proc: HedwigProcess, acked: dict[str, str], timeout: float = 20.0) -> None:
    """Wait until every acknowledged message has a deferral journalled: each met the fault."""
    ids = set(acked.values())

    def all_deferred() -> bool:
        states, done = read_journal(proc.spool)
        assert not ids & set(done), f"left the queue during the fault: {sorted(ids & set(done))[:5]}"
        return ids <= {i for i, s in states.items() if s.get("attempts", 0) >= 1}

    try:
        wait_until(all_deferred, timeout, interval=0.1, what="every message deferred once")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.last_log()[-3000:]}") from None


def drain(proc: HedwigProcess, acked: dict[str, str], tags: Callable[[], Iterable[str]],
          timeout: float = 30.0) -> Report:
    """Wait until no acknowledged message is queued any more; nothing may be missing."""

    def drained() -> bool:
        report = conserved(acked, tags(), proc.spool)
        return not report.queued and not report.missing

    try:
        wait_until(drained, timeout, interval=0.1, what="every acknowledged message out of the queue")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {conserved(acked, tags(), proc.spool).summary()}\n"
                             f"{proc.last_log()[-3000:]}") from None
    report = conserved(acked, tags(), proc.spool)
    report.assert_nothing_lost()
    assert proc.running, proc.last_log()
    return report


def settle(proc: HedwigProcess, acked: dict[str, str], tags: Callable[[], Iterable[str]], metrics_port: int,
           timeout: float = 30.0) -> Report:
    """The quiet end of one server run: drained, counters still; both conservation forms hold."""
    drain(proc, acked, tags, timeout)
    metrics_conserved(quiet(metrics_port))
    return drain(proc, acked, tags, timeout)


def attempt_lines(proc: HedwigProcess, outcome: str) -> list[str]:
    return [ln for ln in proc.log_text().splitlines() if " attempt " in ln and f"outcome={outcome}" in ln]


def unanswered_tags(sink: Sink) -> Counter[str]:
    return Counter(tag_of(m.data) for m in list(sink.unanswered))


# -- the scenarios --------------------------------------------------------------------------------------


def fault_then_recovery(hedwig: Callable[..., HedwigProcess], sink: Sink, heal: Callable[[], None], *,
                        prefix: str, smtp: dict[str, Any] | None = None) -> tuple[HedwigProcess, Report]:
    """Load through a faulty sink until every message met the fault, heal it, settle."""
    metrics_port = free_port()
    proc = hedwig(faulty_relay({DOMAIN: f"{HOST}:{sink.port}"}, metrics_port, smtp=smtp))
    acked = run_load(proc.port, TOTAL, rcpts=(f"rcpt@{DOMAIN}",), prefix=prefix)
    deferred_once(proc, acked)
    heal()
    report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
    assert report.delivered == set(acked) and not report.bounced, report.summary()
    assert not attempt_lines(proc, "bounced")
    return proc, report


def test_reset_mid_data_is_retried_and_delivered_once(hedwig, sinks, fault_report) -> None:
    """Promise: an upstream that drops the connection in the middle of DATA (after 354 and the
    first bytes) costs a retry, never the message: under a 120-message load every message is
    deferred, and once the upstream behaves each is delivered exactly once (the upstream never
    had a whole copy, so there is nothing to duplicate) and nothing bounces."""
    started = time.monotonic()
    sink = sinks(drop_in_data=True)
    proc, report = fault_then_recovery(hedwig, sink, lambda: setattr(sink, "drop_in_data", False), prefix="reset")
    assert not report.duplicates and not sink.unanswered, report.summary()
    deferrals = attempt_lines(proc, "deferred")
    assert len(deferrals) >= TOTAL
    fault_report(f"{report.summary()} deferrals={len(deferrals)} in {time.monotonic() - started:.1f}s")


def test_hang_after_data_times_out_and_the_retry_may_duplicate(hedwig, sinks, fault_report) -> None:
    """Promise: an upstream that takes the whole message and never answers the final dot is cut
    off by the outbound command_timeout (1 s here), the message is deferred with "may be
    delivered twice", and retried once the upstream answers: every message delivered, nothing
    bounced. The upstream may thus hold a message twice: the duplicates are exactly the
    unanswered copies, never a message that got its 250."""
    started = time.monotonic()
    sink = sinks(hang_after_data=True)
    proc, report = fault_then_recovery(hedwig, sink, lambda: setattr(sink, "hang_after_data", False),
                                       prefix="hang", smtp={"command_timeout": "1s"})
    unanswered = unanswered_tags(sink)
    assert report.duplicates == dict(unanswered), report.summary()
    assert set(unanswered) == set(report.delivered)  # each was hung once at least
    timeouts = [ln for ln in attempt_lines(proc, "deferred") if "may be delivered twice" in ln]
    assert len(timeouts) == sum(unanswered.values()), timeouts[:3]
    fault_report(f"{report.summary()}; duplicates = unanswered copies = {sum(unanswered.values())} "
                 f"in {time.monotonic() - started:.1f}s")


def test_close_before_the_final_reply_is_retried_and_may_duplicate(hedwig, sinks, fault_report) -> None:
    """Promise: an upstream that accepts the whole message and closes the connection before its
    250 leaves Hedwig unable to know; the message is deferred ("may be delivered twice"), retried
    and delivered: nothing lost, nothing bounced, and the duplicates are exactly the copies the
    upstream took without answering."""
    started = time.monotonic()
    sink = sinks(close_before_reply=True)
    proc, report = fault_then_recovery(hedwig, sink, lambda: setattr(sink, "close_before_reply", False),
                                       prefix="close")
    unanswered = unanswered_tags(sink)
    assert report.duplicates == dict(unanswered), report.summary()
    assert set(unanswered) == set(report.delivered)
    assert any("may be delivered twice" in ln for ln in attempt_lines(proc, "deferred"))
    fault_report(f"{report.summary()}; duplicates = unanswered copies = {sum(unanswered.values())} "
                 f"in {time.monotonic() - started:.1f}s")


def test_421_greeting_defers_until_the_upstream_is_back(hedwig, sinks, fault_report) -> None:
    """Promise: an upstream greeting every connection with 421 (busy, closing) defers the whole
    load without a transaction; once it greets 220 everything is delivered exactly once and
    nothing bounced."""
    started = time.monotonic()
    sink = sinks(greeting="421 4.3.2 too busy, come back later")
    proc, report = fault_then_recovery(hedwig, sink, lambda: setattr(sink, "greeting", None), prefix="greet")
    assert not report.duplicates, report.summary()
    assert any("421" in ln and "too busy" in ln for ln in attempt_lines(proc, "deferred"))
    fault_report(f"{report.summary()} upstream connections={sink.connections} "
                 f"in {time.monotonic() - started:.1f}s")


def test_per_recipient_4xx_retries_only_the_deferred_recipients(hedwig, sinks, fault_report) -> None:
    """Promise: when the upstream answers some RCPTs 452 (mailbox full) or 451 (try later) and
    accepts the rest, the accepted recipients get the message at once and the deferred ones only
    on a retry: every recipient of every message ends up with exactly one copy (none delivered
    twice, none skipped), nothing bounces, and the message leaves the queue only when its last
    recipient is delivered."""
    started = time.monotonic()
    ok, full, later = (f"{name}@{DOMAIN}" for name in ("ok", "full", "later"))
    faulty = {full: "452 4.2.2 mailbox full", later: "451 4.3.0 try again later"}
    sink = sinks(rcpt_reply=lambda address: faulty.get(address, "250 OK"))
    metrics_port = free_port()
    proc = hedwig(faulty_relay({DOMAIN: f"{HOST}:{sink.port}"}, metrics_port))
    acked = run_load(proc.port, TOTAL, rcpts=(ok, full, later), prefix="rcpt")
    deferred_once(proc, acked)
    states = read_journal(proc.spool)[0]
    assert all(sorted(states[i]["pending"]) == sorted([full, later]) for i in acked.values())
    faulty.clear()

    def per_recipient() -> Counter[tuple[str | None, str]]:
        return Counter((tag_of(m.data), rcpt) for m in list(sink.messages) for rcpt in m.rcpt_tos)

    def copies() -> list[str]:
        """A tag once per copy of the message its most-served recipient got."""
        most: Counter[str] = Counter()
        for (tag, _rcpt), n in per_recipient().items():
            if tag is not None:
                most[tag] = max(most[tag], n)
        return list(most.elements())

    report = settle(proc, acked, copies, metrics_port)
    assert report.delivered == set(acked) and not report.bounced, report.summary()
    counts = per_recipient()
    assert set(counts) == {(tag, rcpt) for tag in acked for rcpt in (ok, full, later)}
    assert set(counts.values()) == {1}, {k: n for k, n in counts.items() if n > 1}
    first = [m for m in sink.messages if ok in m.rcpt_tos]
    assert all(m.rcpt_tos == [ok] for m in first), "a deferred recipient got the first copy"
    fault_report(f"{report.summary()} transactions={len(sink.messages)} recipients delivered once each="
                 f"{len(counts)} in {time.monotonic() - started:.1f}s")


def test_tls_required_never_sends_in_clear_and_delivers_once_tls_works(
        hedwig, sinks, fault_report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise: with `[server.smtp] tls = "required"`, an upstream whose certificate does not
    verify and one that offers no STARTTLS at all both defer the mail -- not one MAIL command is
    sent to either, nothing bounces -- and when they are replaced by upstreams with a verifying
    certificate on the same ports, every message is delivered over TLS, once."""
    started = time.monotonic()
    certs = make_certs(tmp_path / "certs")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_cert))  # the server trusts the test CA (and only it)
    bad, clear = sinks(tls=certs.bad), sinks()
    routes = {"badcert.test": f"{HOST}:{bad.port}", "cleartext.test": f"{HOST}:{clear.port}"}
    metrics_port = free_port()
    proc = hedwig(faulty_relay(routes, metrics_port, outbound_local=False, smtp={"tls": "required"}))
    loads = [Load(proc.port, TOTAL // 2, 2, rcpt=f"rcpt@{domain}", per_connection=TOTAL, prefix=domain)
             for domain in routes]
    for load in loads:
        load.start()
    for load in loads:
        load.join()
        assert not load.refused and load.failures == 0 and len(load.acked) == TOTAL // 2
    acked = {tag: msg_id for load in loads for tag, msg_id in load.acked.items()}
    deferred_once(proc, acked)
    assert bad.messages == [] and clear.messages == [], "mail went to an upstream that failed the TLS policy"
    assert bad.mail_options == [] and clear.mail_options == [], "a MAIL command went out without verified TLS"
    assert bad.connections > 0 and clear.connections > 0
    deferrals = attempt_lines(proc, "deferred")
    assert any("badcert.test" in ln and "certificate verify failed" in ln for ln in deferrals), deferrals[:2]
    assert any("cleartext.test" in ln and "STARTTLS not offered" in ln for ln in deferrals), deferrals[:2]

    good = []
    for old in (bad, clear):
        old.stop()
        good.append(sinks(port=old.port, tls=certs.good))
    report = settle(proc, acked, lambda: [t for s in good for t in sink_tags(s)], metrics_port)
    assert report.delivered == set(acked) and not report.bounced and not report.duplicates, report.summary()
    assert all(m.tls for s in good for m in s.messages), "delivered without TLS"
    fault_report(f"{report.summary()} refused upstream connections: bad certificate={bad.connections} "
                 f"no STARTTLS={clear.connections} in {time.monotonic() - started:.1f}s")
