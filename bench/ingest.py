"""Ingest benchmark: accepted messages per second, Hedwig against its peers.

For every (server, sessions, mode, repeat) it starts a fresh server on a free
127.0.0.1 port with a fresh spool directory, waits for its 220 greeting, runs
Postfix's `smtp-source` against it, and records:

- msg/s            messages / wall time of the smtp-source run
- server CPU ms/msg utime+stime of the server process and its descendants
                   (Hedwig: the master and its workers; from /proc/PID/stat,
                   reaped children included), sampled just before and just
                   after the smtp-source run
- peak RSS, PSS    the largest sum of VmHWM over the server's process tree,
                   sampled every 0.2 s, and the sum of Pss at the end (TreeMemory)
- client CPU ms/msg the same for smtp-source (its rusage), since client and
                   server share the machine's CPUs
- landed           messages actually found in the spool after the server
                   stopped (Hedwig: MESSAGE records in <spool>/log; aiosmtpd
                   peer: files in <spool>/new); smtp-sink keeps nothing

Modes: `conn` = one message per connection (smtp-source's default: connect,
EHLO, MAIL, RCPT, DATA, QUIT, reconnect); `d` = `smtp-source -d`, every session
keeps its connection and sends message after message.

Servers: hedwig-fsync, hedwig-nofsync (`[storage] fsync = false`), each once
per value of --workers (Hedwig's `workers`, default "1 2"),
aiosmtpd-fsync, aiosmtpd-nofsync (bench/aiosmtpd_peer.py: write tmp/,
fsync, rename into new/, fsync new/), smtp-sink (no disk: the loopback ceiling).

    python bench/ingest.py [--messages 20000] [--sessions "16 64"] [--workers "1 2"] [--size 1024]
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
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f:
                children.setdefault(int(f[1]), []).append(int(name))  # f[1] = ppid
    return children


def tree_pids(pid: int) -> list[int]:
    """pid and its live descendants (Hedwig: the master and its workers)."""
    children = _children_map()
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its live descendants, plus the reaped children (cutime+cstime).

    /proc/PID/stat sums every thread of a process, so a worker's threadpool counts too.
    """
    total = 0
    for p in tree_pids(pid):
        f = _stat_fields(p)
        if f is None:
            continue
        # fields after ')' : state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        #                    utime(11) stime(12) cutime(13) cstime(14)
        total += int(f[11]) + int(f[12])
        if p == pid:
            total += int(f[13]) + int(f[14])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every CPU has spent running processes and kernel threads (and stolen by the hypervisor).

    From /proc/stat: user + nice + system + steal. Interrupt and softirq time
    is left out: no process is charged for it, and here it is mostly the
    run's own loopback traffic.
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + steal) / CLK_TCK


def kernel_threads_seconds() -> float:
    """utime+stime of the kernel's own threads (kthreadd, pid 2, and its children)."""
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f and (name == "2" or f[1] == "2"):
                total += int(f[11]) + int(f[12])
    return total / CLK_TCK


