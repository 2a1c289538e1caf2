"""What a blocking read costs a gevent server, three ways: the server CPU per round trip.

A gevent StreamServer answers "NOOP" lines from 64 connections that a plain
client process (this file with --client: epoll, no gevent) keeps busy, one
line in flight per connection, until --round-trips replies came back. The
server's reads are:

  timeout    sock.settimeout(300) and recv(): gevent starts and cancels a
             Timeout (a timer) around every wait -- what hedwig/session.py did
  none       settimeout(None) and recv(): no Timeout; recv() is tried first,
             fails with EAGAIN (a syscall and an exception), then waits
  waitfirst  settimeout(None), wait until readable, then recv() -- what
             session.py does now after it sent a reply

    python bench/recv_wait.py [--round-trips 200000] [--repeats 3]

Prints, per mode, the median over the repeats of round trips per second and
the server's user and system CPU per round trip (getrusage of this process,
which runs nothing else). Loopback only; every run ends after --round-trips
or 60 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

CONNECTIONS = 64
MODES = ("timeout", "none", "waitfirst")


def client(port: int, round_trips: int) -> None:
    import select
    import socket

    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
    poller = select.epoll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
        s.send(b"NOOP\r\n")
    done = 0
    deadline = time.monotonic() + 60
    while done < round_trips and time.monotonic() < deadline:
        for fd, _ in poller.poll(1.0):
            s = by_fd[fd]
            s.recv(100)
            done += 1
            s.send(b"NOOP\r\n")
    for s in socks:
        s.close()


def server(mode: str, round_trips: int) -> tuple[float, float, float]:
    from gevent.server import StreamServer

    def handle(sock, _address) -> None:  # type: ignore[no-untyped-def]
        sock.settimeout(300 if mode == "timeout" else None)
        try:
            while True:
                if mode == "waitfirst":
                    sock._wait(sock._read_event)  # gevent's own wait, as session.py uses it
                if not sock.recv(65536):
                    return
                sock.send(b"250 2.0.0 OK\r\n")
        except OSError:
            return

    srv = StreamServer(("127.0.0.1", 0), handle)
    srv.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--client", str(srv.server_port), str(round_trips)])
    import gevent

    while proc.poll() is None:
        gevent.sleep(0.02)
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    srv.stop(timeout=1)
    return (round_trips / elapsed, (after.ru_utime - before.ru_utime) / round_trips * 1e6,
            (after.ru_stime - before.ru_stime) / round_trips * 1e6)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--round-trips", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # one measurement, in a fresh patched process
        from gevent import monkey

        monkey.patch_all()
        print(*server(args.mode, args.round_trips))
        return
    print(f"{CONNECTIONS} connections, {args.round_trips:,} round trips, median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.2f} at start")
    print("| read | round trips/s | server user µs/rt | server sys µs/rt |")
    print("|---|---:|---:|---:|")
    runs: dict[str, list[tuple[float, ...]]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drift hits every mode alike
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--round-trips",
                                  str(args.round_trips)], capture_output=True, text=True, timeout=120)
            runs[mode].append(tuple(float(x) for x in out.stdout.split()))
    for mode in MODES:
        rate, user, system = (statistics.median(col) for col in zip(*runs[mode]))
        print(f"| {mode} | {rate:,.0f} | {user:.1f} | {system:.1f} |")


if __name__ == "__main__":
    main()
