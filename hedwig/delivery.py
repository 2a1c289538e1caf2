"""Delivery greenlets: claim -> sign -> route -> send -> record the outcome.

Each of `delivery_concurrency` greenlets takes a due message from the
scheduler, signs it once for this attempt when `[server.dkim]` is set (a
signing failure defers the message: it never goes out unsigned), groups its
pending recipients by domain, asks the resolver where each domain's mail
goes, hands one transaction per domain to the transport, and records what
happened per recipient:

- every recipient delivered or bounced: the message leaves the queue (bounced
  ones are first kept as readable files under bounced/);
- some deferred: attempts, due time, pending recipients and the last error
  are journalled (the body is never rewritten) and the message waits;
- deferred after `max_retries` attempts, or older than `deferred_retention`:
  bounced.

With `server.bounce_notifications`, a bounce of mail whose sender
authenticated (and is not `<>`) also queues an RFC 3464 notification to that
sender (dsn.py builds it), through the spool like accepted mail, before the
bounce is recorded as final.

A crash between sending and recording means the message is sent again after
restart (at-least-once): nothing is marked done before it is. An outcome the
spool cannot write now (a full disk) is offered again until it is written;
the message is never attempted again for it (that would send it again).

Must not: speak SMTP itself (transport.py), decide routes (routing.py),
parse replies (outcome.py) or know DKIM (signing.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import gevent
from gevent.pool import Pool

from . import dsn, metrics, offload
from .config import Config
from .log import fields
from .outcome import BOUNCED, DEFERRED, DELIVERED, Result
from .ratelimit import Limiter, Unlimited
from .resolver import Resolver
from .routing import Deliver
from .scheduler import Scheduler, retry_delay
from .signing import Signer
from .smtp.address import domain_of
from .spool import DamagedMessage, Envelope, QueueEntry, Spool, SpoolError, id_time, new_id
from .transport import Transport

log = logging.getLogger(__name__)

READ_IN_THREAD = 1 << 20  # bodies larger than this are read off the hub
WAITING = "waiting"  # a recipient whose domain has no rate-limit token yet (not an attempt)
# A DKIM signature (RSA-2048, text) costs ~0.7 ms of CPU for 4 KiB, ~4 ms for
# 64 KiB and ~75 ms per MiB, nearly all of it Python holding the GIL. Up to
# 64 KiB that is less than the interpreter's 5 ms switch interval, so a thread
# would not give the hub back any sooner; larger bodies are signed in the
# threadpool, where the hub gets the GIL back every 5 ms.
SIGN_IN_THREAD = 64 << 10
# An outcome the spool cannot take now (a full disk) is offered again after this
# long, doubling up to RECORD_RETRY_MAX: the attempt is never made again for it.
RECORD_RETRY = 0.5
RECORD_RETRY_MAX = 10.0

T = TypeVar("T")


def group_by_domain(recipients: Sequence[str]) -> dict[str, list[str]]:
    """One transaction per destination domain (SPEC §5), recipients in envelope order."""
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        groups.setdefault(domain_of(rcpt), []).append(rcpt)
    return groups


def bounce_report(env: Envelope, bounced: Sequence[tuple[str, int, str]]) -> str:
    lines = [
        "Hedwig could not deliver this message to the recipients below.",
        f"Message-Id (queue): {env.msg_id}",
        f"Sender: <{env.sender}>",
        f"Received: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(env.received_at))}",
        "",
    ]
    lines += [f"<{rcpt}>: {code or ''} {text}".replace("  ", " ") for rcpt, code, text in bounced]
    return "\n".join(lines) + "\n"


class Delivery:
    def __init__(self, config: Config, spool: Spool, scheduler: Scheduler,
                 resolver: Resolver, transport: Transport, rng: random.Random | None = None,
                 limiter: Limiter | None = None, signer: Signer | None = None) -> None:
        self.server = config.server
        self.cleanup = config.storage.cleanup
        self.spool = spool
        self.scheduler = scheduler
        self.resolver = resolver
        self.transport = transport
        self.rng = rng or random.Random()
        self.limiter = limiter or Unlimited()
        self.signer = signer
        self.pool = Pool(self.server.delivery_concurrency)
        self._cleaner: gevent.Greenlet | None = None

    def start(self) -> None:
        for _ in range(self.server.delivery_concurrency):
            self.pool.spawn(self._run)
        if self.cleanup.bounced_retention is not None or self.cleanup.deferred_retention is not None:
            self._cleaner = gevent.spawn(self._run_cleanup)

    def _run_cleanup(self) -> None:
        """[storage.cleanup]: forget old bounces; make old deferred mail due so it expires."""
        while True:
            gevent.sleep(self.cleanup.interval)
            try:
                now = time.time()
                if self.cleanup.bounced_retention is not None:
                    removed = offload.run(self.spool.remove_bounced_older_than,
                                          now - self.cleanup.bounced_retention)
                    if removed:
                        log.info("cleanup: removed bounced files", extra=fields(files=removed))
                if self.cleanup.deferred_retention is not None:
                    self.scheduler.expire_older_than(now - self.cleanup.deferred_retention,
                                                     received_at=lambda e: id_time(e.msg_id))
            except OSError as exc:
                log.error("cleanup failed", extra=fields(error=str(exc)))

    def stop(self, grace: float) -> None:
        """No new claims; deliveries in flight get `grace` seconds, then are cut off."""
        if self._cleaner is not None:
            self._cleaner.kill()
        self.scheduler.stop()
        if not self.pool.join(timeout=grace):
            log.warning("grace period over: abandoning deliveries (they will be retried)",
                        extra=fields(deliveries=len(self.scheduler.claimed)))
            self.pool.kill(timeout=1)

    def _run(self) -> None:
        while True:
            entry = self.scheduler.take()
            if entry is None:
                return
            claimed = time.monotonic()  # a job: this claim, until its outcome is recorded
            try:
                self.deliver(entry)
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop delivery
                # Not a verdict about the mail: back off like a deferral so a
                # persistent local fault costs one line per attempt, not a loop.
                if isinstance(exc, (SpoolError, OSError)):  # a full or failing disk: one line, no traceback
                    log.error("delivery failed; retrying later", extra=fields(msg_id=entry.msg_id, error=str(exc)))
                else:
                    log.exception("delivery failed; retrying later", extra=fields(msg_id=entry.msg_id))
                self._count_attempt(entry)
                metrics.emails_deferred.inc()
                entry.last_error = f"local error: {exc}"
                entry.due = time.time() + retry_delay(entry.attempts, self.server.retry_initial_delay,
                                                       self.server.retry_max_delay, self.rng)
                self.scheduler.release(entry, requeue=True)
            metrics.worker_jobs_processed.inc()
            metrics.worker_job_duration.observe(time.monotonic() - claimed)

    # -- one message ---------------------------------------------------------------

    def deliver(self, entry: QueueEntry) -> None:
        if entry.domains:
            # SPEC §7: no token for any of its domains -> set aside until one is
            # due, without reading the body or counting an attempt.
            wait = min(self.limiter.wait(d) for d in entry.domains)
            if wait > 0:
                entry.due = time.time() + wait
                self.scheduler.release(entry, requeue=True)
                return
        try:
            if entry.loc.body_len > READ_IN_THREAD:
                env, body = offload.run(self.spool.read, entry.msg_id)
            else:
                env, body = self.spool.read(entry.msg_id)
        except DamagedMessage as exc:
            path = self.spool.quarantine(entry, str(exc))
            log.error("damaged: quarantined", extra=fields(msg_id=entry.msg_id, error=str(exc), path=path))
            self.scheduler.release(entry, requeue=False)
            return
        pending = list(entry.pending if entry.pending is not None else env.recipients)
        if self.server.disable_outbound:
            log.info("dropped (disable_outbound)", extra=fields(msg_id=entry.msg_id, rcpts=len(pending)))
            self._finish(entry, "dropped")
            metrics.emails_dropped.inc()
            return
        retention = self.cleanup.deferred_retention
        # Age by the id's time, as the cleanup task does: env.received_at is up to a
        # millisecond later, and a message the cleanup found too old must expire here.
        if entry.attempts and retention is not None and time.time() - id_time(entry.msg_id) > retention:
            results = [Result(r, BOUNCED, 0, "expired: queued longer than deferred_retention")
                       for r in pending]
            self._conclude(entry, env, body, results, attempted=False, expired=True)
            return
        outgoing = self._sign(entry, env, body, pending)
        if outgoing is None:
            return
        results: list[Result] = []
        hosts: dict[str, str] = {}  # recipient -> the server that answered for it (for DSNs)
        attempted = False
        groups = group_by_domain(pending)
        entry.domains = tuple(groups)
        for domain, rcpts in groups.items():
            wait = self.limiter.take(domain)
            if wait > 0:  # this domain's turn comes later; not an attempt
                results += [Result(r, WAITING, 0, f"rate limited for {wait:.1f}s") for r in rcpts]
                continue
            domain_results, tried = self._deliver_domain(entry, env, outgoing, domain, rcpts, hosts)
            results += domain_results
            attempted = attempted or tried
        self._conclude(entry, env, body, results, attempted, hosts=hosts)

    def _sign(self, entry: QueueEntry, env: Envelope, body: bytes, pending: list[str]) -> bytes | None:
        """The message as this attempt sends it: DKIM-signed once for all its domains (SPEC §6).

        A retry signs again (a fresh t=): the spool's copy is never rewritten.
        None if signing failed; the message is then deferred like a failed
        attempt (backoff, `max_retries`), never sent unsigned.
        """
        if self.signer is None:
            return body
        started = time.monotonic()
        try:
            if len(body) > SIGN_IN_THREAD:
                signed = offload.run(self.signer.sign, body)
            else:
                signed = self.signer.sign(body)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the mail must not go out unsigned
            text = "local error: DKIM signing failed: " + " ".join(str(exc).split())
            log.error(text, extra=fields(msg_id=entry.msg_id))
            self._conclude(entry, env, body, [Result(r, DEFERRED, 0, text) for r in pending], attempted=True)
            return None
        metrics.dkim_signing_latency.observe(time.monotonic() - started)
        return signed

    def _deliver_domain(self, entry: QueueEntry, env: Envelope, body: bytes, domain: str,
                        rcpts: list[str], hosts: dict[str, str]) -> tuple[list[Result], bool]:
        started = time.monotonic()
        label = metrics.domain_label(domain)
        plan = self.resolver.plan(domain, self.server.routes, self.server.smtp.port, self.rng)
        if not isinstance(plan, Deliver):
            # No transaction: the recipients' fate is the plan's (SPEC §5: a
            # permanent DNS failure bounces without an attempt). The reason opens
            # with its RFC 3463 code, as a server's reply text would.
            reason = f"{plan.status} {plan.reason}".strip()
            results = [Result(r, BOUNCED if plan.permanent else DEFERRED, 0, reason) for r in rcpts]
            self._log_attempt(entry, domain, None, results, time.monotonic() - started)
            if not plan.permanent:
                metrics.send_attempts.labels(domain=label, status="failure").inc()
            return results, not plan.permanent
        attempt = self.transport.send(plan.targets, env.sender, rcpts, body)
        if attempt.host:
            hosts.update(dict.fromkeys(rcpts, attempt.host.partition("[")[0]))
        self._log_attempt(entry, domain, attempt.host or None, attempt.results, attempt.latency)
        metrics.send_latency.labels(domain=label).observe(attempt.latency)
        success = all(r.kind == DELIVERED for r in attempt.results)
        metrics.send_attempts.labels(domain=label, status="success" if success else "failure").inc()
        return list(attempt.results), True

    def _log_attempt(self, entry: QueueEntry, domain: str, host: str | None,
                     results: Sequence[Result], latency: float) -> None:
        """SPEC §8: one line per recipient of an attempt (host None: none was reached)."""
        for result in results:
            log.info("attempt", extra=fields(
                msg_id=entry.msg_id, domain=domain, host=host, rcpt=result.recipient,
                outcome=result.kind, reply=f"{result.code or ''} {result.text}".strip(),
                latency=round(latency, 3)))

    def _count_attempt(self, entry: QueueEntry) -> None:
        entry.attempts += 1
        if entry.attempts > 1:
            metrics.retry_attempts.inc()

    def _conclude(self, entry: QueueEntry, env: Envelope, body: bytes, results: list[Result],
                  attempted: bool, expired: bool = False, hosts: dict[str, str] | None = None) -> None:
        if attempted:
            self._count_attempt(entry)
        bounced = list(entry.bounced)
        bounced += [(r.recipient, r.code, r.text) for r in results if r.kind == BOUNCED]
        deferred = [r for r in results if r.kind == DEFERRED]
        if deferred and entry.attempts >= max(self.server.max_retries, 1):
            bounced += [(r.recipient, r.code, f"gave up after {entry.attempts} attempts: {r.text}")
                        for r in deferred]
            deferred = []
        waiting = [r for r in results if r.kind == WAITING]
        if deferred or waiting:
            changed = len(waiting) < len(results) or len(bounced) > len(entry.bounced)
            entry.pending = tuple(r.recipient for r in deferred + waiting)
            entry.domains = tuple(group_by_domain(entry.pending))
            entry.bounced = tuple(bounced)
            if deferred:
                entry.last_error = f"{deferred[0].code or ''} {deferred[0].text}".strip()
                entry.due = time.time() + retry_delay(entry.attempts, self.server.retry_initial_delay,
                                                       self.server.retry_max_delay, self.rng)
            else:  # only rate limits hold it: come back when the first token is due
                entry.due = time.time() + min(self.limiter.wait(domain_of(r.recipient)) for r in waiting)
            if changed:
                self._recorded(entry, "deferral", lambda: self.spool.record_state(entry))
            self.scheduler.release(entry, requeue=True)
            if deferred:  # held back by rate limits alone is no deferral (SPEC §7)
                metrics.emails_deferred.inc()
            return
        if bounced:
            if self.server.bounce_notifications and dsn.wants_notification(env.sender, env.auth):
                if self.spool.healthy:
                    self._recorded(entry, "dsn", lambda: self._queue_dsn(env, body, bounced, hosts or {}))
                else:  # it refuses every new message until restart: do not wait for it
                    log.error("dsn not queued: the spool is unhealthy", extra=fields(msg_id=entry.msg_id))
            report = bounce_report(env, bounced)
            path = self._recorded(entry, "bounce", lambda: self.spool.write_bounced(entry, body, report))
            log.info("bounced", extra=fields(msg_id=entry.msg_id, rcpts=len(bounced), kept=path))
            self._finish(entry, "expired" if expired else "bounced")
            metrics.emails_bounced.inc()
        else:
            delivered = sum(1 for r in results if r.kind == DELIVERED)
            log.info("delivered", extra=fields(msg_id=entry.msg_id, rcpts=delivered, attempts=entry.attempts))
            self._finish(entry, "delivered")
            metrics.emails_sent.inc()

    def _queue_dsn(self, env: Envelope, body: bytes, bounced: Sequence[tuple[str, int, str]],
                   hosts: dict[str, str]) -> None:
        """Queue an RFC 3464 notification of this bounce to its sender, as the session queues mail.

        It is durable before the bounce is recorded (the caller's order): a
        crash in between bounces the message again after the restart and
        sends a second notification (at-least-once), never none. From then on
        it is ordinary queued mail with the null sender (routes, MX, DKIM,
        retries); if it bounces itself, no notification follows. Counted as
        received, so received = sent + bounced + dropped + queue depth holds.
        Raises SpoolError or OSError (the caller offers it again); a failed
        try leaves nothing queued.
        """
        now = time.time()
        dsn_id = new_id(now)
        failures = [dsn.Failure(rcpt, code, text, hosts.get(rcpt, "")) for rcpt, code, text in bounced]
        data = dsn.build_report(reporting_mta=self.server.helo_hostname, dsn_id=dsn_id, now=now,
                                sender=env.sender, msg_id=env.msg_id, arrival=env.received_at,
                                failures=failures, original=body)
        notice = Envelope(msg_id=dsn_id, sender="", recipients=(env.sender,), received_at=now,
                          smtputf8=not env.sender.isascii(), body="" if data.isascii() else "8BITMIME")
        writer = self.spool.create(notice)
        writer.write(data)
        self.spool.commit(writer)
        self.scheduler.add(self.spool.entries[notice.msg_id])  # commit() put it there
        log.info("dsn queued", extra=fields(msg_id=notice.msg_id, about=env.msg_id, rcpts=len(failures)))
        metrics.emails_received.inc()

    def _finish(self, entry: QueueEntry, outcome: str) -> None:
        self._recorded(entry, outcome, lambda: self.spool.finish(entry, outcome))
        self.scheduler.release(entry, requeue=False)

    def _recorded(self, entry: QueueEntry, what: str, record: Callable[[], T]) -> T:
        """`record()` an outcome this attempt already reached, waiting until the spool takes it.

        A spool that cannot write now (a full disk: SpoolError or OSError) must
        not make the message go round again: it was delivered, bounced or
        deferred, and another attempt would send it again -- once per retry for
        as long as the disk stays full. The delivery greenlet holds the message
        and offers the record again (0.5 s doubling to 10 s). A stop kills the
        greenlet meanwhile: the message has no done line and is delivered again
        after the restart (at-least-once), once.
        """
        delay = RECORD_RETRY
        while True:
            try:
                return record()
            except (SpoolError, OSError) as exc:
                log.error("outcome not recorded; trying again", extra=fields(
                    msg_id=entry.msg_id, outcome=what, error=str(exc), retry_in=delay))
                gevent.sleep(delay)
                delay = min(2 * delay, RECORD_RETRY_MAX)
