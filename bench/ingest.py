"""Ingest benchmark: accepted messages per second, Hedwig against its peers.

For every (server, sessions, mode, repeat) it starts a fresh server on a free
127.0.0.1 port with a fresh spool directory, waits for its 220 greeting, runs
Postfix's `smtp-source` against it, and records:

- msg/s            messages / wall time of the smtp-source run
- server CPU ms/msg utime+stime of the server process and its descendants
                   (from /proc/PID/stat, reaped children included), sampled
                   just before and just after the smtp-source run
- client CPU ms/msg the same for smtp-source (its rusage), since client and
                   server share the machine's CPUs
- landed           messages actually found in the spool after the server
                   stopped (Hedwig: MESSAGE records in <spool>/log; aiosmtpd
                   peer: files in <spool>/new); smtp-sink keeps nothing

Modes: `conn` = one message per connection (smtp-source's default: connect,
EHLO, MAIL, RCPT, DATA, QUIT, reconnect); `d` = `smtp-source -d`, every session
keeps its connection and sends message after message.

Servers: hedwig-fsync, hedwig-nofsync (`[storage] fsync = false`),
aiosmtpd-fsync, aiosmtpd-nofsync (bench/aiosmtpd_peer.py: write tmp/,
fsync, rename into new/, fsync new/), smtp-sink (no disk: the loopback ceiling).

    python bench/ingest.py [--messages 20000] [--sessions "16 64"] [--size 1024]
                           [--repeats 3] [--servers all] [--modes conn,d]
                           [--workdir DIR] [--write-results]

Runs are interleaved (repeat 1 of everything, then repeat 2, ...) so that a
burst of background load does not fall on one server only.
"""

from __future__ import annotations

from collections.abc import Sequence

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_SERVERS = ["hedwig-fsync", "hedwig-nofsync", "aiosmtpd-fsync", "aiosmtpd-nofsync", "smtp-sink"]
ALL_MODES = ["conn", "d"]
MODE_LABEL = {"conn": "per-connection", "d": "-d (one connection per session)"}
FROM = "bench@example.test"
TO = "sink@example.test"

_live: list[subprocess.Popen] = []  # every process we started and have not reaped


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# -- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_greeting(port: int, proc: subprocess.Popen, deadline_s: float) -> None:
    """Poll until the server answers 220 on 127.0.0.1:port. Raises RuntimeError."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(2)
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    return
                last = repr(line[:80])
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"no 220 on port {port} within {deadline_s:.0f}s ({last})")


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, bounded wait, then SIGKILL to the process group we created."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # whatever is left in its group (children of the server), and the server itself
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _live:
        _live.remove(proc)


def kill_all() -> None:
    for proc in list(_live):
        stop(proc, grace=3.0)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its live descendants, plus the reaped children (cutime+cstime)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f:
                children.setdefault(int(f[1]), []).append(int(name))  # f[1] = ppid
    total = 0
    todo = [pid]
    first = True
    while todo:
        p = todo.pop()
        f = _stat_fields(p)
        if f is None:
            continue
        # fields after ')' : state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        #                    utime(11) stime(12) cutime(13) cstime(14)
        total += int(f[11]) + int(f[12])
        if first:
            total += int(f[13]) + int(f[14])
            first = False
        todo.extend(children.get(p, []))
    return total / CLK_TCK


# -- servers -------------------------------------------------------------------


@dataclass
class Server:
    name: str
    fsync: str  # "on", "off", "n/a"
    argv: list[str]
    spool: str | None
    log_path: str

    def count(self) -> int | None:
        if self.name.startswith("hedwig"):
            return count_hedwig(self.spool)
        if self.name.startswith("aiosmtpd"):
            try:
                return len(os.listdir(os.path.join(self.spool, "new")))
            except FileNotFoundError:
                return 0
        return None


def count_hedwig(spool: str) -> int | None:
    try:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        from hedwig.spool import MESSAGE, iter_records, list_segments
    except Exception as exc:  # the spool module is someone else's; do not let it break the run
        print(f"warning: cannot import hedwig.spool to count messages: {exc}", file=sys.stderr)
        return None
    n = 0
    for _writer, _seq, path in list_segments(os.path.join(spool, "log")):
        n += sum(1 for loc in iter_records(path) if loc.kind == MESSAGE)
    return n


HEDWIG_CONF = """\
[log]
level = "warn"

