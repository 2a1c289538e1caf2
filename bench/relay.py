"""Relay benchmark: messages per second from smtp-source, through the server, into an upstream sink.

For every (sessions, mode, repeat, server) it starts, on free 127.0.0.1 ports:

- a fresh upstream: Postfix's `smtp-sink -c 127.0.0.1:SINKPORT 1000`, whose
  running counters (`sess=.. quit=.. mesg=N`, one per event, separated by
  carriage returns) say how many messages have arrived;
- a fresh server under test that relays everything to that sink:
  `hedwig-fsync` / `hedwig-nofsync` (`python hedwig.py serve`, `--workers`
  values (default 1 and 2: one row each), a
  fresh spool, `[server.routes] "*" = "127.0.0.1:SINKPORT"`,
  `outbound_local = true`), or `postfix` (a private Postfix instance with its
  own main.cf, master.cf and queue in the scratch directory,
  `relayhost = [127.0.0.1]:SINKPORT`; never the system one in /etc/postfix);

then runs `smtp-source -s N -m M -l 1024 ...` against the server and records:

- accepted msg/s   M / wall time of the smtp-source run
- relayed msg/s    M / time from the start of smtp-source until the sink has
                   counted M messages (bounded by --relay-timeout; a run that
                   does not get there is reported as partial)
- server CPU ms/msg utime+stime of the server's process tree (from /proc),
                   reaped children included, from just before smtp-source
                   starts to the moment the sink has all M messages, divided
                   by M. Hedwig: the master and its workers. Postfix: the `master`
                   process's utime+stime+cutime+cstime plus utime+stime of
                   its live children (smtpd, cleanup, qmgr, smtp, trivial-
                   rewrite, postlogd, ...); a child that exits is reaped by
                   master into cutime/cstime, so it counts once
- peak RSS, PSS    the largest sum of VmHWM over the server's process tree,
                   sampled every 0.2 s, and the sum of its Pss when the sink
                   has every message (ingest.TreeMemory)
- sink CPU, client CPU the same for smtp-sink and smtp-source, for context
- delivered        what the sink counted once the server had stopped (more
                   than M means duplicate deliveries)

Modes: `conn` = one message per connection; `d` = `smtp-source -d`.

`--redis` (or BENCH_REDIS=1): Hedwig's `[server.rate_limits]` on the Redis
backend (a private `redis-server` on 127.0.0.1 for the run), with a limit no
run reaches, so every message pays one Redis decision and none waits.

`--dkim` (or BENCH_DKIM=1): Hedwig signs every message (`[server.dkim]`,
RSA-2048, a key made once by `hedwig dkim-generate` in the scratch directory);
Postfix does not sign (compare Hedwig with and without it).

    python bench/relay.py [--messages 10000] [--sessions "16 64"] [--repeats 3]
                          [--servers all] [--modes conn,d] [--dkim] [--write-results]

Runs are interleaved: within a repeat every (sessions, mode) cell runs each
server back to back, in an order reversed on every other repeat, so that a
burst of background load does not fall on one server only.

Helpers (ports, greetings, stopping processes, /proc CPU, machine facts) come
from bench/ingest.py.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing ingest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ingest  # noqa: E402  (bench/ingest.py: shared helpers)
from ingest import (  # noqa: E402
    ROOT,
    OthersCpu,
    TreeMemory,
    create_cost_us,
    free_port,
    stop,
    tree_cpu_seconds,
    wait_greeting,
)

ALL_SERVERS = ["hedwig-fsync", "hedwig-nofsync", "postfix"]
ALL_MODES = ["conn", "d"]
FROM = "bench@example.test"
TO = "sink@example.net"
POLL = 0.005  # seconds between looks at smtp-source and the sink's counters

_postfixes: list["Postfix"] = []  # instances started and not yet stopped


def _cmd(argv: list[str]) -> str:
    return ingest._cmd(argv)


def _sh(argv: list[str]) -> str:
    return ingest._sh(argv)


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - n, 0))
            return f.read().decode("utf-8", "replace").replace("\r", "\n").strip()
    except OSError:
        return ""


class _Pid:
    """Enough of Popen for ingest.wait_greeting(): poll() says whether a pid we did not fork is alive."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        f = ingest._stat_fields(self.pid)
        if f is None or f[0] in ("Z", "X"):
            self.returncode = -1
            return -1
        return None


# -- the upstream sink -----------------------------------------------------------


class SinkCounter:
    """Follows smtp-sink -c output (stdout only) and keeps the latest mesg= value."""

    RX = re.compile(rb"mesg=(\d+)")

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.carry = b""
        self.count = 0

    def poll(self) -> int:
        data = self.f.read()
        if data:
            buf = self.carry + data
            end = buf.rfind(b"\r")
            if end < 0:
                self.carry = buf[-4096:]
            else:
                self.carry = buf[end + 1:]
                found = self.RX.findall(buf, 0, end)
                if found:
                    self.count = int(found[-1])
        return self.count

    def close(self) -> None:
        self.f.close()