class OthersCpu:
    """The CPU that other jobs on the machine used during a run, in cores.

    The machine's busy time over the run, minus this process's own (the
    benchmark and its threads), minus what the run's processes used
    (`accounted`: server, client, sink) and minus the kernel's threads
    (journal commits, writeback, softirq threads: they mostly serve the
    run's own writes, and serve a file-per-message server more). Other jobs
    on a shared machine show up here, so a report can tell a quiet run from
    a disturbed one.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.self0 = self._self()
        self.kernel0 = kernel_threads_seconds()

    @staticmethod
    def _self() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def stop(self, accounted: float) -> float:
        busy = (machine_busy_seconds() - self.busy0 - (self._self() - self.self0) - accounted
                - (kernel_threads_seconds() - self.kernel0))
        return max(busy, 0.0) / max(time.perf_counter() - self.t0, 1e-9)


def status_kib(pid: int, field: str) -> int:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM, ...); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_kib(pid: int, field: str = "VmHWM") -> int:
    """The sum of one /proc/PID/status figure over pid and its live descendants."""
    return sum(status_kib(p, field) for p in tree_pids(pid))


def pss_kib(pid: int) -> int:
    """Proportional set size: resident pages, each shared page split among the processes sharing it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Memory of a server's process tree during a run: peak RSS, sampled in a thread, and PSS at the end.

    peak RSS is the largest sum of VmHWM over the tree. Each process's VmHWM is
    its own peak, so sampling every `interval` seconds also keeps the peak of
    processes that exit before the end (Postfix's smtpd). Pages shared after
    fork count once per process, as `ps` counts them, so for a tree of many
    processes this overstates what it holds; PSS (sum of Pss from
    smaps_rollup, read once at stop() because it costs ~0.3 ms a process)
    splits each shared page among its sharers and adds up to the real total.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = tree_kib(pid)
        self.pss_kib: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak_kib = max(self.peak_kib, tree_kib(self.pid))

    def stop(self) -> tuple[float, float]:
        """Ends the sampling (the first call takes the last samples): (peak RSS, PSS now) in MiB."""
        if self.pss_kib is None:
            self._done.set()
            self._thread.join()
            self.peak_kib = max(self.peak_kib, tree_kib(self.pid))
            self.pss_kib = sum(pss_kib(p) for p in tree_pids(self.pid))
        return self.peak_kib / 1024, self.pss_kib / 1024


# -- servers -------------------------------------------------------------------


@dataclass
class Server:
    name: str
    fsync: str  # "on", "off", "n/a"
    argv: list[str]
    spool: str | None
    log_path: str
    upstream: socket.socket | None = None  # Hedwig's stalled next hop, see stalled_upstream()

    def close_upstream(self) -> None:
        """Resets the connections Hedwig has waiting on its next hop, so that it stops without waiting for them."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

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
workers = {workers}
hostname = "bench.test"
disk_reserve = 0
outbound_local = true

[[server.listeners]]
addr = "127.0.0.1:{port}"

[server.routes]
"*" = "127.0.0.1:{upstream}"

[storage]
base_path = "{spool}"
fsync = {fsync}
"""


def stalled_upstream() -> socket.socket:
    """A next hop that never answers: a listening socket nobody accepts on.

    Hedwig's ingest runs route all mail to it, so every delivery waits for a
    greeting that never comes (at most delivery_concurrency of them, holding
    no CPU) and the run measures the accept path alone, as the aiosmtpd peer
    and smtp-sink do nothing after the 250 either. Without a route the
    recipients' domain (example.test) is looked up: a resolver that answers
    NXDOMAIN at once makes every message bounce during the run (a bounced/
    file written and synced per message), one that does not answer makes it
    wait, so the cost would depend on the machine's DNS. bench/relay.py
    measures delivery.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def make_server(name: str, run_dir: str, port: int, args: argparse.Namespace, workers: int | None = None) -> Server:
    spool = os.path.join(run_dir, "spool")
    log_path = os.path.join(run_dir, "server.log")
    py = sys.executable
    if name in ("hedwig-fsync", "hedwig-nofsync"):
        fsync = name == "hedwig-fsync"
        conf = os.path.join(run_dir, "hedwig.toml")
        upstream = stalled_upstream()
        with open(conf, "w") as f:
            f.write(HEDWIG_CONF.format(port=port, spool=spool, fsync="true" if fsync else "false",
                                       workers=workers or 1, upstream=upstream.getsockname()[1]))
        argv = [py, os.path.join(ROOT, "hedwig.py"), "serve", "--config", conf]
        return Server(name, "on" if fsync else "off", argv, spool, log_path, upstream)
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
    workers: int | None  # Hedwig's `workers`; None for the peers
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
    others_cores: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
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


def measure(name: str, workers: int | None, sessions: int, mode: str, repeat: int,
            args: argparse.Namespace) -> Result:
    res = Result(name, workers, "", sessions, mode, repeat)
    run_dir = tempfile.mkdtemp(prefix=f"{name}-w{workers}-s{sessions}-{mode}-r{repeat}-", dir=args.workdir)  # 0700
    proc = None
    srv = None
    try:
        for attempt in range(3):
            port = free_port()
            srv = make_server(name, run_dir, port, args, workers)
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
                srv.close_upstream()
                proc = None
                shutil.rmtree(run_dir, ignore_errors=True)
                os.makedirs(run_dir, mode=0o700)
        cpu0 = tree_cpu_seconds(proc.pid)
        others = OthersCpu()
        memory = TreeMemory(proc.pid)
        argv = source_argv(args, sessions, mode, port)
        status, wall, client_cpu, tail = run_source(argv, args.timeout, os.path.join(run_dir, "source.log"))
        cpu1 = tree_cpu_seconds(proc.pid)
        res.others_cores = others.stop(cpu1 - cpu0 + client_cpu)
        res.rss_mib, res.pss_mib = memory.stop()
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
        srv.close_upstream()
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
        if srv is not None:
            srv.close_upstream()
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


def cells(results: list, key) -> list[tuple[tuple, list]]:
    """[(key, results with that key)] in order of first appearance; key(result) -> tuple."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    return list(groups.items())


def workers_label(workers: int | None) -> str:
    return "—" if workers is None else str(workers)


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        "| server | workers | fsync | sessions | mode | msg/s median | min–max | server CPU ms/msg "
        "| client CPU ms/msg | others' CPU | peak RSS MiB | PSS MiB | landed | errors |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, rs in cells(results, lambda r: (r.server, r.workers, r.sessions, r.mode)):
        good = [r.msgs_per_s for r in rs if r.ok and r.msgs_per_s]
        med = statistics.median(good) if good else None
        rng = f"{min(good):,.0f}–{max(good):,.0f}" if len(good) > 1 else "—"
        scpu = [r.server_cpu_ms for r in rs if r.ok and r.server_cpu_ms is not None]
        ccpu = [r.client_cpu_ms for r in rs if r.ok and r.client_cpu_ms is not None]
        rss = [r.rss_mib for r in rs if r.rss_mib]
        pss = [r.pss_mib for r in rs if r.pss_mib]
        others = [r.others_cores for r in rs if r.others_cores is not None]
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
            f"| {k[0]} | {workers_label(k[1])} | {rs[0].fsync} | {k[2]} | {'-d' if k[3] == 'd' else 'per-conn'} "
            f"| {_fmt(med, ',.0f')} | {rng} "
            f"| {_fmt(statistics.median(scpu) if scpu else None, '.3f')} "
            f"| {_fmt(statistics.median(ccpu) if ccpu else None, '.3f')} "
            f"| {_fmt(max(others) if others else None, '.2f')} "
            f"| {_fmt(max(rss) if rss else None, ',.0f')} | {_fmt(max(pss) if pss else None, ',.0f')} "
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
        "one listener, `workers` as in the table: a master and that many workers, `[storage] fsync` true/false, "
        "`outbound_local = true`, `[server.routes] \"*\"` = a stalled next hop: a socket that listens and never "
        "accepts, so no delivery completes during the run); "
        f"aiosmtpd = `python bench/aiosmtpd_peer.py --threads {args.peer_threads} [--no-fsync]`; "
        f"smtp-sink = `smtp-sink -c 127.0.0.1:PORT 1000` (`-u nobody` added when run as root)",
        "",
        table(results, args),
        "",
        "msg/s = messages / wall time of the smtp-source run (median of the repeats; min–max across them). "
        "CPU ms/msg = CPU time over the run / messages (server: the whole process tree, Hedwig's master and "
        "workers). peak RSS = the largest sum of VmHWM over the server's process tree, sampled every 0.2 s; "
        "PSS = the sum of Pss (shared pages split among their sharers) over the tree at the end of the load; "
        "both the largest across repeats. others' CPU = CPUs' worth of time that the rest of the machine (other "
        "jobs) used during the run: the machine's busy time (/proc/stat) minus the server's, the client's, "
        "the benchmark's own and the kernel threads', / wall time; the largest across repeats. landed = messages "
        "found in the spool afterwards (min–max across repeats if they differ).",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------


def add_load_args(p: argparse.ArgumentParser, *, messages: int, servers: Sequence[str]) -> None:
    """The load options both benchmarks take (flags, or BENCH_* environment variables)."""
    p.add_argument("--messages", "-m", type=int, default=int(os.environ.get("BENCH_MESSAGES", messages)))
    p.add_argument("--sessions", "-s", default=os.environ.get("BENCH_SESSIONS", "16 64"),
                   help='space/comma separated session counts (default "16 64")')
    p.add_argument("--workers", "-w", default=os.environ.get("BENCH_WORKERS", "1 2"),
                   help='Hedwig `workers` values, space/comma separated (default "1 2"); one row each')
    p.add_argument("--size", "-l", type=int, default=int(os.environ.get("BENCH_SIZE", 1024)),
                   help="message payload bytes (smtp-source -l; headers not included)")
    p.add_argument("--repeats", "-r", type=int, default=int(os.environ.get("BENCH_REPEATS", 3)))
    p.add_argument("--servers", default=os.environ.get("BENCH_SERVERS", "all"),
                   help=f"comma/space separated, or 'all': {', '.join(servers)}")
    p.add_argument("--modes", default=os.environ.get("BENCH_MODES", "conn,d"),
                   help="conn (one message per connection), d (smtp-source -d); default both")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 120)),
                   help="kill smtp-source after this many seconds (default 120)")


