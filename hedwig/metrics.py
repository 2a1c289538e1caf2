"""Every Prometheus metric of SPEC §8, defined once; rendering for /metrics.

Processes and files. With `workers = N` each worker counts in its own
process and the master serves `GET /metrics` as the sum over them, through
prometheus-client's multiprocess mode: every process writes its values to
memory-mapped `*_<pid>.db` files in one directory, and `render()` merges the
files. prometheus-client picks its value class from PROMETHEUS_MULTIPROC_DIR
when a metric is *created*, and the directory is known only once the config
is read, so nothing here is created at import:

- `init(directory)` — in each worker process (after the fork; before it is
  harmless too, the value class notices a new pid and opens new files):
  sets PROMETHEUS_MULTIPROC_DIR, installs the multiprocess value class and
  creates the metrics into this module's globals. `init(None)` creates them
  in an ordinary in-process registry instead (tests, tools), rendered by
  `render(None)`.
- Until `init()` the globals are no-op stand-ins with the same methods
  (`inc`, `dec`, `set`, `observe`, `labels(...)`), so unit tests and the queue
  tools, which never call it, count nothing and need no directory.
- The master calls `wipe(directory)` at start (before forking), `render
  (directory)` per scrape and `mark_process_dead(pid, directory)` when it
  reaps a worker. These are plain Python over files: no threads, no gevent.

Callers write `metrics.emails_sent.inc()` through the module (`from . import
metrics`), never `from .metrics import emails_sent`: the name must be looked
up after `init()` replaced it.

What counts what (the unit is the *message*, not the recipient):

hedwig_emails_received_total      messages accepted: durable in the spool and
                                  answered `250 ... queued as` (session.py), and
                                  bounce notifications queued (delivery.py), which
                                  then leave the queue like any message.
hedwig_emails_sent_total          messages that left the queue with every
                                  recipient delivered.
hedwig_emails_bounced_total       messages that left the queue with at least one
                                  bounced recipient (5xx, null MX/NXDOMAIN,
                                  max_retries reached, deferred_retention expired).
hedwig_emails_deferred_total      delivery attempts that ended with recipients
                                  left for a later retry (one per message per such
                                  attempt; a failed DKIM signature or a local error
                                  counts too). A rate-limit wait is not an attempt
                                  and counts nowhere here.
hedwig_emails_dropped_total       messages dropped unsent by `disable_outbound`.
hedwig_retry_attempts_total       delivery attempts of a message whose attempt
                                  number is > 1 (the 2nd, 3rd, ... attempt).
  (A message deleted by `hedwig queue delete` or quarantined as damaged is in
  none of sent/bounced/dropped.)
hedwig_worker_jobs_processed_total  jobs: one claim of a message by a delivery
                                  greenlet, from the claim to the outcome recorded
                                  (a rate-limit set-aside is a job too: a claim,
                                  then a release without an attempt).
hedwig_worker_job_duration_seconds  the same jobs' wall time.
hedwig_send_latency_seconds{domain}  one SMTP transaction for a domain's recipients
                                  (transport.send: connects, TLS, MAIL..final dot).
hedwig_send_attempts_total{domain,status}  per domain per message attempt:
                                  `success` when every recipient of that domain got
                                  2xx, else `failure` (a 4xx/5xx recipient, a
                                  connection failure, or a temporary DNS failure,
                                  which has no transaction and no latency). A
                                  permanent DNS failure is not an attempt (SPEC §5).
hedwig_dkim_signing_latency_seconds  one successful signature (for a large body
                                  signed in the threadpool, its wait for a thread
                                  included); a failed one defers and is not timed.
hedwig_queue_depth                messages in the worker's spool not yet done (the
                                  worker sets it); livesum over live workers.
hedwig_connection_pool_entries    idle outbound connections cached in the
                                  transport's pool; livesum over live workers.
hedwig_ratelimit_fallback         1 while `backend = "redis"` cannot reach Redis and
                                  a worker applies its local limits instead (livemax).

Domain labels: `domain_label()` keeps the first DOMAIN_LABEL_LIMIT distinct
domains a process sees as their own label values; every later domain is
counted under "_other", so a flood of recipient domains cannot grow the
series (and each worker's files) without bound. The limit is per process, so
with several workers a few hundred more may appear across them in the sum.

Gauges are livesum: a dead worker's value leaves the sum when the master
calls mark_process_dead(). Counters and histograms of dead workers stay in
the sum (they are cumulative), as prometheus-client intends. Multiprocess mode
does not support `set_function`, so gauges are set explicitly.

Must not: import gevent or any other hedwig module, start threads, or serve
HTTP (the master does).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

ENV = "PROMETHEUS_MULTIPROC_DIR"
DOMAIN_LABEL_LIMIT = 200
OTHER_DOMAIN = "_other"

# A DKIM signature: tens of µs (ed25519, small body) to ~1 s (RSA-2048 at ~75 ms/MiB).
DKIM_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# An SMTP transaction: ~10 ms on a LAN to minutes (command_timeout is 5 min).
SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0)
# A job: a rate-limit set-aside takes microseconds, a delivery up to minutes.
JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Noop:
    """Stands for a metric before init(): accepts every call, counts nothing."""

    def labels(self, *args: object, **kwargs: object) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


NOOP = _Noop()

# A prometheus_client metric after init(), NOOP before.
queue_depth: Any = NOOP
retry_attempts: Any = NOOP
connection_pool_entries: Any = NOOP
dkim_signing_latency: Any = NOOP
emails_received: Any = NOOP
emails_sent: Any = NOOP
emails_deferred: Any = NOOP
emails_bounced: Any = NOOP
emails_dropped: Any = NOOP
worker_jobs_processed: Any = NOOP
worker_job_duration: Any = NOOP
send_latency: Any = NOOP
send_attempts: Any = NOOP
ratelimit_fallback: Any = NOOP

# attribute -> (class, name, help, options): SPEC §8's metrics, each defined here once.
DEFINITIONS: dict[str, tuple[type, str, str, dict[str, Any]]] = {
    "queue_depth": (Gauge, "hedwig_queue_depth", "Messages in the spool not yet done.",
                    {"multiprocess_mode": "livesum"}),
    "connection_pool_entries": (Gauge, "hedwig_connection_pool_entries",
                                "Idle outbound SMTP connections cached for reuse.",
                                {"multiprocess_mode": "livesum"}),
    "retry_attempts": (Counter, "hedwig_retry_attempts_total",
                       "Delivery attempts that were retries (attempt number > 1).", {}),
    "emails_received": (Counter, "hedwig_emails_received_total",
                        "Messages accepted (durable and answered 250).", {}),
    "emails_sent": (Counter, "hedwig_emails_sent_total",
                    "Messages that left the queue with every recipient delivered.", {}),
    "emails_deferred": (Counter, "hedwig_emails_deferred_total",
                        "Delivery attempts that left recipients for a later retry.", {}),
    "emails_bounced": (Counter, "hedwig_emails_bounced_total",
                       "Messages that left the queue with at least one bounced recipient.", {}),
    "emails_dropped": (Counter, "hedwig_emails_dropped_total",
                       "Messages dropped unsent because of disable_outbound.", {}),
    "worker_jobs_processed": (Counter, "hedwig_worker_jobs_processed_total",
                              "Claims of a message by a delivery greenlet, ended.", {}),
    "worker_job_duration": (Histogram, "hedwig_worker_job_duration_seconds",
                            "Time from a message's claim to its outcome recorded.",
                            {"buckets": JOB_BUCKETS}),
    "dkim_signing_latency": (Histogram, "hedwig_dkim_signing_latency_seconds",
                             "Time to DKIM-sign one message.", {"buckets": DKIM_BUCKETS}),
    "send_latency": (Histogram, "hedwig_send_latency_seconds",
                     "Time of one SMTP transaction for a destination domain.",
                     {"labelnames": ("domain",), "buckets": SEND_BUCKETS}),
    "send_attempts": (Counter, "hedwig_send_attempts_total",
                      "Delivery attempts per destination domain, by status (success|failure).",
                      {"labelnames": ("domain", "status")}),
    "ratelimit_fallback": (Gauge, "hedwig_ratelimit_fallback",
                           "1 while Redis (rate_limits.backend = redis) is unreachable and local limits apply.",
                           {"multiprocess_mode": "livemax"}),
}

registry: CollectorRegistry | None = None  # init(None)'s registry; None in multiprocess mode
_domains: set[str] = set()


def init(directory: str | None) -> None:
    """Create the metrics: multiprocess files in `directory`, or in-process when None.

    Calling it again replaces the metric objects: in-process ones start from
    zero, multiprocess ones go on from the values in this process's files.
    """
    global registry
    previous = values.ValueClass
    if hasattr(previous, "close_all_files"):  # an earlier multiprocess init: let go of its files
        previous.close_all_files()
    if directory is not None:
        os.environ[ENV] = directory
        # Chosen by prometheus_client at its import from the environment; it may
        # have been imported before the directory was known.
        values.ValueClass = values.MultiProcessValue()
        registry = None  # collected from the files; nothing to register
    else:
        os.environ.pop(ENV, None)
        values.ValueClass = values.MutexValue
        registry = CollectorRegistry()
    _domains.clear()
    _create(registry)


def _create(reg: CollectorRegistry | None) -> None:
    for attr, (cls, name, documentation, options) in DEFINITIONS.items():
        globals()[attr] = cls(name, documentation, registry=reg, **options)


def domain_label(domain: str) -> str:
    """`domain` as a label value: the first DOMAIN_LABEL_LIMIT distinct domains, then "_other"."""
    domain = domain.lower()
    if domain in _domains:
        return domain
    if len(_domains) < DOMAIN_LABEL_LIMIT:
        _domains.add(domain)
        return domain
    return OTHER_DOMAIN


def render(directory: str | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape: the sum over every process's files in `directory`.

    With None, this process's own registry from init(None) (empty before it).
    """
    if directory is None:
        return generate_latest(registry or CollectorRegistry()), CONTENT_TYPE_LATEST
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=directory)
    return generate_latest(reg), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, directory: str) -> None:
    """A worker is gone: its livesum gauges (queue depth, pool entries) leave the sum."""
    multiprocess.mark_process_dead(pid, directory)


def wipe(directory: str) -> None:
    """Empty (or create, 0700) the multiprocess directory: values of a previous run go.

    Only the `*.db` files prometheus-client writes are removed, so a wrong
    path costs nothing else.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
