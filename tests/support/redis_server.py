"""A real Redis for tests: Debian's `redis-server` on 127.0.0.1, no persistence.

    with RedisServer() as r:          # a private server on a free port
        r.url                         # redis://127.0.0.1:PORT/0
        r.stop(); r.start()           # an outage, then the same port again (empty: no persistence)

`shared_redis_url()` is the server .ci/run starts for the whole run
(HEDWIG_TEST_REDIS_URL), or None; tests that only need some Redis use it
when it is there and a private one otherwise, and tests that stop Redis
always use a private one. Start and stop are bounded in time.

Must not: import gevent or hedwig.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

HOST = "127.0.0.1"
BINARY = "redis-server"


def shared_redis_url() -> str | None:
    return os.environ.get("HEDWIG_TEST_REDIS_URL") or None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} not found: apt-get install -y redis-server (.ci/run does)")
        self.port = port or _free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [BINARY, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
