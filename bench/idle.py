"""Idle connections: what holding --connections open sessions costs one Hedwig worker.

Starts a fresh smtp-sink and a fresh Hedwig (relay.py's configuration: fsync
on, everything routed to the sink; `workers = 1` by default, and
`max_connections` = connections + 100 so that the cap is not what is
measured), then:

1. reads the worker's VmRSS (the worker is the master's child);
2. opens --connections TCP connections to it from this process, --batch at a
   time, and reads the 220 greeting on each (connections from several source
   addresses 127.0.0.2, 127.0.0.3, ... when the ephemeral port range is short
   for that many: /proc/sys/net/ipv4/ip_local_port_range);
3. holds them for --hold seconds, reading the worker's CPU time over the hold;
4. while they are all held, sends --probes normal messages, each on a new
   connection (EHLO, MAIL, RCPT, DATA, 1 KiB, QUIT), timing the connect to
   the 220 and the final dot to the 250, and checks that the sink gets them;
5. reads the worker's VmRSS and VmHWM again, closes every connection and stops
   the server.

The client raises its RLIMIT_NOFILE to connections + 256 (as root also the
hard limit, which the server inherits; the worker raises its own soft limit to
max_connections + 256 up to the hard one).

    python bench/idle.py [--connections 10000] [--batch 500] [--workers 1] [--hold 10] [--probes 5]
                         [--write-results] [--title WORDS]

The target (issue 7): 10,000 idle connections held by one worker in ≤ 300 MB
RSS, while a normal client still gets its mail accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import resource
import shutil
import socket
import statistics
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ingest  # noqa: E402
import relay  # noqa: E402
from ingest import status_kib, stop, tree_pids  # noqa: E402

FROM = "bench@example.test"
TO = "sink@example.net"


# -- the idle connections --------------------------------------------------------


class Idle(asyncio.Protocol):
    """A connection that reads its greeting and then says nothing."""

    def __init__(self, greeted: asyncio.Future) -> None:
        self.greeted = greeted
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.greeted.done():
            return
        self.buf += data
        if b"\r\n" in self.buf:
            self.greeted.set_result(self.buf.split(b"\r\n", 1)[0].decode("ascii", "replace"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.greeted.done():
            self.greeted.set_result(f"closed before a greeting: {exc or 'EOF'}")


def source_addresses(connections: int) -> list[str | None]:
    """None (the kernel's choice, 127.0.0.1) when the ephemeral range has room for twice the connections;
    else enough of 127.0.0.2, 127.0.0.3, ... that each needs at most half the range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        ports = high - low + 1
    except (OSError, ValueError):
        ports = 28232  # Linux's default range
    if ports >= 2 * connections:
        return [None]
    n = math.ceil(2 * connections / ports)
    return [f"127.0.0.{2 + i}" for i in range(n)]


async def open_idle(port: int, connections: int, batch: int, sources: list[str | None],
                    timeout: float) -> tuple[list[asyncio.Transport], dict[str, int], float]:
    """(transports, counts of first lines not `220`, seconds taken)."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    odd: dict[str, int] = {}
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        greeted = loop.create_future()
        src = sources[i % len(sources)]
        try:
            transport, _ = await loop.create_connection(lambda: Idle(greeted), "127.0.0.1", port,
                                                        local_addr=(src, 0) if src else None)
        except OSError as exc:
            odd[f"connect: {exc.strerror or exc}"] = odd.get(f"connect: {exc.strerror or exc}", 0) + 1
            return
        transports.append(transport)
        try:
            line = await asyncio.wait_for(greeted, timeout)
        except asyncio.TimeoutError:
            line = f"no greeting within {timeout:g}s"
        if not line.startswith("220"):
            key = line[:60]
            odd[key] = odd.get(key, 0) + 1

    for start in range(0, connections, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(start + batch, connections))))
    return transports, odd, time.perf_counter() - t0


# -- one normal message ---------------------------------------------------------------


def send_one(port: int, size: int, timeout: float = 30.0) -> tuple[float, float, float]:
    """One message on a new connection: (seconds to the 220, final dot to 250, connect to 221). Raises OSError."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        f = sock.makefile("rb")

        def reply(want: bytes) -> None:
            while True:
                line = f.readline()
                if not line:
                    raise OSError(f"connection closed waiting for {want.decode()}")
                if line[3:4] != b"-":
                    break
            if not line.startswith(want):
                raise OSError(f"wanted {want.decode()}, got {line[:100]!r}")

        reply(b"220")
        greeted = time.perf_counter() - t0
        for cmd, want in ((b"EHLO probe.bench.test", b"250"), (f"MAIL FROM:<{FROM}>".encode(), b"250"),
                          (f"RCPT TO:<{TO}>".encode(), b"250"), (b"DATA", b"354")):
            sock.sendall(cmd + b"\r\n")
            reply(want)
        body = b"Subject: idle bench probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(size // 78, 1)
        t_dot = time.perf_counter()
        sock.sendall(body + b".\r\n")
        reply(b"250")
        dot = time.perf_counter() - t_dot
        sock.sendall(b"QUIT\r\n")
        reply(b"221")
    return greeted, dot, time.perf_counter() - t0


# -- the run ----------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Soft (and, as root, hard) RLIMIT_NOFILE to at least `wanted`; returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def worker_pids(master: int) -> list[int]:
    return [p for p in tree_pids(master) if p != master]


def cpu_seconds(pid: int) -> float:
    f = ingest._stat_fields(pid)
    return (int(f[11]) + int(f[12])) / ingest.CLK_TCK if f else 0.0


def run(args: argparse.Namespace) -> dict:
    out: dict = {"errors": []}
    sources = source_addresses(args.connections)
    out["sources"] = sources
    out["limits"] = raise_fd_limit(args.connections + 256)
    if out["limits"][0] < args.connections + 64:
        raise RuntimeError(f"RLIMIT_NOFILE {out['limits']} is too low for {args.connections} connections")
    run_dir = ingest.make_workdir(os.path.join(args.workdir, "run"), "")
    sink = hedwig = None
    loop = asyncio.new_event_loop()
    transports: list[asyncio.Transport] = []
    try:
        sink, sink_port, sink_out = relay.start_sink(run_dir, args)
        counter = relay.SinkCounter(sink_out)
        hedwig, port = relay.start_hedwig("hedwig-fsync", run_dir, sink_port, args, args.workers)
        workers = worker_pids(hedwig.pid)
        if len(workers) != args.workers:
            raise RuntimeError(f"expected {args.workers} worker(s) under the master, found {workers}")
        worker = workers[0]
        out["worker_fd_limit"] = _proc_limit(worker)
        out["rss_before_kib"] = status_kib(worker, "VmRSS")
        out["master_rss_kib"] = status_kib(hedwig.pid, "VmRSS")

        transports, odd, took = loop.run_until_complete(
            open_idle(port, args.connections, args.batch, sources, args.timeout))
        out["opened"], out["odd"], out["open_seconds"] = len(transports), odd, took
        out["greeted"] = len(transports) - sum(v for k, v in odd.items() if not k.startswith("connect"))
        out["rss_held_kib"] = status_kib(worker, "VmRSS")
        # Hold: the worker's CPU while nothing happens but the held connections.
        cpu0, t0 = sum(cpu_seconds(w) for w in workers), time.perf_counter()
        loop.run_until_complete(asyncio.sleep(args.hold))
        out["hold_cpu_pct"] = (sum(cpu_seconds(w) for w in workers) - cpu0) / (time.perf_counter() - t0) * 100

        probes = []
        base = counter.poll()
        for _ in range(args.probes):
            try:
                probes.append(send_one(port, args.size))
            except OSError as exc:
                out["errors"].append(f"probe: {exc}")
        out["probes"] = probes
        deadline = time.monotonic() + 30
        while counter.poll() - base < len(probes) and time.monotonic() < deadline:
            time.sleep(0.05)
        out["probes_delivered"] = counter.poll() - base
        out["rss_after_kib"] = status_kib(worker, "VmRSS")
        out["hwm_kib"] = status_kib(worker, "VmHWM")
        out["pss_kib"] = ingest.pss_kib(worker)
        out["still_open"] = sum(1 for t in transports if not t.is_closing())
        if hedwig.poll() is not None:
            out["errors"].append(f"server exited with {hedwig.returncode}")
        counter.close()
    finally:
        for t in transports:
            t.abort()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        if hedwig is not None:
            stop(hedwig)
        if sink is not None:
            stop(sink)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _proc_limit(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return " / ".join(line.split()[3:5])
    except OSError:
        pass
    return "?"


def report(out: dict, args: argparse.Namespace, facts: list[str], load: tuple) -> str:
    end = os.getloadavg()
    mib = 1024
    per_conn = (out["rss_held_kib"] - out["rss_before_kib"]) / max(out["opened"], 1)
    probes = out.get("probes", [])
    greet = [p[0] * 1000 for p in probes]
    dot = [p[1] * 1000 for p in probes]
    total = [p[2] * 1000 for p in probes]
    met = (out["greeted"] >= args.connections and out["rss_after_kib"] / mib <= 300 and probes
           and len(probes) == args.probes)
    sources = out["sources"]
    src_s = "127.0.0.1 (kernel's choice)" if sources == [None] else f"{sources[0]} … {sources[-1]}"
    lines = [
        f"Command: `{args.command or ingest._cmd([sys.executable, *sys.argv])}`",
        "",
        *facts,
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"- hedwig: relay.py's configuration, workers = {args.workers}, max_connections = {args.max_connections}, "
        f"fsync on, routes \"*\" to a fresh smtp-sink; the worker's open-file limit (soft / hard): "
        f"{out['worker_fd_limit']}",
        f"- client: this process, one asyncio loop, {args.connections:,} connections in batches of {args.batch} "
        f"from {src_s}, RLIMIT_NOFILE {out['limits'][0]:,}; then {args.probes} probe message(s) of "
        f"~{args.size} bytes, each on a new blocking connection",
        "",
        "| what | value |",
        "|---|---:|",
        f"| connections opened / greeted with 220 | {out['opened']:,} / {out['greeted']:,} |",
        f"| time to open them and read every greeting | {out['open_seconds']:.1f} s |",
        f"| worker VmRSS before | {out['rss_before_kib'] / mib:,.1f} MiB |",
        f"| worker VmRSS holding them | {out['rss_held_kib'] / mib:,.1f} MiB |",
        f"| worker VmRSS after the probes (VmHWM) | {out['rss_after_kib'] / mib:,.1f} MiB "
        f"({out['hwm_kib'] / mib:,.1f}) |",
        f"| worker PSS after the probes | {out['pss_kib'] / mib:,.1f} MiB |",
        f"| per held connection | {per_conn:,.1f} KiB |",
        f"| master VmRSS | {out['master_rss_kib'] / mib:,.1f} MiB |",
        f"| worker CPU while holding them ({args.hold:g} s) | {out['hold_cpu_pct']:.1f} % of a core |",
        f"| probes accepted (250) / delivered to the sink | {len(probes)}/{args.probes} / "
        f"{out['probes_delivered']} |",
        f"| probe connect → 220, median (max) | {_med(greet)} |",
        f"| probe final dot → 250, median (max) | {_med(dot)} |",
        f"| probe connect → 221, median (max) | {_med(total)} |",
        f"| connections still open at the end | {out['still_open']:,} |",
        "",
        f"- first lines other than 220: {out['odd'] or 'none'}; errors: {'; '.join(out['errors']) or 'none'}",
        f"- target ≤ 300 MB worker RSS with {args.connections:,} idle connections while a normal client gets its "
        f"mail accepted: {'met' if met else 'NOT met'} ({out['rss_after_kib'] / mib:,.0f} MiB)",
    ]
    return "\n".join(lines)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ms ({max(xs):.1f} ms)" if xs else "—"


def main() -> int:
    p = argparse.ArgumentParser(description="Worker RSS with N idle connections, and a message through them.")
    p.add_argument("--connections", "-n", type=int, default=int(os.environ.get("BENCH_CONNECTIONS", 10000)))
    p.add_argument("--batch", type=int, default=500, help="connections opened at once (default 500)")
    p.add_argument("--workers", "-w", type=int, default=1)
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold them before the probes (default 10)")
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one greeting (default 60)")
    ingest.add_run_args(p)
    args = p.parse_args()
    if args.connections < 1 or args.batch < 1 or args.workers < 1:
        p.error("connections, batch and workers must be >= 1")
    args.max_connections = args.connections + 100
    args.dkim = False

    load = os.getloadavg()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    out = None
    with ingest.Guard(args, "hedwig-idle.") as guard:
        facts = relay.machine_facts(args)
        try:
            out = run(args)
        except RuntimeError as exc:
            print(f"idle.py: {exc}", file=sys.stderr)
            return 1
    if guard.interrupted or out is None:
        return 130
    text = report(out, args, facts + [f"- started {started}"], load)
    print(text)
    if args.write_results:
        ingest.append_results(args.results, "idle connections" + (f" — {args.title}" if args.title else ""), text)
    return 0 if not out["errors"] and out["greeted"] == args.connections else 1


if __name__ == "__main__":
    sys.exit(main())