def sink_argv(args: argparse.Namespace, port: int) -> list[str]:
    argv = [args.smtp_sink, "-c", f"127.0.0.1:{port}", "1000"]
    if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
        argv[1:1] = ["-u", "nobody"]
    return argv


def start_sink(run_dir: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int, str]:
    """(process, port, path of its counter output). Raises RuntimeError."""
    out_path = os.path.join(run_dir, "sink.out")
    err_path = os.path.join(run_dir, "sink.err")
    for attempt in range(3):
        port = free_port()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(sink_argv(args, port), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        ingest._live.append(proc)
        try:
            wait_greeting(port, proc, args.start_timeout)
            return proc, port, out_path
        except RuntimeError as exc:
            stop(proc, grace=2.0)
            if attempt == 2:
                raise RuntimeError(f"smtp-sink: {exc}: {_tail(err_path, 300)}") from exc
    raise AssertionError("unreachable")


# -- Hedwig ----------------------------------------------------------------------

HEDWIG_CONF = """\
[log]
level = "warn"

[server]
workers = {workers}
hostname = "bench.test"
disk_reserve = 0
outbound_local = true
{extra}
[[server.listeners]]
addr = "127.0.0.1:{port}"

[server.routes]
"*" = "127.0.0.1:{sink_port}"
{dkim}
[storage]
base_path = "{spool}"
fsync = {fsync}
"""


def hedwig_extra(args: argparse.Namespace) -> str:
    """[server] keys set from the options: pool_size, delivery_concurrency (and, for other scripts
    that pass their own args, max_connections and retry_initial_delay)."""
    extra = ""
    for key in ("pool_size", "delivery_concurrency", "max_connections"):
        if getattr(args, key, None):
            extra += f"{key} = {getattr(args, key)}\n"
    if getattr(args, "retry_initial_delay", None):
        extra += f'retry_initial_delay = "{args.retry_initial_delay}"\n'
    return extra


def hedwig_dkim(args: argparse.Namespace, key_path: str | None = None) -> str:
    """The [server.dkim] table with --dkim (an RSA-2048 key made once per run of relay.py), else nothing."""
    if not args.dkim:
        return ""
    return (f'\n[server.dkim]\ndomain = "example.test"\nselector = "bench"\n'
            f'private_key = "{key_path or args.dkim_key}"\nkey_type = "rsa"\n')


def hedwig_redis(args: argparse.Namespace) -> str:
    """With --redis: rate limits on the Redis backend, a limit no run reaches (every message is
    one decision, none waits), against the private redis-server started for this run."""
    if not getattr(args, "redis", False):
        return ""
    return (f'\n[server.rate_limits]\nenabled = true\nbackend = "redis"\n'
            f'redis_url = "{getattr(args, "redis_url", "redis://127.0.0.1:PORT/0")}"\ndefault_limit = 100000000\n')


def make_dkim_key(args: argparse.Namespace) -> None:
    """--dkim: `hedwig dkim-generate` an RSA-2048 key into the scratch directory."""
    args.dkim_key = os.path.join(args.workdir, "dkim-rsa2048.pem")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hedwig.py"), "dkim-generate", "--domain",
                             "example.test", "--selector", "bench", "--private-key", args.dkim_key],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"dkim-generate failed: {result.stderr.strip()}")


def start_hedwig(name: str, run_dir: str, sink_port: int, args: argparse.Namespace,
                 workers: int = 1) -> tuple[subprocess.Popen, int]:
    spool = os.path.join(run_dir, "spool")
    conf = os.path.join(run_dir, "hedwig.toml")
    log_path = os.path.join(run_dir, "server.log")
    fsync = "true" if name == "hedwig-fsync" else "false"
    for attempt in range(3):
        port = free_port()
        with open(conf, "w") as f:
            f.write(HEDWIG_CONF.format(port=port, sink_port=sink_port, spool=spool, fsync=fsync, workers=workers,
                                       extra=hedwig_extra(args), dkim=hedwig_dkim(args) + hedwig_redis(args)))
        argv = [sys.executable, os.path.join(ROOT, "hedwig.py"), "serve", "--config", conf]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=ROOT, start_new_session=True)
        ingest._live.append(proc)
        try:
            wait_greeting(port, proc, args.start_timeout)
            return proc, port
        except RuntimeError:
            # Exited at once: maybe another process took the free port before the server bound it.
            if proc.poll() is None or attempt == 2:
                stop(proc)
                raise
            stop(proc)
            shutil.rmtree(spool, ignore_errors=True)
    raise AssertionError("unreachable")


# -- Postfix ---------------------------------------------------------------------

