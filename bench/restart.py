"""Restart with a full queue: how soon Hedwig listens and delivers with --messages queued.

1. Fills a spool with --messages queued messages (1 KiB each, one recipient,
   due now) through hedwig.spool's own API (`Spool.create`/`commit`, fsync
   off, many greenlets), as a worker would have written them; then closes it.
   The filled spool is kept as a template and copied for each run.
2. For each run (--repeats; `warm`: the spool's pages are in the page cache,
   as after a quick restart; `cold`: they were synced and dropped from the
   cache with posix_fadvise(DONTNEED), file by file, as after a reboot):
   starts a fresh smtp-sink, then `python hedwig.py serve` (relay.py's
   configuration: fsync on, `workers` = --workers, every route to the sink)
   on a copy of the template, and measures
   - exec → 220: from just before the exec until a connection to the
     listener reads the 220 greeting (polled every 5 ms);
   - exec → first delivery: until the sink has counted its first message;
   - the worker's VmRSS when the 220 came, and its VmRSS and VmHWM after
     --observe seconds of delivering, with how many messages the sink got by then;
   then stops Hedwig (SIGTERM) and checks that the messages it delivered plus
   those still queued in the spool are all --messages (nothing lost).

    python bench/restart.py [--messages 100000] [--workers 1] [--observe 10] [--repeats 2]
                            [--write-results] [--title WORDS]

The target (issue 7): with 100,000 queued messages, listening in < 5 s,
delivering at once, RSS < 200 MB.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ingest  # noqa: E402
import relay  # noqa: E402
from ingest import ROOT, status_kib, stop, tree_pids  # noqa: E402

FROM = "bench@example.test"
TO = "sink@example.net"


# -- the queue -------------------------------------------------------------------------


def fill(spool_dir: str, messages: int, size: int, greenlets: int = 200) -> float:
    """Queue `messages` messages in a new spool through hedwig.spool; returns the seconds it took.

    Runs in a child process: it needs gevent's hub (the spool's committer is a
    greenlet) and this process stays free of it.
    """
    code = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
import gevent
from hedwig.spool import Envelope, Spool, new_id
spool = Spool({spool_dir!r}, fsync=False)
spool.open()
body = (b"Received: from client.bench.test (127.0.0.1) by bench.test; restart bench\\r\\n"
        b"From: <{FROM}>\\r\\nTo: <{TO}>\\r\\nSubject: restart bench\\r\\n\\r\\n")
body += b"x" * max({size} - len(body) - 2, 0) + b"\\r\\n"
def one(n):
    for _ in range(n):
        w = spool.create(Envelope(new_id(), {FROM!r}, ({TO!r},), time.time(), client="127.0.0.1",
                                  helo="client.bench.test"))
        w.write(body)
        spool.commit(w)
per, extra = divmod({messages}, {greenlets})
gevent.joinall([gevent.spawn(one, per + (i < extra)) for i in range({greenlets})], raise_error=True)
assert len(spool.entries) == {messages}, len(spool.entries)
spool.close()
"""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600, cwd=ROOT)
    return time.perf_counter() - t0


def queued(spool_dir: str) -> int:
    """Messages still queued in a stopped server's spool: records without a done line in their journal."""
    sys.path.insert(0, ROOT)
    from hedwig.spool import MESSAGE, iter_records, journal_path, list_segments, load_journal
    n = 0
    for _writer, _seq, path in list_segments(os.path.join(spool_dir, "log")):
        _states, done = load_journal(journal_path(path))
        n += sum(1 for loc in iter_records(path) if loc.kind == MESSAGE and loc.msg_id not in done)
    return n


def drop_cache(spool_dir: str) -> int:
    """Sync every file of the spool and drop its pages from the page cache (this spool only); bytes dropped."""
    total = 0
    for dirpath, _dirs, files in os.walk(spool_dir):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


# -- one restart ---------------------------------------------------------------------------