def make_workdir(workdir: str | None, prefix: str) -> str:
    """The scratch directory: `workdir` (created if missing), or a fresh mkdtemp under $BENCH_DIR or /var/tmp."""
    if workdir is None:
        return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    os.makedirs(workdir, exist_ok=True)
    return os.path.abspath(workdir)


class Guard:
    """The frame of a benchmark run: `with Guard(args, "hedwig-bench.", kill_all) as guard:`.

    Makes args.workdir (unless given); SIGTERM and SIGHUP raise Interrupted.
    On the way out it stops every process still running (`kill`), removes a
    scratch directory it made, and turns an interruption (Ctrl-C included)
    into guard.interrupted, so that what was measured can still be reported.
    """

    def __init__(self, args: argparse.Namespace, prefix: str, kill=None) -> None:
        self.args = args
        self.own = args.workdir is None
        args.workdir = make_workdir(args.workdir, prefix)
        self.kill = kill or kill_all
        self.interrupted = False

    def __enter__(self) -> Guard:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)
        return self

    def __exit__(self, kind, exc, _tb) -> bool:
        self.kill()
        if self.own:
            shutil.rmtree(self.args.workdir, ignore_errors=True)
        if kind is not None and issubclass(kind, (KeyboardInterrupt, Interrupted)):
            print(f"interrupted ({exc or 'SIGINT'}); reporting what was measured", file=sys.stderr)
            self.interrupted = True
            return True
        return False