# Everything set in the private instance's main.cf; {q}, {d}, {log}, {sink_port},
# {concurrency} are filled in per run. The rest is Postfix 3.7's built-in default.
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {q}
data_directory = {d}
maillog_file = {log}
myhostname = postfix.bench.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
default_destination_concurrency_limit = {concurrency}
"""


def _postfix_daemon_pids(pgid: int, daemon_dir: str) -> list[int]:
    """Live processes in process group pgid whose executable is in Postfix's daemon directory."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = ingest._stat_fields(int(name))
        if f is None or int(f[2]) != pgid:  # f[2] = pgrp
            continue
        try:
            exe = os.readlink(f"/proc/{name}/exe")
        except OSError:
            exe = ""
        if exe.startswith(daemon_dir.rstrip("/") + "/"):
            pids.append(int(name))
    return pids


def children_cpu(ppid: int, comm: str) -> dict[int, float]:
    """{pid: utime+stime seconds} of the live children of ppid named comm (e.g. Postfix's postlogd)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        if raw[raw.index("(") + 1:raw.rindex(")")] != comm:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        if int(fields[1]) == ppid:
            out[int(name)] = (int(fields[11]) + int(fields[12])) / ingest.CLK_TCK
    return out


class Postfix:
    """A private Postfix instance under run_dir: pfconf/ (main.cf, master.cf), pfqueue/, pfdata/, pf.log."""

    def __init__(self, run_dir: str, sink_port: int, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir = run_dir
        self.conf = os.path.join(run_dir, "pfconf")
        self.queue = os.path.join(run_dir, "pfqueue")
        self.data = os.path.join(run_dir, "pfdata")
        self.log = os.path.join(run_dir, "pf.log")
        self.sink_port = sink_port
        self.port = 0
        self.master_pid: int | None = None
        self.daemon_dir = _sh([args.postconf, "-dh", "daemon_directory"]) or "/usr/lib/postfix/sbin"
        self.postconf_n = ""
        self.warnings: list[str] = []

    def _run(self, argv: list[str], what: str, timeout: float = 60.0) -> str:
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{what}: timed out after {timeout:.0f}s") from exc
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}): {out[-600:]}")
        return out

    def postconf(self, *a: str) -> str:
        return self._run([self.args.postconf, "-c", self.conf, *a], "postconf " + " ".join(a))

    def configure(self, port: int) -> None:
        self.port = port
        os.makedirs(self.conf, mode=0o755, exist_ok=True)
        os.makedirs(self.queue, mode=0o755, exist_ok=True)  # postfix-script cds into it before creating the rest
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(q=self.queue, d=self.data, log=self.log, sink_port=self.sink_port,
                                           concurrency=self.args.postfix_concurrency))
        shutil.copyfile(self.args.postfix_master_cf, os.path.join(self.conf, "master.cf"))
        # No inet service but ours: drop every inet line of the copied master.cf (smtp on port 25,
        # and submission/smtps if someone enabled them), then add smtpd on 127.0.0.1:port.
        for line in self.postconf("-M").splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] == "inet":
                self.postconf("-MX", f"{parts[0]}/inet")
        listen = f"127.0.0.1:{port}"
        self.postconf("-M", f"{listen}/inet={listen} inet n - n - - smtpd")
        # No chroot: a private queue dir has no copy of /etc/services, resolv.conf, etc.
        self.postconf("-F", "*/*/chroot=n")
        if not self.postconf("-M", "postlog/unix-dgram").strip():  # maillog_file needs postlogd
            self.postconf("-M", "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd")
        self.postconf_n = self.generic(self.postconf("-n"))
        self.master_inet = self.generic(self.postconf("-M", f"{listen}/inet"))
        # `postfix check` creates the queue and data directories (owner postfix) and warns about problems.
        out = self._run([self.args.postfix, "-c", self.conf, "check"], "postfix check")
        self.warnings = [ln for ln in out.splitlines() if "warning" in ln.lower()]

    def generic(self, text: str) -> str:
        """text with this run's directory and ports replaced by SCRATCH, SINKPORT and PFPORT, for the report."""
        return (text.replace(self.run_dir, "SCRATCH")
                .replace(f"[127.0.0.1]:{self.sink_port}", "[127.0.0.1]:SINKPORT")
                .replace(f"127.0.0.1:{self.port}", "127.0.0.1:PFPORT"))

    def start(self) -> None:
        _postfixes.append(self)
        self._run([self.args.postfix, "-c", self.conf, "start"], "postfix start", timeout=self.args.start_timeout)
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                self.master_pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise RuntimeError(f"postfix start: no master.pid ({exc})") from exc
        try:
            wait_greeting(self.port, _Pid(self.master_pid), self.args.start_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"postfix: {exc}: {_tail(self.log, 600)}") from exc

    def alive(self) -> bool:
        return self.master_pid is not None and _Pid(self.master_pid).poll() is None

    def stop(self) -> None:
        """`postfix -c DIR stop`, then make sure master and its daemons are gone (SIGKILL by pid)."""
        if self in _postfixes:
            _postfixes.remove(self)
        if self.master_pid is None:
            if os.path.exists(os.path.join(self.queue, "pid", "master.pid")):  # start got that far
                try:
                    with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                        self.master_pid = int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    return
            else:
                return
        if self.alive():
            try:
                subprocess.run([self.args.postfix, "-c", self.conf, "stop"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=20)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _postfix_daemon_pids(self.master_pid, self.daemon_dir):
            time.sleep(0.1)
        for pid in _postfix_daemon_pids(self.master_pid, self.daemon_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _postfix_daemon_pids(self.master_pid, self.daemon_dir):
            time.sleep(0.05)
        left = _postfix_daemon_pids(self.master_pid, self.daemon_dir)
        if left:
            print(f"warning: postfix processes still alive after SIGKILL: {left}", file=sys.stderr)


def default_master_cf() -> str:
    """Debian's pristine master.cf, else the system's."""
    if os.path.exists("/usr/share/postfix/master.cf.dist"):
        return "/usr/share/postfix/master.cf.dist"
    return "/etc/postfix/master.cf"


def allow_postfix(path: str) -> None:
    """The postfix user must traverse to its queue and data directories (mktemp makes 0700 dirs)."""
    os.chmod(path, os.stat(path).st_mode & 0o7777 | 0o111)


def start_postfix(run_dir: str, sink_port: int, args: argparse.Namespace) -> tuple[Postfix, int]:
    pf = Postfix(run_dir, sink_port, args)
    pf.configure(free_port())
    try:
        pf.start()
    except RuntimeError:
        pf.stop()
        raise
    return pf, pf.port


# -- one measurement -----------------------------------------------------------


@dataclass
class Result:
    server: str
    workers: int | None  # Hedwig's `workers`; None for Postfix
    fsync: str
    sessions: int
    mode: str
    repeat: int
    ok: bool = False
    error: str = ""
    accept_wall: float | None = None
    relay_wall: float | None = None
    accepted_per_s: float | None = None
    relayed_per_s: float | None = None
    server_cpu_ms: float | None = None
    sink_cpu_ms: float | None = None
    client_cpu_ms: float | None = None
    logging_cpu_ms: float | None = None  # Postfix: postlogd's share of server_cpu_ms
    others_cores: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    delivered: int | None = None
    notes: list[str] = field(default_factory=list)


def source_argv(args: argparse.Namespace, sessions: int, mode: str, port: int) -> list[str]:
    argv = [args.smtp_source, "-s", str(sessions), "-m", str(args.messages), "-l", str(args.size),
            "-f", FROM, "-t", TO]
    if mode == "d":
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    return argv


def run_load(argv: list[str], counter: SinkCounter, target: int, args: argparse.Namespace,
             log_path: str, alive, at_relayed) -> dict:
    """Run smtp-source and watch the sink until it has `target` messages, or a limit is hit.

    at_relayed() is called once, the moment the sink has counted `target` (or
    when the wait ends without it), to sample the CPU counters. Returns status
    (smtp-source exit code, None if killed), accept_wall, client_cpu, relay_wall
    (None if the sink did not get there), count (the sink's counter, absolute),
    why (a reason the wait ended early, or "").
    """
    out = {"status": None, "accept_wall": None, "client_cpu": None, "relay_wall": None, "why": ""}
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        ingest._live.append(proc)
    src_deadline = t0 + args.timeout
    relay_deadline = t0 + args.relay_timeout
    last_count, last_change = counter.poll(), t0
    sampled = False
    try:
        while True:
            if out["accept_wall"] is None:
                pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                now = time.perf_counter()
                if pid:
                    out["accept_wall"] = now - t0
                    out["status"] = proc.returncode = os.waitstatus_to_exitcode(st)
                    out["client_cpu"] = ru.ru_utime + ru.ru_stime
                elif now > src_deadline:
                    out["accept_wall"] = now - t0
                    stop(proc, grace=1.0)
                    out["why"] = f"smtp-source killed after {args.timeout:g}s"
            if out["relay_wall"] is None:
                count = counter.poll()
                now = time.perf_counter()
                if count >= target:
                    out["relay_wall"] = now - t0
                    at_relayed()
                    sampled = True
                elif count != last_count:
                    last_count, last_change = count, now
            if out["accept_wall"] is not None:
                if out["relay_wall"] is not None:
                    break
                now = time.perf_counter()
                if (out["why"] or out["status"] != 0) and now - last_change > args.stall:
                    break  # smtp-source failed, so fewer than target were accepted; the sink has gone quiet
                if now > relay_deadline:
                    out["why"] = f"the sink had not got every message after {args.relay_timeout:g}s"
                    break
                if not alive():
                    out["why"] = "server died"
                    break
            time.sleep(POLL)
    finally:
        out["end_wall"] = time.perf_counter() - t0
        if not sampled:
            at_relayed()
        if proc.returncode is None:
            stop(proc, grace=1.0)
        if proc in ingest._live:
            ingest._live.remove(proc)
    out["count"] = counter.poll()
    return out


def measure(name: str, workers: int | None, sessions: int, mode: str, repeat: int,
            args: argparse.Namespace) -> Result:
    fsync = {"hedwig-fsync": "on", "hedwig-nofsync": "off", "postfix": "on"}[name]
    res = Result(name, workers, fsync, sessions, mode, repeat)
    run_dir = tempfile.mkdtemp(prefix=f"{name}-w{workers}-s{sessions}-{mode}-r{repeat}-", dir=args.workdir)  # 0700
    if name == "postfix":
        os.chmod(run_dir, 0o711)  # Postfix opens files in its data dir as the postfix user: it must traverse
    sink = hedwig = pf = counter = None
    log_path = os.path.join(run_dir, "server.log")
    try:
        sink, sink_port, sink_out = start_sink(run_dir, args)
        if name == "postfix":
            log_path = os.path.join(run_dir, "pf.log")
            pf, port = start_postfix(run_dir, sink_port, args)
            args.postfix_facts = args.postfix_facts or (pf.postconf_n, pf.master_inet, pf.warnings)
            log_path = pf.log
            server_pid, alive = pf.master_pid, pf.alive
        else:
            hedwig, port = start_hedwig(name, run_dir, sink_port, args, workers or 1)
            server_pid, alive = hedwig.pid, (lambda: hedwig.poll() is None)
        counter = SinkCounter(sink_out)
        base = counter.poll()
        cpu0, sink0 = tree_cpu_seconds(server_pid), tree_cpu_seconds(sink.pid)
        log0 = children_cpu(server_pid, "postlogd") if pf is not None else {}
        memory = TreeMemory(server_pid)
        others = OthersCpu()
        after: list[float] = []

        def at_relayed() -> None:
            after[:] = [tree_cpu_seconds(server_pid), tree_cpu_seconds(sink.pid)]
            res.rss_mib, res.pss_mib = memory.stop()
            if pf is not None:
                log1 = children_cpu(server_pid, "postlogd")
                res.logging_cpu_ms = sum(c - log0.get(pid, 0.0) for pid, c in log1.items()) * 1000 / args.messages

        out = run_load(source_argv(args, sessions, mode, port), counter, base + args.messages, args,
                       os.path.join(run_dir, "source.log"), alive, at_relayed)
        cpu1, sink1 = after
        client_cpu = out["client_cpu"] or 0.0  # smtp-source ends before the sink has everything
        res.others_cores = others.stop(cpu1 - cpu0 + sink1 - sink0 + client_cpu)
        m = args.messages
        res.accept_wall, res.relay_wall = out["accept_wall"], out["relay_wall"]
        res.server_cpu_ms = (cpu1 - cpu0) * 1000 / m
        res.sink_cpu_ms = (sink1 - sink0) * 1000 / m
        if out["client_cpu"] is not None:
            res.client_cpu_ms = out["client_cpu"] * 1000 / m
        errors = []
        if out["status"] is not None and out["status"] != 0:
            tail = _tail(os.path.join(run_dir, "source.log"), 400)
            errors.append(f"smtp-source exit {out['status']}: {tail.splitlines()[-1] if tail else ''}")
        elif out["status"] == 0:
            res.accepted_per_s = m / out["accept_wall"]
        if out["why"]:
            errors.append(out["why"])
        if out["relay_wall"] is not None:
            res.relayed_per_s = m / out["relay_wall"]
        else:
            got = out["count"] - base
            errors.append(f"partial: {got:,} of {m:,} relayed in {out['end_wall']:.1f}s "
                          f"({got / out['end_wall']:,.0f} msg/s)")
        # Stop the server (Postfix: `postfix stop`), then read the sink's final count: more than M = duplicates.
        died = not alive()
        if pf is not None:
            pf.stop()
        else:
            stop(hedwig)
        if died:
            errors.append("server died")
        res.notes = log_problems(log_path)
        time.sleep(0.05)
        res.delivered = counter.poll() - base
        if res.delivered > m:
            errors.append(f"the sink got {res.delivered:,} messages for {m:,} sent (duplicates)")
        res.error = "; ".join(errors)
        res.ok = not errors
    except RuntimeError as exc:
        res.error = str(exc)
    finally:
        if counter is not None:
            counter.close()
        if pf is not None:
            pf.stop()
        if hedwig is not None and hedwig.returncode is None:
            stop(hedwig)
        if sink is not None:
            stop(sink)
        if not res.ok or args.verbose:
            t = _tail(log_path)
            if t:
                print(f"--- {name} server log (tail) ---\n{t}\n---", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


def log_problems(path: str) -> list[str]:
    """Warning, error, fatal and panic lines of a server log (Hedwig logs at warn; Postfix's maillog_file)."""
    found = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                if re.search(r"warning|error|fatal|panic|critical", line, re.I):
                    found.append(line)
    except OSError:
        pass
    return found


def kill_all() -> None:
    for pf in list(_postfixes):
        pf.stop()
    ingest.kill_all()


# -- report --------------------------------------------------------------------


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
    df = _sh(["df", "-T", args.workdir]).splitlines()
    df_line = " ".join(df[-1].split()[:2]) + f" (mounted on {df[-1].split()[-1]})" if len(df) > 1 else "?"
    rev = _sh(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    try:
        import gevent
        gevent_v = gevent.__version__
    except Exception:
        gevent_v = "?"
    return [
        f"- nproc: {len(os.sched_getaffinity(0))} ({model}), memory {mem}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- scratch dir (spools, Postfix queues): `{args.workdir}` on {df_line}",
        f"- Python {platform.python_version()}, gevent {gevent_v}, "
        f"postfix {_sh(['dpkg-query', '-W', '-f=${Version}', 'postfix']) or '?'} "
        f"(mail_version {_sh([args.postconf, '-dh', 'mail_version']) or '?'}; smtp-source, smtp-sink, postfix), "
        f"hedwig at `{rev}`",
    ]


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _rng(xs: list[float]) -> str:
    return f"{min(xs):,.0f}–{max(xs):,.0f}" if len(xs) > 1 else "—"


def _key(r: Result) -> tuple[str, int | None, int, str]:
    return (r.server, r.workers, r.sessions, r.mode)


def _cells(results: list[Result]) -> list[tuple[tuple, list[Result]]]:
    """[(key, its results)], by sessions, mode, then server and workers."""
    order = {s: i for i, s in enumerate(ALL_SERVERS)}
    return sorted(ingest.cells(results, _key),
                  key=lambda c: (c[0][2], ALL_MODES.index(c[0][3]), order[c[0][0]], c[0][1] or 0))


def _mode(mode: str) -> str:
    return "-d" if mode == "d" else "per-conn"


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        "| server | workers | fsync | sessions | mode | accepted msg/s | relayed msg/s median | min–max "
        "| server CPU ms/msg | sink CPU ms/msg | client CPU ms/msg | others' CPU | peak RSS MiB | PSS MiB | delivered | errors |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, rs in _cells(results):
        acc = [r.accepted_per_s for r in rs if r.accepted_per_s]
        rel = [r.relayed_per_s for r in rs if r.ok and r.relayed_per_s]
        scpu = [r.server_cpu_ms for r in rs if r.ok and r.server_cpu_ms is not None]
        kcpu = [r.sink_cpu_ms for r in rs if r.ok and r.sink_cpu_ms is not None]
        ccpu = [r.client_cpu_ms for r in rs if r.ok and r.client_cpu_ms is not None]
        rss = [r.rss_mib for r in rs if r.rss_mib]
        pss = [r.pss_mib for r in rs if r.pss_mib]
        others = [r.others_cores for r in rs if r.others_cores is not None]
        dl = [r.delivered for r in rs if r.delivered is not None]
        if not dl:
            dl_s = "—"
        elif min(dl) == max(dl):
            dl_s = f"{dl[0]:,}/{args.messages:,}"
        else:
            dl_s = f"{min(dl):,}–{max(dl):,}/{args.messages:,}"
        errs = "; ".join(sorted({r.error for r in rs if r.error}))
        nbad = sum(1 for r in rs if not r.ok)
        err_s = f"{nbad}/{len(rs)} failed: {errs}" if errs else ""
        rows.append(
            f"| {k[0]} | {ingest.workers_label(k[1])} | {rs[0].fsync} | {k[2]} | {_mode(k[3])} "
            f"| {_fmt(_med(acc), ',.0f')} | {_fmt(_med(rel), ',.0f')} | {_rng(rel)} "
            f"| {_fmt(_med(scpu), '.3f')} | {_fmt(_med(kcpu), '.3f')} | {_fmt(_med(ccpu), '.3f')} "
            f"| {_fmt(max(others) if others else None, '.2f')} "
            f"| {_fmt(max(rss) if rss else None, ',.0f')} | {_fmt(max(pss) if pss else None, ',.0f')} "
            f"| {dl_s} | {err_s} |"
        )
    return "\n".join(rows)


def comparison(results: list[Result]) -> list[str]:
    """Hedwig against Postfix, cell by cell: relayed msg/s and server CPU per message (medians)."""
    def med(key: tuple, attr: str) -> float | None:
        return _med([getattr(r, attr) for r in results
                     if _key(r) == key and r.ok and getattr(r, attr) is not None])

    lines = []
    hedwigs = [k[:2] for k, _rs in _cells(results) if k[0] != "postfix"]
    for hedwig in dict.fromkeys(hedwigs):  # (server, workers), in table order
        parts = []
        for k, _rs in _cells(results):
            if k[:2] != hedwig:
                continue
            h, p = med(k, "relayed_per_s"), med(("postfix", None, k[2], k[3]), "relayed_per_s")
            hc, pc = med(k, "server_cpu_ms"), med(("postfix", None, k[2], k[3]), "server_cpu_ms")
            if h is None or p is None:
                continue
            cpu = f", CPU/msg {hc / pc:.2f}×" if hc and pc else ""
            parts.append(f"{k[2]} {_mode(k[3])}: {h / p:.2f}×{cpu}")
        if parts:
            lines.append(f"- {hedwig[0]} workers={hedwig[1]} / postfix, relayed msg/s (median): " + "; ".join(parts))
    return lines


def logging_note(results: list[Result]) -> list[str]:
    parts = []
    for k, rs in _cells(results):
        if k[0] != "postfix":
            continue
        xs = [r.logging_cpu_ms for r in rs if r.ok and r.logging_cpu_ms is not None]
        if xs:
            parts.append(f"{k[2]} {_mode(k[3])}: {statistics.median(xs):.3f}")
    if not parts:
        return []
    return ["- of postfix's server CPU, postlogd (writing its maillog_file, the work syslog would otherwise do "
            "outside Postfix's process tree) took, in ms/msg (median): " + "; ".join(parts)]


def report(results: list[Result], args: argparse.Namespace, started: str, load: tuple, facts: list[str],
           create: tuple[float, float]) -> str:
    load_end = os.getloadavg()
    hedwig_conf = HEDWIG_CONF.format(port="PORT", sink_port="SINKPORT", spool="SCRATCH/spool", workers="W",
                                     fsync="true|false", extra=hedwig_extra(args),
                                     dkim=hedwig_dkim(args, "SCRATCH/dkim-rsa2048.pem") + hedwig_redis(args))
    lines = [
        f"Command: `{args.command or _cmd([sys.executable, *sys.argv])}`",
        "",
        *facts,
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}",
        f"- creating a 1 KiB file in the scratch dir (open+write+close, mean of 500): {create[0]:.0f} µs at start, "
        f"{create[1]:.0f} µs at end",
        f"- {args.messages:,} messages of {args.size} bytes per run, {args.repeats} repeat(s), a fresh sink, "
        f"server and spool/queue per run, runs interleaved; smtp-source killed after {args.timeout:.0f} s, "
        f"relay wait bounded at {args.relay_timeout:.0f} s from the start of smtp-source; started {started}",
        f"- load generator: `{_cmd(source_argv(args, 64, 'conn', 0)).replace(':0', ':PORT')}` "
        "(per-conn; `-d` added for the -d rows)",
        f"- upstream: `{_cmd(sink_argv(args, 0)).replace(':0 ', ':SINKPORT ')}`, a fresh one per run",
        "- hedwig: `python hedwig.py serve --config FILE`, a master and W workers (the table's workers column), "
        "FILE =",
        "",
        "  ```toml",
        *["  " + ln if ln else "" for ln in hedwig_conf.rstrip().splitlines()],
        "  ```",
        "",
        f"- postfix: a private instance, `postfix -c SCRATCH/pfconf check`, then `start`, and `stop` after the run; "
        f"master.cf copied from `{args.postfix_master_cf}` with every `inet` service removed, "
        f"chroot = n for every service, and the smtpd line below; `postconf -c SCRATCH/pfconf -n`:",
        "",
        "  ```",
    ]
    if args.postfix_facts:
        postconf_n, master_inet, warnings = args.postfix_facts
        lines += ["  " + ln for ln in postconf_n.splitlines()]
        lines += ["  # master.cf:", "  " + master_inet.strip()]
        lines += ["  ```", ""]
        if warnings:
            lines += ["  `postfix check` warnings: " + " / ".join(f"`{w}`" for w in warnings[:5]), ""]
    else:
        lines += ["  (no postfix run)", "  ```", ""]
    lines += [
        table(results, args),
        "",
        *comparison(results),
        *logging_note(results),
        "",
        "accepted msg/s = messages / wall time of the smtp-source run. relayed msg/s = messages / time from the "
        "start of smtp-source until the sink had counted them all (median of the repeats; min–max across them). "
        "server CPU ms/msg = CPU time of the server's process tree (Postfix: master, its children and the "
        "children it reaped) from just before smtp-source started until the sink had every message, / messages; "
        "sink and client CPU likewise for smtp-sink and smtp-source. peak RSS = the largest sum of VmHWM over the "
        "server's process tree, sampled every 0.2 s; PSS = the sum of Pss (shared pages split among their sharers) "
        "over the tree when the sink had every message; both the largest across repeats. others' CPU = CPUs' "
        "worth of time the rest of the machine (other jobs) used during the run: the machine's busy time "
        "(/proc/stat) minus the server's, sink's, client's, the benchmark's own and the kernel threads', / wall "
        "time; the largest "
        "across repeats. "
        "delivered = the sink's count after the server "
        "stopped (min–max across repeats if they differ).",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description="Relayed msg/s (smtp-source -> server -> smtp-sink) of Hedwig and Postfix.")
    ingest.add_load_args(p, messages=10000, servers=ALL_SERVERS)
    p.add_argument("--relay-timeout", type=float, default=float(os.environ.get("BENCH_RELAY_TIMEOUT", 180)),
                   help="stop waiting for the sink this many seconds after smtp-source started (default 180)")
    p.add_argument("--stall", type=float, default=10.0,
                   help="after a failed smtp-source run, stop waiting once the sink was quiet this long (default 10)")
    p.add_argument("--pool-size", type=int, default=None, help="Hedwig [server] pool_size (default: Hedwig's)")
    p.add_argument("--delivery-concurrency", type=int, default=None,
                   help="Hedwig [server] delivery_concurrency (default: Hedwig's)")
    p.add_argument("--postfix-concurrency", type=int, default=64,
                   help="Postfix default_destination_concurrency_limit (default 64)")
    default_master = default_master_cf()
    p.add_argument("--postfix-master-cf", default=default_master,
                   help=f"master.cf to copy for the private instance (default {default_master})")
    ingest.add_run_args(p)
    p.add_argument("--redis", action="store_true", default=os.environ.get("BENCH_REDIS", "") not in ("", "0"),
                   help="Hedwig's rate limits on the Redis backend (a private redis-server; a limit never "
                        "reached, so each message costs one Redis decision); also BENCH_REDIS=1")
    p.add_argument("--dkim", action="store_true", default=os.environ.get("BENCH_DKIM", "") not in ("", "0"),
                   help="Hedwig signs every message with DKIM, RSA-2048 (a key made by `hedwig dkim-generate` "
                        "in the scratch dir); also BENCH_DKIM=1")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args()
    args.postfix_facts = None

    servers, modes, sessions, workers = ingest.parse_load_args(p, args, ALL_SERVERS)
    tools = [args.smtp_source, args.smtp_sink]
    if "postfix" in servers:
        tools += [args.postfix, args.postconf]
        if os.geteuid() != 0:
            p.error("the postfix server needs root (a private Postfix instance runs its master as root); "
                    "run as root or pick --servers hedwig-fsync,hedwig-nofsync")
        if not os.path.exists(args.postfix_master_cf):
            p.error(f"{args.postfix_master_cf} not found (--postfix-master-cf)")
    for tool in tools:
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} not found (apt-get install postfix, or run bench/relay.sh)")

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    facts: list[str] = []
    create_start = create_end = float("nan")
    results: list[Result] = []
    variants = ingest.server_variants(servers, workers)
    total = args.repeats * len(variants) * len(sessions) * len(modes)
    n = 0
    status = 0
    with ingest.Guard(args, "hedwig-relay.", kill_all) as guard:
        if "postfix" in servers:
            allow_postfix(args.workdir)
        facts = machine_facts(args)
        create_start = create_cost_us(args.workdir)
        if args.dkim:
            make_dkim_key(args)
        if args.redis:
            if ROOT not in sys.path:
                sys.path.insert(0, ROOT)
            from tests.support.redis_server import RedisServer

            redis_server = RedisServer().start()
            atexit.register(redis_server.stop)  # however the run ends
            args.redis_url = redis_server.url
        for rep in range(1, args.repeats + 1):
            order = variants if rep % 2 else list(reversed(variants))
            for sess in sessions:
                for mode in modes:
                    for name, w in order:
                        n += 1
                        r = measure(name, w, sess, mode, rep, args)
                        results.append(r)
                        acc = f"accepted {_fmt(r.accepted_per_s, '6,.0f')}"
                        rel = f"relayed {_fmt(r.relayed_per_s, '6,.0f')} msg/s"
                        cpu = f", server {r.server_cpu_ms:.3f} ms/msg" if r.server_cpu_ms is not None else ""
                        dl = f", delivered {r.delivered}" if r.delivered is not None else ""
                        rss = f", {r.rss_mib:.0f} MiB" if r.rss_mib else ""
                        walls = (f" ({_fmt(r.accept_wall, '.2f')}s / {_fmt(r.relay_wall, '.2f')}s)"
                                 if r.accept_wall is not None else "")
                        err = f" FAILED: {r.error}" if not r.ok else ""
                        print(f"[{n}/{total}] {name:14} w={ingest.workers_label(w):2} s={sess:<3} {mode:4} rep {rep}: "
                              f"{acc}, {rel}{cpu}{rss}{dl}"
                              f"{walls}{err}", file=sys.stderr, flush=True)
                        if r.notes:
                            print(f"    server log: {len(r.notes)} warning/error line(s), e.g.\n      "
                                  + "\n      ".join(r.notes[:3]), file=sys.stderr, flush=True)
                        if not r.ok:
                            status = 1
        create_end = create_cost_us(args.workdir)
        if args.redis:
            redis_server.stop()
    if guard.interrupted:
        status = 130
    if not results:
        return status or 1
    text = report(results, args, started, load, facts, (create_start, create_end))
    print(text)
    if args.write_results:
        title = ("relay" + (" — DKIM RSA-2048 on" if args.dkim else "")
                 + (" — rate limits on Redis" if args.redis else "") + (f" — {args.title}" if args.title else ""))
        ingest.append_results(args.results, title, text)
    return status


if __name__ == "__main__":
    sys.exit(main())
