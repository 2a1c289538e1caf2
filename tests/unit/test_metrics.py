"""hedwig.metrics: multiprocess files summed by render(), livesum gauges, the domain cap, no-ops.

Worker processes are real processes (`python -c` children that call
metrics.init(dir) and count), because prometheus-client's multiprocess mode
keys its files by pid; this process only renders and marks processes dead,
as the master does. In-process tests use init(None) and put the module's
stand-ins back afterwards.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from hedwig import metrics

REPO_ROOT = Path(__file__).resolve().parents[2]

SPEC_NAMES = {
    "hedwig_queue_depth", "hedwig_retry_attempts_total", "hedwig_connection_pool_entries",
    "hedwig_dkim_signing_latency_seconds", "hedwig_emails_received_total", "hedwig_emails_sent_total",
    "hedwig_emails_deferred_total", "hedwig_emails_bounced_total", "hedwig_emails_dropped_total",
    "hedwig_worker_jobs_processed_total", "hedwig_worker_job_duration_seconds",
    "hedwig_send_latency_seconds", "hedwig_send_attempts_total",
}
ATTRIBUTES = list(metrics.DEFINITIONS)


def run_python(code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter at the repository root; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


WORKER = """
import os, sys
from hedwig import metrics
metrics.init(sys.argv[1])
exec(sys.argv[2])
print(os.getpid())
"""


def worker(directory: Path, code: str) -> int:
    """A worker process that counts with `code` (metrics in scope) and exits; its pid."""
    return int(run_python(WORKER, str(directory), code).strip())


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def d(tmp_path: Path) -> Path:
    """An empty multiprocess directory, as the master leaves it at start."""
    directory = tmp_path / "prom"
    metrics.wipe(str(directory))
    return directory


@pytest.fixture
def local_metrics(monkeypatch: pytest.MonkeyPatch):
    """metrics.init(None) for one test; the stand-ins and prometheus-client's state come back after."""
    for attr in [*ATTRIBUTES, "registry"]:
        monkeypatch.setattr(metrics, attr, getattr(metrics, attr))
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setattr(metrics, "_domains", set())
    monkeypatch.delenv(metrics.ENV, raising=False)
    metrics.init(None)
    return metrics


# -- several processes, one sum --------------------------------------------------------


def test_counters_and_histograms_are_summed_over_processes(d: Path) -> None:
    worker(d, "metrics.emails_sent.inc(2); metrics.send_latency.labels(domain='a.test').observe(0.02)"
              "; metrics.send_attempts.labels(domain='a.test', status='success').inc()")
    worker(d, "metrics.emails_sent.inc(3); metrics.send_latency.labels(domain='a.test').observe(7)"
              "; metrics.send_attempts.labels(domain='a.test', status='failure').inc()")
    body, content_type = metrics.render(str(d))
    assert content_type.startswith("text/plain")
    assert value(body, "hedwig_emails_sent_total") == 5
    assert value(body, "hedwig_send_latency_seconds_count", domain="a.test") == 2
    assert value(body, "hedwig_send_latency_seconds_sum", domain="a.test") == pytest.approx(7.02)
    assert value(body, "hedwig_send_latency_seconds_bucket", domain="a.test", le="0.025") == 1
    assert value(body, "hedwig_send_latency_seconds_bucket", domain="a.test", le="10.0") == 2
    assert value(body, "hedwig_send_attempts_total", domain="a.test", status="success") == 1
    assert value(body, "hedwig_send_attempts_total", domain="a.test", status="failure") == 1
    # Every SPEC §8 metric is there once a process has created them (labelled ones once used).
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {n.removesuffix("_total") for n in SPEC_NAMES} <= families


def test_livesum_gauges_add_up_and_a_dead_process_leaves_the_sum(d: Path) -> None:
    first = worker(d, "metrics.queue_depth.set(5); metrics.connection_pool_entries.set(2)"
                      "; metrics.emails_received.inc()")
    second = worker(d, "metrics.queue_depth.set(7); metrics.connection_pool_entries.set(1)"
                       "; metrics.emails_received.inc()")
    body, _ = metrics.render(str(d))
    assert value(body, "hedwig_queue_depth") == 12
    assert value(body, "hedwig_connection_pool_entries") == 3
    metrics.mark_process_dead(first, str(d))
    body, _ = metrics.render(str(d))
    assert value(body, "hedwig_queue_depth") == 7
    assert value(body, "hedwig_connection_pool_entries") == 1
    assert value(body, "hedwig_emails_received_total") == 2  # counters stay: they are cumulative
    metrics.mark_process_dead(second, str(d))
    body, _ = metrics.render(str(d))
    assert value(body, "hedwig_queue_depth") is None
    assert value(body, "hedwig_emails_received_total") == 2