def add_run_args(p: argparse.ArgumentParser, default_messages: int | None = None) -> None:
    """The options every benchmark script takes: tools, scratch directory, where the report goes."""
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for a server's 220")
    p.add_argument("--workdir", default=None,
                   help="parent of the per-run directories (default: a fresh mktemp dir under $BENCH_DIR or "
                        "/var/tmp, removed at the end)")
    p.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    p.add_argument("--smtp-sink", default=shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    p.add_argument("--postfix", default=shutil.which("postfix") or "/usr/sbin/postfix")
    p.add_argument("--postconf", default=shutil.which("postconf") or "/usr/sbin/postconf")
    p.add_argument("--write-results", action="store_true", help="append the report to --results")
    p.add_argument("--results", default=os.path.join(BENCH, "RESULTS.md"))
    p.add_argument("--title", default="", help="extra words for the RESULTS.md heading")
    p.add_argument("--command", default="", help="command line to record (the bench/*.sh wrapper passes its own)")


def append_results(path: str, title: str, text: str) -> None:
    """Append a report to RESULTS.md under a dated heading."""
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    heading = f"## {stamp}" + (f" — {title}" if title else "")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the bench/ scripts' --write-results; "
                    "see bench/README.md for how to read them.\n")
        f.write(f"\n{heading}\n\n{text}\n")
    print(f"appended to {path}", file=sys.stderr)


