"""HTTP probes of a running Hedwig master: /metrics parsed, /healthz and /readyz.

    status, headers, body = http_request(port, "/healthz")          # GET
    status, headers, body = http_request(port, "/healthz", "HEAD")
    m = scrape(port)                  # GET /metrics, parsed by prometheus_client's parser
    m.value("hedwig_emails_sent_total")                            # one sample, 0 if absent
    m.value("hedwig_send_attempts_total", domain="a.test", status="success")
    m.names                          # every family and sample name in the exposition

`value()` sums every sample of that name whose labels include the given ones
(so a histogram's `_count` without labels sums over its domains); a sample
that is not there counts 0, which is what a counter nobody has touched means.

Must not: import gevent or hedwig (the pytest process is never patched), or
wait without a deadline.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"


def http_request(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, body
    finally:
        conn.close()


@dataclass
class Scrape:
    """One /metrics exposition, parsed."""

    text: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    types: dict[str, str] = field(default_factory=dict)  # family name -> counter, gauge, histogram

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls(text)
        for family in text_string_to_metric_families(text):
            scrape.names.add(family.name)
            scrape.types[family.name] = family.type
            for sample in family.samples:
                scrape.names.add(sample.name)
                scrape.samples.append((sample.name, dict(sample.labels), float(sample.value)))
        return scrape

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
        return sum(v for n, ls, v in self.samples
                   if n == name and all(ls.get(k) == want for k, want in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {ls[label] for n, ls, _ in self.samples if n == name and label in ls}

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(ls, v) for n, ls, v in self.samples
                if n == name and all(ls.get(k) == want for k, want in labels.items())]


def scrape(port: int, timeout: float = 5.0) -> Scrape:
    status, headers, body = http_request(port, "/metrics", timeout=timeout)
    assert status == 200, (status, body[:200])
    assert headers.get("content-type", "").startswith("text/plain"), headers
    return Scrape.parse(body.decode())


def scrape_until(port: int, predicate: Callable[[Scrape], Any], timeout: float,
                 what: str = "metrics") -> Scrape:
    """Scrape every 0.1 s until `predicate(scrape)` holds; that scrape (AssertionError at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        last = scrape(port)
        if predicate(last):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last scrape:\n{last.text}")
        time.sleep(0.1)  # poll interval, not a readiness guess