def test_init_before_a_fork_counts_in_the_child_under_its_own_pid(d: Path) -> None:
    code = ("metrics.emails_bounced.inc()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    metrics.emails_bounced.inc(2); metrics.queue_depth.set(4); os._exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "print(pid)\n")
    child = int(run_python(WORKER, str(d), code).split()[0])
    assert any(str(child) in p.name for p in d.iterdir()), sorted(p.name for p in d.iterdir())
    body, _ = metrics.render(str(d))
    assert value(body, "hedwig_emails_bounced_total") == 3
    assert value(body, "hedwig_queue_depth") == 4


def test_init_works_although_prometheus_client_was_imported_first(d: Path) -> None:
    code = ("import sys, prometheus_client\n"
            "from prometheus_client import values\n"
            "assert values.ValueClass is values.MutexValue\n"  # no directory known at import
            "from hedwig import metrics\n"
            "metrics.init(sys.argv[1])\n"
            "metrics.emails_dropped.inc()\n")
    run_python(code, str(d))
    assert list(d.glob("counter_*.db"))
    assert value(metrics.render(str(d))[0], "hedwig_emails_dropped_total") == 1


def test_init_again_goes_on_from_this_process_files(d: Path) -> None:
    worker(d, "metrics.emails_sent.inc(); metrics.queue_depth.set(1)\n"
              "metrics.init(sys.argv[1])\n"
              "metrics.emails_sent.inc(2); metrics.queue_depth.inc(5)")
    body, _ = metrics.render(str(d))
    assert value(body, "hedwig_emails_sent_total") == 3
    assert value(body, "hedwig_queue_depth") == 6


def test_wipe_creates_a_private_directory_and_removes_only_db_files(tmp_path: Path) -> None:
    d = tmp_path / "new" / "prom"
    metrics.wipe(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (d / "counter_1.db").write_bytes(b"x")
    (d / "gauge_livesum_1.db").write_bytes(b"x")
    (d / "README").write_text("not ours")
    metrics.wipe(str(d))
    assert sorted(p.name for p in d.iterdir()) == ["README"]
    assert metrics.render(str(d))[0] == b""


# -- one process -------------------------------------------------------------------------


def test_before_init_every_metric_is_a_no_op() -> None:
    code = ("from hedwig import metrics as m\n"
            f"names = {ATTRIBUTES!r}\n"
            "assert all(getattr(m, n) is m.NOOP for n in names)\n"
            "m.emails_sent.inc(); m.queue_depth.set(3); m.queue_depth.dec()\n"
            "m.send_latency.labels(domain='x').observe(1.0)\n"
            "m.send_attempts.labels('x', 'success').inc(); m.worker_job_duration.observe(0.1)\n"
            "print(m.render(None)[0])\n")
    assert run_python(code).strip() == "b''"


def test_init_none_counts_in_process(local_metrics) -> None:
    local_metrics.emails_received.inc()
    local_metrics.emails_deferred.inc(2)
    local_metrics.queue_depth.set(9)
    local_metrics.dkim_signing_latency.observe(0.0003)
    body, _ = local_metrics.render(None)
    assert value(body, "hedwig_emails_received_total") == 1
    assert value(body, "hedwig_emails_deferred_total") == 2
    assert value(body, "hedwig_queue_depth") == 9
    assert value(body, "hedwig_dkim_signing_latency_seconds_bucket", le="0.0005") == 1
    assert value(body, "hedwig_dkim_signing_latency_seconds_bucket", le="0.00025") == 0
    # init(None) again: fresh counters, no duplicate-registration error
    local_metrics.init(None)
    assert value(local_metrics.render(None)[0], "hedwig_emails_received_total") == 0


def test_histogram_buckets_span_their_ranges() -> None:
    assert metrics.DKIM_BUCKETS[0] == 0.00005 and metrics.DKIM_BUCKETS[-1] == 1.0
    assert metrics.SEND_BUCKETS[0] == 0.01 and metrics.SEND_BUCKETS[-1] == 300.0
    for buckets in (metrics.DKIM_BUCKETS, metrics.SEND_BUCKETS, metrics.JOB_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


def test_domain_labels_are_capped(local_metrics) -> None:
    limit = local_metrics.DOMAIN_LABEL_LIMIT
    labels = [local_metrics.domain_label(f"d{i}.test") for i in range(limit + 50)]
    assert labels[:limit] == [f"d{i}.test" for i in range(limit)]
    assert set(labels[limit:]) == {local_metrics.OTHER_DOMAIN}
    # a domain seen before the cap keeps its label, whatever its case
    assert local_metrics.domain_label("D7.Test") == "d7.test"
    assert local_metrics.domain_label("new.test") == local_metrics.OTHER_DOMAIN
    for i in range(limit + 50):
        local_metrics.send_attempts.labels(domain=local_metrics.domain_label(f"d{i}.test"), status="success").inc()
    body, _ = local_metrics.render(None)
    series = {dict(labels)["domain"] for (name, labels) in samples(body) if name == "hedwig_send_attempts_total"}
    assert len(series) == limit + 1
    assert value(body, "hedwig_send_attempts_total", domain="_other", status="success") == 50
