"""The peer in the ingest benchmark: aiosmtpd storing each message maildir-style.

Every accepted message is written to `SPOOL/tmp/<uuid>`, fsynced, renamed to
`SPOOL/new/<uuid>`, and the `new/` directory is fsynced; only then does the
client get `250 OK`. That is the classic per-message durable write that Hedwig's
group-committed log is compared against. The blocking part runs in a thread
pool (`loop.run_in_executor`), so concurrent sessions' fsyncs overlap, as a fair
peer would do. `--no-fsync` skips both fsyncs (write + rename only).

    python bench/aiosmtpd_peer.py --port 2600 --spool /var/tmp/x [--no-fsync] [--threads 64]

Runs until SIGTERM or SIGINT. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import uuid

from aiosmtpd.smtp import SMTP


class MaildirHandler:
    def __init__(self, spool: str, fsync: bool) -> None:
        self.tmp = os.path.join(spool, "tmp")
        self.new = os.path.join(spool, "new")
        self.fsync = fsync
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        os.makedirs(self.new, mode=0o700, exist_ok=True)

    def _store(self, data: bytes) -> None:
        name = uuid.uuid4().hex
        tmp_path = os.path.join(self.tmp, name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(self.new, name))
        if self.fsync:
            dfd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    async def handle_DATA(self, server, session, envelope) -> str:
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._store, data)
        except OSError:
            logging.exception("store failed")
            return "451 4.3.0 Local error in processing"
        return "250 OK"


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=args.threads))
    handler = MaildirHandler(args.spool, fsync=not args.no_fsync)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench.test", data_size_limit=26214400),
        host=args.host, port=args.port, backlog=1024, reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        server.close()
        await server.wait_closed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--no-fsync", action="store_true", help="write and rename only, no fsync")
    p.add_argument("--threads", type=int, default=64, help="executor threads (default 64)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