[server]
hostname = "bench.test"
disk_reserve = 0

[[server.listeners]]
addr = "127.0.0.1:{port}"

[storage]
base_path = "{spool}"
fsync = {fsync}
"""


def make_server(name: str, run_dir: str, port: int, args: argparse.Namespace) -> Server:
    spool = os.path.join(run_dir, "spool")
    log_path = os.path.join(run_dir, "server.log")
    py = sys.executable
    if name in ("hedwig-fsync", "hedwig-nofsync"):
        fsync = name == "hedwig-fsync"
        conf = os.path.join(run_dir, "hedwig.toml")
        with open(conf, "w") as f:
            f.write(HEDWIG_CONF.format(port=port, spool=spool, fsync="true" if fsync else "false"))
        argv = [py, os.path.join(ROOT, "hedwig.py"), "serve", "--config", conf]
        return Server(name, "on" if fsync else "off", argv, spool, log_path)
    if name in ("aiosmtpd-fsync", "aiosmtpd-nofsync"):
        fsync = name == "aiosmtpd-fsync"
        argv = [py, os.path.join(BENCH, "aiosmtpd_peer.py"), "--port", str(port), "--spool", spool,
                "--threads", str(args.peer_threads)]
        if not fsync:
            argv.append("--no-fsync")
        return Server(name, "on" if fsync else "off", argv, spool, log_path)
    if name == "smtp-sink":
        argv = [args.smtp_sink, "-c", f"127.0.0.1:{port}", "1000"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            argv[1:1] = ["-u", "nobody"]
        return Server(name, "n/a", argv, None, log_path)
    raise ValueError(name)


# -- one measurement -----------------------------------------------------------


@dataclass
class Result:
    server: str
    fsync: str
    sessions: int
    mode: str
    repeat: int
    ok: bool = False
    error: str = ""
    wall: float = 0.0
    msgs_per_s: float | None = None
    server_cpu_ms: float | None = None
    client_cpu_ms: float | None = None
    landed: int | None = None


def source_argv(args: argparse.Namespace, sessions: int, mode: str, port: int) -> list[str]:
    argv = [args.smtp_source, "-s", str(sessions), "-m", str(args.messages), "-l", str(args.size),
            "-f", FROM, "-t", TO]
    if mode == "d":
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    return argv


def run_source(argv: list[str], timeout: float, log_path: str) -> tuple[int | None, float, float, str]:
    """(exit status or None on timeout, wall seconds, client CPU seconds, stderr tail)."""
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _live.append(proc)
        deadline = t0 + timeout
        status = None
        ru = None
        while True:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                status = os.waitstatus_to_exitcode(st)
                proc.returncode = status
                break
            if time.perf_counter() > deadline:
                wall = time.perf_counter() - t0
                stop(proc, grace=1.0)
                status = None
                ru = None
                break
            time.sleep(0.002)
        if proc in _live:
            _live.remove(proc)
    cpu = (ru.ru_utime + ru.ru_stime) if ru else 0.0
    with open(log_path, "rb") as f:
        tail = f.read()[-600:].decode("utf-8", "replace").replace("\r", "\n").strip()
    return status, wall, cpu, tail


def measure(name: str, sessions: int, mode: str, repeat: int, args: argparse.Namespace) -> Result:
    res = Result(name, "", sessions, mode, repeat)
    run_dir = tempfile.mkdtemp(prefix=f"{name}-s{sessions}-{mode}-r{repeat}-", dir=args.workdir)  # 0700
    proc = None
    srv = None
    try:
        for attempt in range(3):
            port = free_port()
            srv = make_server(name, run_dir, port, args)
            res.fsync = srv.fsync
            with open(srv.log_path, "wb") as logf:
                proc = subprocess.Popen(srv.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                        cwd=ROOT, start_new_session=True)
            _live.append(proc)
            try:
                wait_greeting(port, proc, args.start_timeout)
                break
            except RuntimeError:
                # Exited at once: maybe another process took the free port before the server bound it.
                if proc.poll() is None or attempt == 2:
                    raise
                stop(proc)
                proc = None
                shutil.rmtree(run_dir, ignore_errors=True)
                os.makedirs(run_dir, mode=0o700)
        cpu0 = tree_cpu_seconds(proc.pid)
        argv = source_argv(args, sessions, mode, port)
        status, wall, client_cpu, tail = run_source(argv, args.timeout, os.path.join(run_dir, "source.log"))
        cpu1 = tree_cpu_seconds(proc.pid)
        res.wall = wall
        if status is None:
            res.error = f"smtp-source killed after {args.timeout:.0f}s"
        elif status != 0:
            res.error = f"smtp-source exit {status}: {tail.splitlines()[-1] if tail else ''}"
        else:
            res.ok = True
            res.msgs_per_s = args.messages / wall
        res.server_cpu_ms = (cpu1 - cpu0) * 1000 / args.messages
        res.client_cpu_ms = client_cpu * 1000 / args.messages if status is not None else None
        alive = proc.poll() is None
        stop(proc)
        if not alive:
            res.ok = False
            res.error = (res.error + "; " if res.error else "") + f"server died (status {proc.returncode})"
        res.landed = srv.count()
        if srv.spool is not None and res.landed is not None and res.landed != args.messages and res.ok:
            res.ok = False
            res.error = f"only {res.landed} of {args.messages} messages in the spool"
    except RuntimeError as exc:
        res.error = str(exc)
    finally:
        if proc is not None:
            stop(proc)
        if srv is not None and (not res.ok or args.verbose):
            try:
                with open(srv.log_path, "rb") as f:
                    log_tail = f.read()[-1500:].decode("utf-8", "replace").strip()
                if log_tail:
                    print(f"--- {name} server output (tail) ---\n{log_tail}\n---", file=sys.stderr)
            except OSError:
                pass
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# -- report --------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _sh(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def create_cost_us(parent: str, n: int = 500) -> float:
    """Mean microseconds to create, write (1 KiB) and close a new file under parent.

    Recorded because on the machine this was written on the cost of creating an
    inode varied between ~10 and ~600 µs from one minute to the next, and it
    weighs on a file-per-message server far more than on Hedwig's log.
    """
    d = tempfile.mkdtemp(prefix="create-probe-", dir=parent)
    try:
        payload = b"x" * 1024
        t0 = time.perf_counter()
        for i in range(n):
            fd = os.open(os.path.join(d, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.write(fd, payload)
            os.close(fd)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        shutil.rmtree(d, ignore_errors=True)


def machine_facts(args: argparse.Namespace) -> list[str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import aiosmtpd
        aiosmtpd_v = aiosmtpd.__version__
    except Exception:
        aiosmtpd_v = "not installed"
    df = _sh(["df", "-T", args.workdir]).splitlines()
    df_line = " ".join(df[-1].split()[:2]) + f" (mounted on {df[-1].split()[-1]})" if len(df) > 1 else "?"
    rev = _sh(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    return [
        f"- nproc: {len(os.sched_getaffinity(0))} ({model}), memory {mem}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- spool dir: `{args.workdir}` on {df_line}",
        f"- Python {platform.python_version()}, aiosmtpd {aiosmtpd_v}, "
        f"postfix {_sh(['dpkg-query', '-W', '-f=${Version}', 'postfix']) or '?'} (smtp-source, smtp-sink), "
        f"hedwig at `{rev}`",
    ]


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        "| server | fsync | sessions | mode | msg/s median | min–max | server CPU ms/msg | client CPU ms/msg | landed | errors |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    keys: list[tuple[str, int, str]] = []
    for r in results:
        k = (r.server, r.sessions, r.mode)
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in results if (r.server, r.sessions, r.mode) == k]
        good = [r.msgs_per_s for r in rs if r.ok and r.msgs_per_s]
        med = statistics.median(good) if good else None
        rng = f"{min(good):,.0f}–{max(good):,.0f}" if len(good) > 1 else "—"
        scpu = [r.server_cpu_ms for r in rs if r.ok and r.server_cpu_ms is not None]
        ccpu = [r.client_cpu_ms for r in rs if r.ok and r.client_cpu_ms is not None]
        landed = [r.landed for r in rs if r.landed is not None]
        if not landed:
            landed_s = "n/a"
        elif min(landed) == max(landed):
            landed_s = f"{landed[0]:,}/{args.messages:,}"
        else:
            landed_s = f"{min(landed):,}–{max(landed):,}/{args.messages:,}"
        errs = "; ".join(sorted({r.error for r in rs if r.error}))
        nbad = sum(1 for r in rs if not r.ok)
        err_s = f"{nbad}/{len(rs)} failed: {errs}" if errs else ""
        rows.append(
            f"| {k[0]} | {rs[0].fsync} | {k[1]} | {'-d' if k[2] == 'd' else 'per-conn'} "
            f"| {_fmt(med, ',.0f')} | {rng} "
            f"| {_fmt(statistics.median(scpu) if scpu else None, '.3f')} "
            f"| {_fmt(statistics.median(ccpu) if ccpu else None, '.3f')} "
            f"| {landed_s} | {err_s} |"
        )
    return "\n".join(rows)


def report(results: list[Result], args: argparse.Namespace, started: str, load: tuple, facts: list[str],
           create: tuple[float, float]) -> str:
    load_end = os.getloadavg()
    example_port = "PORT"
    lines = [
        f"Command: `{args.command or _cmd([sys.executable, *sys.argv])}`",
        "",
        *facts,
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}",
        f"- creating a 1 KiB file in the spool dir (open+write+close, mean of 500): {create[0]:.0f} µs at start, "
        f"{create[1]:.0f} µs at end",
        f"- {args.messages:,} messages of {args.size} bytes per run, {args.repeats} repeat(s), "
        f"a fresh server and spool per run, runs interleaved; timeout {args.timeout:.0f} s per run; "
        f"started {started}",
        f"- load generator: `{_cmd(source_argv(args, 64, 'conn', 0)).replace(':0', ':' + example_port)}` "
        "(per-conn; `-d` added for the -d rows)",
        "- servers: hedwig = `python hedwig.py serve --config FILE` ([log] level = \"warn\", disk_reserve = 0, "
        "one listener, 1 worker, `[storage] fsync` true/false); "
        f"aiosmtpd = `python bench/aiosmtpd_peer.py --threads {args.peer_threads} [--no-fsync]`; "
        f"smtp-sink = `smtp-sink -c 127.0.0.1:PORT 1000` (`-u nobody` added when run as root)",
        "",
        table(results, args),
        "",
        "msg/s = messages / wall time of the smtp-source run (median of the repeats; min–max across them). "
        "CPU ms/msg = CPU time over the run / messages. landed = messages found in the spool afterwards "
        "(min–max across repeats if they differ).",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------


def add_load_args(p: argparse.ArgumentParser, *, messages: int, servers: Sequence[str]) -> None:
    """The load options both benchmarks take (flags, or BENCH_* environment variables)."""
    p.add_argument("--messages", "-m", type=int, default=int(os.environ.get("BENCH_MESSAGES", messages)))
    p.add_argument("--sessions", "-s", default=os.environ.get("BENCH_SESSIONS", "16 64"),
                   help='space/comma separated session counts (default "16 64")')
    p.add_argument("--size", "-l", type=int, default=int(os.environ.get("BENCH_SIZE", 1024)),
                   help="message payload bytes (smtp-source -l; headers not included)")
    p.add_argument("--repeats", "-r", type=int, default=int(os.environ.get("BENCH_REPEATS", 3)))
    p.add_argument("--servers", default=os.environ.get("BENCH_SERVERS", "all"),
                   help=f"comma/space separated, or 'all': {', '.join(servers)}")
    p.add_argument("--modes", default=os.environ.get("BENCH_MODES", "conn,d"),
                   help="conn (one message per connection), d (smtp-source -d); default both")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 120)),
                   help="kill smtp-source after this many seconds (default 120)")


def main() -> int:
    p = argparse.ArgumentParser(description="Accepted msg/s of Hedwig, aiosmtpd and smtp-sink under smtp-source.")
    add_load_args(p, messages=20000, servers=ALL_SERVERS)
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for a server's 220")
    p.add_argument("--peer-threads", type=int, default=64, help="aiosmtpd peer executor threads (default 64)")
    p.add_argument("--workdir", default=None,
                   help="parent of the per-run spool dirs (default: a fresh mktemp dir under $BENCH_DIR or "
                        "/var/tmp, removed at the end)")
    p.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    p.add_argument("--smtp-sink", default=shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    p.add_argument("--write-results", action="store_true", help="append the report to --results")
    p.add_argument("--results", default=os.path.join(BENCH, "RESULTS.md"))
    p.add_argument("--title", default="", help="extra words for the RESULTS.md heading")
    p.add_argument("--command", default="", help="command line to record (run.sh passes its own)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args()

    servers = ALL_SERVERS if args.servers.strip() in ("all", "") else args.servers.replace(",", " ").split()
    for s in servers:
        if s not in ALL_SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}")
    modes = args.modes.replace(",", " ").split()
    for m in modes:
        if m not in ALL_MODES:
            p.error(f"unknown mode {m!r}; choose from conn, d")
    try:
        sessions = [int(x) for x in args.sessions.replace(",", " ").split()]
    except ValueError:
        p.error(f"--sessions: expected numbers, got {args.sessions!r}")
    for tool in (args.smtp_source, args.smtp_sink if "smtp-sink" in servers else args.smtp_source):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} not found (apt-get install postfix, or run bench/run.sh)")
    if min(sessions) < 1 or args.messages < 1 or args.repeats < 1:
        p.error("sessions, messages and repeats must be >= 1")

    own_workdir = args.workdir is None
    if own_workdir:
        parent = os.environ.get("BENCH_DIR", "/var/tmp")
        args.workdir = tempfile.mkdtemp(prefix="hedwig-bench.", dir=parent)
    else:
        os.makedirs(args.workdir, exist_ok=True)
    args.workdir = os.path.abspath(args.workdir)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    facts = machine_facts(args)
    create_start = float("nan")
    results: list[Result] = []
    total = args.repeats * len(servers) * len(sessions) * len(modes)
    n = 0
    status = 0
    try:
        create_start = create_cost_us(args.workdir)
        for rep in range(1, args.repeats + 1):
            for name in servers:
                for sess in sessions:
                    for mode in modes:
                        n += 1
                        r = measure(name, sess, mode, rep, args)
                        results.append(r)
                        ok = f"{r.msgs_per_s:8,.0f} msg/s" if r.ok else f"FAILED: {r.error}"
                        cpu = f", server {r.server_cpu_ms:.3f} ms/msg" if r.ok and r.server_cpu_ms is not None else ""
                        landed = f", landed {r.landed}" if r.landed is not None else ""
                        print(f"[{n}/{total}] {name:16} s={sess:<3} {mode:4} rep {rep}: {ok}{cpu}{landed}"
                              f" ({r.wall:.2f}s)", file=sys.stderr, flush=True)
                        if not r.ok:
                            status = 1
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({exc or 'SIGINT'}); reporting what was measured", file=sys.stderr)
        status = 130
    finally:
        kill_all()
        create_end = float("nan")
        if status != 130:
            try:
                create_end = create_cost_us(args.workdir)
            except OSError:
                pass
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)

    if not results:
        return status or 1
    text = report(results, args, started, load, facts, (create_start, create_end))
    print(text)
    if args.write_results:
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        heading = f"## {stamp}" + (f" — {args.title}" if args.title else "")
        new = not os.path.exists(args.results)
        with open(args.results, "a") as f:
            if new:
                f.write("# Ingest benchmark results\n\nAppended by `bench/run.sh --write-results`; "
                        "see bench/README.md for how to read them.\n")
            f.write(f"\n{heading}\n\n{text}\n")
        print(f"appended to {args.results}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