def int_list(p: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        p.error(f"{flag}: expected numbers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag}: expected numbers >= 1, got {text!r}")
    return values


def parse_load_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                    all_servers: Sequence[str]) -> tuple[list[str], list[str], list[int], list[int]]:
    """(servers, modes, sessions, workers) from add_load_args' options; p.error() on a bad one."""
    servers = list(all_servers) if args.servers.strip() in ("all", "") else args.servers.replace(",", " ").split()
    for s in servers:
        if s not in all_servers:
            p.error(f"unknown server {s!r}; choose from {', '.join(all_servers)}")
    modes = args.modes.replace(",", " ").split()
    for m in modes:
        if m not in ALL_MODES:
            p.error(f"unknown mode {m!r}; choose from conn, d")
    sessions = int_list(p, args.sessions, "--sessions")
    workers = int_list(p, args.workers, "--workers")
    if args.messages < 1 or args.repeats < 1:
        p.error("messages and repeats must be >= 1")
    return servers, modes, sessions, workers


def server_variants(servers: Sequence[str], workers: Sequence[int]) -> list[tuple[str, int | None]]:
    """(server, workers) pairs to run: every Hedwig server once per workers value, each peer once."""
    return [(s, w) for s in servers for w in (workers if s.startswith("hedwig") else [None])]


def main() -> int:
    p = argparse.ArgumentParser(description="Accepted msg/s of Hedwig, aiosmtpd and smtp-sink under smtp-source.")
    add_load_args(p, messages=20000, servers=ALL_SERVERS)
    p.add_argument("--peer-threads", type=int, default=64, help="aiosmtpd peer executor threads (default 64)")
    add_run_args(p)
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args()

    servers, modes, sessions, workers = parse_load_args(p, args, ALL_SERVERS)
    for tool in (args.smtp_source, args.smtp_sink if "smtp-sink" in servers else args.smtp_source):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} not found (apt-get install postfix, or run bench/run.sh)")

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    facts: list[str] = []
    create_start = create_end = float("nan")
    results: list[Result] = []
    variants = server_variants(servers, workers)
    total = args.repeats * len(variants) * len(sessions) * len(modes)
    n = 0
    status = 0
    with Guard(args, "hedwig-bench.") as guard:
        facts = machine_facts(args)
        create_start = create_cost_us(args.workdir)
        for rep in range(1, args.repeats + 1):
            for name, w in variants:
                for sess in sessions:
                    for mode in modes:
                        n += 1
                        r = measure(name, w, sess, mode, rep, args)
                        results.append(r)
                        ok = f"{r.msgs_per_s:8,.0f} msg/s" if r.ok else f"FAILED: {r.error}"
                        cpu = f", server {r.server_cpu_ms:.3f} ms/msg" if r.ok and r.server_cpu_ms is not None else ""
                        rss = f", {r.rss_mib:.0f} MiB" if r.rss_mib else ""
                        landed = f", landed {r.landed}" if r.landed is not None else ""
                        print(f"[{n}/{total}] {name:16} w={workers_label(w):2} s={sess:<3} {mode:4} rep {rep}: "
                              f"{ok}{cpu}{rss}{landed} ({r.wall:.2f}s)", file=sys.stderr, flush=True)
                        if not r.ok:
                            status = 1
        create_end = create_cost_us(args.workdir)
    if guard.interrupted:
        status = 130
    if not results:
        return status or 1
    text = report(results, args, started, load, facts, (create_start, create_end))
    print(text)
    if args.write_results:
        append_results(args.results, args.title, text)
    return status


if __name__ == "__main__":
    sys.exit(main())
