"""The master's little HTTP door: GET /healthz, /readyz and /metrics.

The master runs no gevent hub and no threads (it forks workers at any time,
and a fork must not copy greenlets or a half-held lock), so this is plain
blocking code on the standard library's own socket class: the master's
select() loop says a listening socket is readable, `serve_one()` accepts one
connection, reads its request line within READ_TIMEOUT, writes one response
and closes. Probes and scrapes are small and rare; a client that trickles
costs the master at most READ_TIMEOUT.

Routes map a path to a function returning (status, content type, body).

Must not: import gevent's patched socket, or know what healthy means (the
master decides; this only speaks HTTP/1.0).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from gevent import monkey

from .config import HttpBind

log = logging.getLogger(__name__)

_Socket = monkey.get_original("socket", "socket")  # the blocking stdlib class, patched or not
READ_TIMEOUT = 1.0
MAX_REQUEST = 8192

Response = tuple[int, str, bytes]
Routes = dict[str, Callable[[], Response]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            500: "Internal Server Error", 503: "Service Unavailable"}


def bind_http(where: HttpBind):  # type: ignore[no-untyped-def]
    """A listening, non-blocking socket for `where` (raises OSError)."""
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = _Socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where.host, where.port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def text(status: int, body: str) -> Response:
    return status, "text/plain; charset=utf-8", body.encode()


def serve_one(listening, routes: Routes) -> None:  # type: ignore[no-untyped-def]
    """Accept one waiting connection (if any), answer it, close it."""
    try:
        fd, _peer = listening._accept()  # accept() would wrap it in the patched class
    except (BlockingIOError, InterruptedError):
        return
    with _Socket(fileno=fd) as conn:
        conn.settimeout(READ_TIMEOUT)
        try:
            request = _read_head(conn)
            status, ctype, body = _route(request, routes)
            head = (f"HTTP/1.0 {status} {_REASONS.get(status, 'Status')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            conn.sendall(head.encode("ascii") + body)
        except OSError:
            pass  # the client went away or was too slow: its problem


def _read_head(conn) -> bytes:  # type: ignore[no-untyped-def]
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(2048)
        if not chunk:
            break
        data += chunk
    return data


def _route(request: bytes, routes: Routes) -> Response:
    line = request.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split()
    if len(parts) < 2:
        return text(400, "bad request\n")
    method, target = parts[0], parts[1]
    handler = routes.get(target.split("?", 1)[0])
    if handler is None:
        return text(404, "not found\n")
    if method not in ("GET", "HEAD"):
        return text(405, "GET only\n")
    try:
        status, ctype, body = handler()
    except Exception:  # noqa: BLE001 - a probe must never take the master down
        log.exception("http %s failed", target)
        return text(500, "internal error\n")
    return status, ctype, b"" if method == "HEAD" else body