def greeting_at(port: int, proc: subprocess.Popen, deadline: float) -> float | None:
    """perf_counter() when a connection to port first reads a 220, polling every 5 ms; None by the deadline."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    t = time.perf_counter()
                    s.sendall(b"QUIT\r\n")
                    return t
        except OSError:
            pass
        time.sleep(0.005)
    return None


def measure(template: str, mode: str, repeat: int, args: argparse.Namespace) -> dict:
    run_dir = os.path.join(args.workdir, f"{mode}-{repeat}")
    os.makedirs(run_dir, mode=0o700)
    res: dict = {"mode": mode, "repeat": repeat, "error": ""}
    sink = hedwig = counter = None
    try:
        spool = os.path.join(run_dir, "spool")
        subprocess.run(["cp", "-a", template, spool], check=True, timeout=300)
        if mode == "cold":
            res["dropped_mib"] = drop_cache(spool) / 2**20
        sink, sink_port, sink_out = relay.start_sink(run_dir, args)
        counter = relay.SinkCounter(sink_out)
        port = ingest.free_port()
        conf = os.path.join(run_dir, "hedwig.toml")
        with open(conf, "w") as f:
            f.write(relay.HEDWIG_CONF.format(port=port, sink_port=sink_port, spool=spool, fsync="true",
                                             workers=args.workers, extra=relay.hedwig_extra(args), dkim=""))
        argv = [sys.executable, os.path.join(ROOT, "hedwig.py"), "serve", "--config", conf]
        with open(os.path.join(run_dir, "server.log"), "wb") as logf:
            t0 = time.perf_counter()
            hedwig = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                      cwd=ROOT, start_new_session=True)
        ingest._live.append(hedwig)
        t_220 = greeting_at(port, hedwig, t0 + args.start_timeout)
        if t_220 is None:
            raise RuntimeError(f"no 220 within {args.start_timeout:g}s: "
                               f"{relay._tail(os.path.join(run_dir, 'server.log'), 400)}")
        res["listen_s"] = t_220 - t0
        workers = [p for p in tree_pids(hedwig.pid) if p != hedwig.pid]
        res["rss_at_220_mib"] = sum(status_kib(w, "VmRSS") for w in workers) / 1024
        t_first = None
        while time.perf_counter() < t0 + args.start_timeout + args.observe:
            if counter.poll() > 0:
                t_first = time.perf_counter()
                break
            time.sleep(0.005)
        if t_first is None:
            raise RuntimeError("nothing delivered")
        res["first_s"] = t_first - t0
        time.sleep(max(t_220 + args.observe - time.perf_counter(), 0))
        res["delivered_observe"] = counter.poll()
        res["rss_observe_mib"] = sum(status_kib(w, "VmRSS") for w in workers) / 1024
        res["hwm_mib"] = sum(status_kib(w, "VmHWM") for w in workers) / 1024
        res["master_rss_mib"] = status_kib(hedwig.pid, "VmRSS") / 1024
        stop(hedwig, grace=30.0)
        time.sleep(0.2)
        res["delivered"] = counter.poll()
        res["left"] = queued(spool)
        if res["delivered"] + res["left"] < args.messages:
            res["error"] = f"{args.messages - res['delivered'] - res['left']} messages neither delivered nor queued"
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        res["error"] = str(exc)
    finally:
        if counter is not None:
            counter.close()
        if hedwig is not None:
            stop(hedwig)
        if sink is not None:
            stop(sink)
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# -- report ----------------------------------------------------------------------------------


def report(results: list[dict], args: argparse.Namespace, facts: list[str], load: tuple, fill_s: float,
           spool_mib: float) -> str:
    end = os.getloadavg()
    rows = [
        "| start | exec → 220 s | exec → first delivery s | worker RSS at 220 MiB | after "
        f"{args.observe:g} s: delivered | worker RSS MiB | worker VmHWM MiB | master RSS MiB "
        "| delivered + still queued at stop | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        def f(key: str, spec: str) -> str:
            return format(r[key], spec) if key in r else "—"
        rows.append(
            f"| {r['mode']} ({r['repeat']}) | {f('listen_s', '.2f')} | {f('first_s', '.2f')} "
            f"| {f('rss_at_220_mib', ',.0f')} | {f('delivered_observe', ',')} | {f('rss_observe_mib', ',.0f')} "
            f"| {f('hwm_mib', ',.0f')} | {f('master_rss_mib', ',.0f')} "
            f"| {r.get('delivered', 0) + r.get('left', 0):,}/{args.messages:,} | {r['error']} |")
    ok = [r for r in results if not r["error"]]
    listen = max((r["listen_s"] for r in ok), default=None)
    first = max((r["first_s"] - r["listen_s"] for r in ok), default=None)
    rss = max((r["hwm_mib"] for r in ok), default=None)
    verdict = []
    if listen is not None:
        verdict.append(f"listening in < 5 s: {'met' if listen < 5 else 'NOT met'} (slowest {listen:.2f} s)")
        verdict.append(f"delivering at once: first delivery {first:.2f} s after the 220 at the most")
        verdict.append(f"RSS < 200 MB: {'met' if rss < 200 else 'NOT met'} (largest worker VmHWM {rss:,.0f} MiB)")
    lines = [
        f"Command: `{args.command or ingest._cmd([sys.executable, *sys.argv])}`",
        "",
        *facts,
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"- queue: {args.messages:,} messages of {args.size} bytes, one recipient each, due now, written through "
        f"hedwig.spool (fsync off) in {fill_s:.1f} s; {spool_mib:,.0f} MiB on disk; copied for each run",
        f"- hedwig: relay.py's configuration, workers = {args.workers}, fsync on, every route to a fresh smtp-sink; "
        "warm = the spool in the page cache, cold = its files synced and dropped from the cache "
        "(posix_fadvise DONTNEED)",
        "",
        *rows,
        "",
        *[f"- {v}" for v in verdict],
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description="Hedwig's restart with a full queue: time to listen and to deliver, RSS.")
    p.add_argument("--messages", "-m", type=int, default=int(os.environ.get("BENCH_MESSAGES", 100000)))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", "-w", type=int, default=1)
    p.add_argument("--observe", type=float, default=10.0, help="seconds of delivery after the 220 (default 10)")
    p.add_argument("--repeats", "-r", type=int, default=2)
    p.add_argument("--modes", default="warm cold", help='"warm", "cold" or both (default)')
    ingest.add_run_args(p)
    args = p.parse_args()
    modes = args.modes.replace(",", " ").split()
    if args.messages < 1 or args.repeats < 1 or not set(modes) <= {"warm", "cold"} or not modes:
        p.error("messages and repeats >= 1; modes warm and/or cold")
    args.dkim = False

    load = os.getloadavg()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    results: list[dict] = []
    status = 0
    fill_s = spool_mib = 0.0
    facts: list[str] = []
    with ingest.Guard(args, "hedwig-restart.") as guard:
        facts = relay.machine_facts(args)
        template = os.path.join(args.workdir, "template")
        print(f"filling {template} with {args.messages:,} messages", file=sys.stderr, flush=True)
        fill_s = fill(template, args.messages, args.size)
        spool_mib = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(template) for f in fs) / 2**20
        print(f"filled in {fill_s:.1f} s ({spool_mib:,.0f} MiB)", file=sys.stderr, flush=True)
        for rep in range(1, args.repeats + 1):
            for mode in modes:
                r = measure(template, mode, rep, args)
                results.append(r)
                print(f"{mode} {rep}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in r.items() if k not in ("mode", "repeat")),
                      file=sys.stderr, flush=True)
                if r["error"]:
                    status = 1
    if guard.interrupted:
        status = 130
    if not results:
        return status or 1
    text = report(results, args, facts + [f"- started {started}"], load, fill_s, spool_mib)
    print(text)
    if args.write_results:
        ingest.append_results(args.results, "restart with a full queue" + (f" — {args.title}" if args.title else ""),
                              text)
    return status


if __name__ == "__main__":
    sys.exit(main())
