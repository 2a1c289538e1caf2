"""Accept latency: the time from the final dot to the `250`, under a load of N concurrent sessions.

smtp-source does not report it, so this benchmark is its own client: one
asyncio event loop in this process (no gevent, no threads) runs --sessions
SMTP sessions at once against a server on 127.0.0.1. Each session connects,
sends EHLO and then, message after message on the same connection, MAIL,
RCPT, DATA and the message (--size bytes of text) with its final
"\r\n.\r\n" in one write, one command at a time (no pipelining, like
smtp-source). The latency of a message is measured from just before that
write to the moment the event loop hands over the bytes that complete the
`250` reply.

Loads (--rates, one row each):

- `0`: closed loop. Every session sends its next message as soon as the last
  one got its 250: the server runs as fast as it can, so queueing inside the
  server is part of the latency.
- `R` > 0: R messages per second offered in total, each session sending at
  fixed times (every sessions/R seconds, the sessions' phases spread evenly);
  a session that falls behind sends as soon as it can. Every server then gets
  the same load, so their latencies compare directly, as long as each keeps up
  (the achieved msg/s says whether it did).

Servers, each fresh on a free port, with the settings of bench/relay.py and
bench/ingest.py:

  hedwig-fsync    `python hedwig.py serve`, `workers` from --workers (one row
                  each), fsync on, relaying everything to a fresh smtp-sink
                  (relay.py's configuration): deliveries run during the load
  postfix         relay.py's private Postfix instance relaying to a fresh smtp-sink
  aiosmtpd-fsync  bench/aiosmtpd_peer.py (write, fsync, rename, fsync dir per
                  message); accepts only, delivers nothing

For each run: msg/s (messages / time from the first MAIL to the last 250), the
p50, p90, p99 and largest latency, the server tree's CPU ms/msg, its peak RSS
(ingest.TreeMemory) and this client's CPU ms/msg (it shares the machine's CPUs
with the server). Percentiles are over all messages of all repeats of a cell,
except each session's first --warmup (1): the sessions all send their first
message at the same moment, a burst no steady load has.

    python bench/latency.py [--messages 10000] [--sessions 64] [--rates "0 500"]
                            [--workers "1 2"] [--servers all] [--repeats 3]
                            [--write-results] [--title WORDS]

The target (issue 7): p99 ≤ 20 ms at 64 sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ingest  # noqa: E402
import relay  # noqa: E402
from ingest import OthersCpu, TreeMemory, stop, tree_cpu_seconds, wait_greeting  # noqa: E402

ALL_SERVERS = ["hedwig-fsync", "postfix", "aiosmtpd-fsync"]
FROM = "bench@example.test"
TO = "sink@example.net"


# -- the client ------------------------------------------------------------------


def message(size: int) -> bytes:
    """A text message: a few header fields and lines of 76 letters, about size bytes, dot-terminated."""
    head = (f"From: <{FROM}>\r\nTo: <{TO}>\r\nSubject: latency bench\r\n"
            "Message-ID: <latency@bench.test>\r\n\r\n").encode("ascii")
    line = b"x" * 76 + b"\r\n"
    lines = max((size - len(head)) // len(line), 1)
    return head + line * lines + b".\r\n"


@dataclass
class Load:
    """What the sessions share: the message, the schedule, and what they measured."""

    data: bytes
    per_session: list[int]
    interval: float  # seconds between one session's messages; 0 = closed loop
    warmup: int = 0  # the first messages of each session, answered but not counted in `latencies`
    start: float = 0.0  # loop.time() at which the first messages go out
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    first_send: float | None = None
    last_reply: float = 0.0
    errors: list[str] = field(default_factory=list)


class Session(asyncio.Protocol):
    """One SMTP client session: a small state machine driven by complete replies."""

    def __init__(self, load: Load, index: int, done: asyncio.Future) -> None:
        self.load = load
        self.left = load.per_session[index]
        self.phase = load.interval * index / len(load.per_session)
        self.sent = 0
        self.done = done
        self.buf = b""
        self.state = "greeting"
        self.t_dot = 0.0
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if len(line) > 3 and line[3:4] == b"-":
                continue  # a continuation line of a multi-line reply
            self.reply(line, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != "quit":
            self.fail(f"connection lost in {self.state}: {exc or 'EOF'}")
        elif not self.done.done():
            self.done.set_result(None)

    def fail(self, why: str) -> None:
        self.load.errors.append(why)
        self.state = "quit"
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def send(self, data: bytes, state: str) -> None:
        self.state = state
        self.transport.write(data)  # type: ignore[union-attr]

    def reply(self, line: bytes, now: float) -> None:
        code = line[:3]
        want = {"greeting": b"220", "ehlo": b"250", "mail": b"250", "rcpt": b"250", "data": b"354",
                "dot": b"250", "quit": b"221"}[self.state]
        if code != want:
            self.fail(f"{self.state}: {line[:120].decode('ascii', 'replace')}")
            return
        if self.state == "greeting":
            self.send(b"EHLO client.bench.test\r\n", "ehlo")
        elif self.state == "ehlo":
            self.next_message()
        elif self.state == "mail":
            self.send(f"RCPT TO:<{TO}>\r\n".encode("ascii"), "rcpt")
        elif self.state == "rcpt":
            self.send(b"DATA\r\n", "data")
        elif self.state == "data":
            self.t_dot = time.perf_counter()
            if self.load.first_send is None:
                self.load.first_send = self.t_dot
            self.send(self.load.data, "dot")
        elif self.state == "dot":
            self.load.answered += 1
            if self.sent >= self.load.warmup:
                self.load.latencies.append(now - self.t_dot)
            self.load.last_reply = max(self.load.last_reply, now)
            self.left -= 1
            self.sent += 1
            self.next_message()
        elif self.state == "quit":
            self.transport.close()  # type: ignore[union-attr]

    def next_message(self) -> None:
        if self.left <= 0:
            self.send(b"QUIT\r\n", "quit")
            return
        self.state = "waiting"
        delay = 0.0
        if self.load.interval:
            delay = self.load.start + self.phase + self.sent * self.load.interval - self.loop.time()
        else:
            delay = self.load.start - self.loop.time()
        if delay > 0:
            self.loop.call_later(delay, self.mail)
        else:
            self.mail()

    def mail(self) -> None:
        if self.state == "waiting":
            self.send(f"MAIL FROM:<{FROM}>\r\n".encode("ascii"), "mail")


async def run_load(port: int, sessions: int, messages: int, size: int, rate: float, timeout: float,
                   warmup: int = 0) -> Load:
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    load = Load(message(size), per, sessions / rate if rate else 0.0, warmup)
    loop = asyncio.get_running_loop()
    # Every session is connected and past EHLO before the first MAIL: start 1 s after the connects began.
    load.start = loop.time() + 1.0
    futures = []
    for i in range(sessions):
        done = loop.create_future()
        futures.append(done)
        try:
            await loop.create_connection(lambda i=i, done=done: Session(load, i, done), "127.0.0.1", port)
        except OSError as exc:
            load.errors.append(f"connect: {exc}")
            done.set_result(None)
    try:
        await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except asyncio.TimeoutError:
        load.errors.append(f"timed out after {timeout:g}s with {load.answered} of {messages} answered")
    return load


# -- one measurement ---------------------------------------------------------------


@dataclass
class Result:
    server: str
    workers: int | None
    rate: float
    repeat: int
    ok: bool = False
    error: str = ""
    msgs_per_s: float | None = None
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    server_cpu_ms: float | None = None
    client_cpu_ms: float | None = None
    others_cores: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None


def start_server(name: str, workers: int | None, run_dir: str, args: argparse.Namespace, held: list):
    """(pid of the server tree's root, port, pid of its sink or None); what must be stopped goes into `held`."""
    if name == "aiosmtpd-fsync":
        for attempt in range(3):
            port = ingest.free_port()
            srv = ingest.make_server(name, run_dir, port, args)
            with open(srv.log_path, "wb") as logf:
                proc = subprocess.Popen(srv.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                        cwd=ingest.ROOT, start_new_session=True)
            ingest._live.append(proc)
            held.append(proc)
            try:
                wait_greeting(port, proc, args.start_timeout)
                return proc.pid, port, None
            except RuntimeError:
                if proc.poll() is None or attempt == 2:
                    raise
        raise AssertionError("unreachable")
    sink, sink_port, _out = relay.start_sink(run_dir, args)
    held.append(sink)
    if name == "postfix":
        pf, port = relay.start_postfix(run_dir, sink_port, args)
        held.append(pf)
        args.postfix_facts = args.postfix_facts or (pf.postconf_n, pf.master_inet, pf.warnings)
        return pf.master_pid, port, sink.pid
    proc, port = relay.start_hedwig(name, run_dir, sink_port, args, workers or 1)
    held.append(proc)
    return proc.pid, port, sink.pid


def measure(name: str, workers: int | None, rate: float, repeat: int, args: argparse.Namespace) -> Result:
    res = Result(name, workers, rate, repeat)
    run_dir = tempfile.mkdtemp(prefix=f"{name}-w{workers}-r{rate:g}-{repeat}-", dir=args.workdir)
    if name == "postfix":
        os.chmod(run_dir, 0o711)
    held: list = []
    try:
        pid, port, sink = start_server(name, workers, run_dir, args, held)
        cpu0 = tree_cpu_seconds(pid)
        sink0 = tree_cpu_seconds(sink) if sink else 0.0
        memory = TreeMemory(pid)
        others = OthersCpu()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        load = asyncio.run(run_load(port, args.sessions, args.messages, args.size, rate, args.timeout,
                                    args.warmup))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = tree_cpu_seconds(pid)
        sink1 = tree_cpu_seconds(sink) if sink else 0.0
        res.others_cores = others.stop(cpu1 - cpu0 + sink1 - sink0)
        res.rss_mib, res.pss_mib = memory.stop()
        n = res.answered = load.answered
        res.latencies = load.latencies
        res.server_cpu_ms = (cpu1 - cpu0) * 1000 / max(n, 1)
        res.client_cpu_ms = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1000 / max(n, 1)
        if n and load.first_send is not None and load.last_reply > load.first_send:
            res.msgs_per_s = n / (load.last_reply - load.first_send)
        errors = sorted(set(load.errors))
        if n != args.messages:
            errors.insert(0, f"{n} of {args.messages} answered")
        res.error = "; ".join(errors[:3])
        res.ok = not errors
    except RuntimeError as exc:
        res.error = str(exc)
    finally:
        for thing in reversed(held):
            if isinstance(thing, relay.Postfix):
                thing.stop()
            else:
                stop(thing)
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# -- report ------------------------------------------------------------------------


def percentile(sorted_xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method."""
    i = max(int(-(-q * len(sorted_xs) // 1)) - 1, 0)
    return sorted_xs[min(i, len(sorted_xs) - 1)]


def rate_label(rate: float) -> str:
    return "closed loop" if not rate else f"{rate:,.0f} msg/s offered"


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        "| server | workers | load | msg/s median | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/msg "
        "| client CPU ms/msg | others' CPU | peak RSS MiB | PSS MiB | answered (counted) | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {s: i for i, s in enumerate(ALL_SERVERS)}
    cells = sorted(ingest.cells(results, lambda r: (r.server, r.workers, r.rate)),
                   key=lambda c: (c[0][2], order[c[0][0]], c[0][1] or 0))
    for (name, workers, rate), rs in cells:
        lat = sorted(x for r in rs for x in r.latencies)
        rates = [r.msgs_per_s for r in rs if r.msgs_per_s]
        scpu = [r.server_cpu_ms for r in rs if r.server_cpu_ms is not None]
        ccpu = [r.client_cpu_ms for r in rs if r.client_cpu_ms is not None]
        rss = [r.rss_mib for r in rs if r.rss_mib]
        pss = [r.pss_mib for r in rs if r.pss_mib]
        others = [r.others_cores for r in rs if r.others_cores is not None]
        errs = "; ".join(sorted({r.error for r in rs if r.error}))
        nbad = sum(1 for r in rs if not r.ok)

        def ms(q: float) -> str:
            return f"{percentile(lat, q) * 1000:.1f}" if lat else "—"

        rows.append(
            f"| {name} | {ingest.workers_label(workers)} | {rate_label(rate)} "
            f"| {ingest._fmt(statistics.median(rates) if rates else None, ',.0f')} "
            f"| {ms(0.5)} | {ms(0.9)} | {ms(0.99)} | {ms(1.0)} "
            f"| {ingest._fmt(statistics.median(scpu) if scpu else None, '.3f')} "
            f"| {ingest._fmt(statistics.median(ccpu) if ccpu else None, '.3f')} "
            f"| {ingest._fmt(max(others) if others else None, '.2f')} "
            f"| {ingest._fmt(max(rss) if rss else None, ',.0f')} | {ingest._fmt(max(pss) if pss else None, ',.0f')} "
            f"| {sum(r.answered for r in rs):,}/{args.messages * len(rs):,} ({len(lat):,}) "
            f"| {f'{nbad}/{len(rs)} failed: {errs}' if errs else ''} |"
        )
    return "\n".join(rows)


def report(results: list[Result], args: argparse.Namespace, started: str, load: tuple, facts: list[str]) -> str:
    end = os.getloadavg()
    lines = [
        f"Command: `{args.command or ingest._cmd([sys.executable, *sys.argv])}`",
        "",
        *facts,
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"- client: bench/latency.py, one asyncio loop, {args.sessions} sessions on their own connections, "
        f"{args.messages:,} messages of {len(message(args.size)) - 3:,} bytes per run (MAIL, RCPT, DATA, message + "
        f"final dot in one write; no pipelining), {args.repeats} repeat(s), runs interleaved; started {started}",
        "- servers: hedwig-fsync and postfix as in bench/relay.py (relaying everything to a fresh smtp-sink "
        "during the load; Hedwig with the workers in the table, fsync on); aiosmtpd-fsync as in bench/ingest.py "
        "(accepts only)",
        "",
        table(results, args),
        "",
        "latency = time from writing the message with its final dot to reading the 250 (percentiles over every "
        f"message of every repeat, nearest rank, except the first {args.warmup} of each session: those "
        "all sessions send at the same moment at the start). msg/s = messages / time from the first message to the last 250 "
        "(median of the repeats). CPU ms/msg = CPU time over the run / messages (server: the whole process tree; "
        "client: this process). peak RSS = the largest sum of VmHWM over the server's tree, sampled every 0.2 s; "
        "PSS = the sum of Pss over the tree at the end of the load. others' CPU = CPUs' worth of time the rest of "
        "the machine (other jobs) used during the run (/proc/stat's busy time minus the server's, its sink's, "
        "this process's and the kernel threads'), the largest across repeats.",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description="p50/p99 time from the final dot to 250, Hedwig and its peers.")
    p.add_argument("--messages", "-m", type=int, default=int(os.environ.get("BENCH_MESSAGES", 10000)))
    p.add_argument("--warmup", type=int, default=1,
                   help="the first messages of each session are not counted in the percentiles (default 1: "
                        "the ones all sessions send at the same moment at the start)")
    p.add_argument("--sessions", "-s", type=int, default=int(os.environ.get("BENCH_SESSIONS", 64)))
    p.add_argument("--size", "-l", type=int, default=int(os.environ.get("BENCH_SIZE", 1024)),
                   help="message size in bytes (default 1024)")
    p.add_argument("--rates", default=os.environ.get("BENCH_RATES", "0 500"),
                   help='offered msg/s, one row each; 0 = closed loop (default "0 500")')
    p.add_argument("--workers", "-w", default=os.environ.get("BENCH_WORKERS", "1 2"),
                   help='Hedwig `workers` values (default "1 2")')
    p.add_argument("--servers", default=os.environ.get("BENCH_SERVERS", "all"),
                   help=f"comma/space separated, or 'all': {', '.join(ALL_SERVERS)}")
    p.add_argument("--repeats", "-r", type=int, default=int(os.environ.get("BENCH_REPEATS", 3)))
    p.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 120)),
                   help="give up on a run after this many seconds (default 120)")
    p.add_argument("--peer-threads", type=int, default=64, help="aiosmtpd peer executor threads (default 64)")
    p.add_argument("--postfix-concurrency", type=int, default=64)
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--delivery-concurrency", type=int, default=None)
    p.add_argument("--postfix-master-cf", default=relay.default_master_cf())
    ingest.add_run_args(p)
    args = p.parse_args()
    args.dkim = False
    args.postfix_facts = None
    servers = list(ALL_SERVERS) if args.servers.strip() in ("all", "") else args.servers.replace(",", " ").split()
    for s in servers:
        if s not in ALL_SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}")
    workers = ingest.int_list(p, args.workers, "--workers")
    try:
        rates = [float(x) for x in args.rates.replace(",", " ").split()]
    except ValueError:
        p.error(f"--rates: expected numbers, got {args.rates!r}")
    if args.sessions < 1 or args.messages < args.sessions or args.repeats < 1 or min(rates) < 0:
        p.error("sessions >= 1, messages >= sessions, repeats >= 1, rates >= 0")
    if "postfix" in servers and os.geteuid() != 0:
        p.error("the postfix server needs root; pick --servers hedwig-fsync,aiosmtpd-fsync")
    # The client holds one descriptor per session.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.sessions + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.sessions + 64, hard), hard))

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    facts: list[str] = []
    variants = ingest.server_variants(servers, workers)
    results: list[Result] = []
    total = args.repeats * len(rates) * len(variants)
    n = 0
    status = 0
    with ingest.Guard(args, "hedwig-latency.", relay.kill_all) as guard:
        if "postfix" in servers:
            relay.allow_postfix(args.workdir)
        facts = relay.machine_facts(args)
        for rep in range(1, args.repeats + 1):
            order = variants if rep % 2 else list(reversed(variants))
            for rate in rates:
                for name, w in order:
                    n += 1
                    r = measure(name, w, rate, rep, args)
                    results.append(r)
                    lat = sorted(r.latencies)
                    got = (f"{ingest._fmt(r.msgs_per_s, '6,.0f')} msg/s, p50 {percentile(lat, 0.5) * 1000:.1f} ms, "
                           f"p99 {percentile(lat, 0.99) * 1000:.1f} ms" if lat else "nothing answered")
                    err = f" FAILED: {r.error}" if not r.ok else ""
                    print(f"[{n}/{total}] {name:14} w={ingest.workers_label(w):2} {rate_label(rate):22} rep {rep}: "
                          f"{got}{err}", file=sys.stderr, flush=True)
                    if not r.ok:
                        status = 1
    if guard.interrupted:
        status = 130
    if not results:
        return status or 1
    text = report(results, args, started, load, facts)
    print(text)
    if args.write_results:
        ingest.append_results(args.results, "accept latency" + (f" — {args.title}" if args.title else ""), text)
    return status


if __name__ == "__main__":
    sys.exit(main())
