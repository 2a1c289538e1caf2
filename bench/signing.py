"""DKIM signing throughput on one core: Hedwig's signer beside plain dkimpy.

(Named like hedwig/signing.py, and for the same reason: a bench/dkim.py would
shadow dkimpy's `import dkim` for every script in bench/.)

For a message of --size bytes (default 4 KiB: a few typical header fields and a
text body of 76-byte lines), each of these is timed in one process pinned to
one CPU (--cpu, default the first allowed), for at least --seconds per run,
--repeats runs each (median and min–max reported, runs interleaved):

  hedwig rsa-2048      hedwig.signing.Signer.sign(): Hedwig's own DKIM format
                       code (relaxed/relaxed only), the RSA private-key
                       operation in OpenSSL via `cryptography`
  dkimpy rsa-2048      dkim.sign(message, ..., PEM key): dkimpy's pure-Python RSA
  hedwig ed25519       Signer.sign() with an ed25519 key (`cryptography`'s Ed25519)
  dkimpy ed25519       dkim.sign(..., signature_algorithm=b"ed25519-sha256")
  openssl rsa-2048     the bare RSA-2048 PKCS#1 v1.5 signature of a digest through
                       `cryptography`: the ceiling of any RSA signer on this CPU

Both signers sign the same header set (SPEC §6), relaxed/relaxed; the first
signature of each is checked with dkim.verify before timing, and Hedwig's is
checked to be dkimpy's byte for byte (both with the same fixed t=). The report
says signatures/s and µs per signature, and the fixed cost outside the RSA
operation (hedwig rsa-2048 µs minus openssl rsa-2048 µs).

    python bench/signing.py [--size 4096] [--seconds 3] [--repeats 3] [--cpu N]
                         [--write-results] [--title WORDS]

The target (issue 5): at least 2,000 RSA-2048 signatures/s on one core for a
4 KiB message through Hedwig's path.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.dont_write_bytecode = True

import dkim  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed  # noqa: E402

from hedwig.signing import SIGNED_HEADERS, Signer, dns_record  # noqa: E402

SELECTOR, DOMAIN = "bench", "example.test"
CASES = ["hedwig rsa-2048", "dkimpy rsa-2048", "hedwig ed25519", "dkimpy ed25519", "openssl rsa-2048"]


def make_message(size: int) -> bytes:
    head = (b"Received: from client.example.test (client.example.test [192.0.2.1])\r\n"
            b"\tby mx.example.test with ESMTP id 01HZZZZZZZZZZZZZZZZZZZZZZZ;\r\n"
            b"\tMon, 01 Jan 2024 00:00:00 +0000\r\n"
            b"From: Alice Example <alice@example.test>\r\n"
            b"To: Bob Example <bob@dest.example>\r\n"
            b"Subject: Quarterly report, with the figures you asked for\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <01HZZZZZZZZZZZZZZZZZZZZZZZ@example.test>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"\r\n")
    words = b"the quick brown fox jumps over the lazy dog, and keeps running.".split()
    lines, line, i = [], b"", 0
    while len(head) + sum(len(x) + 2 for x in lines) < size:
        word = words[i % len(words)]
        i += 1
        if len(line) + len(word) + 1 > 76:
            lines.append(line)
            line = b""
        line = line + b" " + word if line else word
    message = head + b"\r\n".join(lines) + b"\r\n"
    return message[:size - 2] + b"\r\n" if len(message) > size else message


def signers(message: bytes) -> dict[str, Callable[[], object]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    ed_seed = base64.b64encode(ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption()))
    ours_rsa, ours_ed = Signer(DOMAIN, SELECTOR, rsa_key), Signer(DOMAIN, SELECTOR, ed_key)
    headers = [name.lower() for name in (line.split(b":", 1)[0] for line in message.split(b"\r\n\r\n")[0]
                                         .split(b"\r\n") if line[:1] not in (b" ", b"\t"))
               if name.lower() in SIGNED_HEADERS]

    def plain(pem: bytes, algorithm: bytes) -> Callable[[], bytes]:
        return lambda: dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), pem, signature_algorithm=algorithm,
                                 canonicalize=(b"relaxed", b"relaxed"), include_headers=headers) + message

    digest = b"\x5a" * 32
    cases: dict[str, Callable[[], object]] = {
        "hedwig rsa-2048": lambda: ours_rsa.sign(message),
        "dkimpy rsa-2048": plain(rsa_pem, b"rsa-sha256"),
        "hedwig ed25519": lambda: ours_ed.sign(message),
        "dkimpy ed25519": plain(ed_seed, b"ed25519-sha256"),
        "openssl rsa-2048": lambda: rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())),
    }
    for name, key in (("rsa-2048", rsa_key), ("ed25519", ed_key)):
        txt = "".join(dns_record(SELECTOR, DOMAIN, key).split('"')[1::2]).encode()
        for who in ("hedwig", "dkimpy"):
            signed = cases[f"{who} {name}"]()
            assert isinstance(signed, bytes)
            if not dkim.verify(signed, dnsfunc=lambda _name, timeout=5, txt=txt: txt):
                raise SystemExit(f"bench/signing.py: {who} {name}: the signature does not verify")
        same_t = Signer(DOMAIN, SELECTOR, key, clock=lambda: 1_700_000_000)
        real_time, dkim.time = dkim.time, types.SimpleNamespace(time=lambda: 1_700_000_000)
        try:
            if same_t.sign(message) != cases[f"dkimpy {name}"]():
                raise SystemExit(f"bench/signing.py: hedwig {name}: not dkimpy's signature byte for byte")
        finally:
            dkim.time = real_time
    return cases


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """(signatures per second of CPU time, count) over at least `seconds` of wall time."""
    fn()
    n = 0
    wall_end = time.perf_counter() + seconds
    cpu0 = time.process_time()
    while True:
        for _ in range(10):
            fn()
        n += 10
        if time.perf_counter() >= wall_end:
            break
    cpu = time.process_time() - cpu0
    return n / cpu, n


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description="DKIM signatures/s on one core: Hedwig's signer and plain dkimpy.")
    p.add_argument("--size", type=int, default=4096, help="message bytes, headers included (default 4096)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum wall time per run (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs per case; median and min–max (default 3)")
    p.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--write-results", action="store_true", help="append the report to --results")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    p.add_argument("--title", default="", help="extra words for the RESULTS.md heading")
    args = p.parse_args()
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in chosen:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})

    message = make_message(args.size)
    cases = signers(message)
    load = os.getloadavg()
    runs: dict[str, list[float]] = {c: [] for c in chosen}
    for rep in range(args.repeats):
        for name in (chosen if rep % 2 == 0 else list(reversed(chosen))):
            per_s, n = rate(cases[name], args.seconds if "dkimpy rsa" not in name else max(args.seconds, 2.0))
            runs[name].append(per_s)
            print(f"run {rep + 1}/{args.repeats} {name:17} {per_s:9,.0f} signatures/s ({n} signed)",
                  file=sys.stderr, flush=True)
    load_end = os.getloadavg()

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    import cryptography
    n_lines = message.count(b"\r\n")
    lines = [
        f"Command: `{shlex.join(['python', 'bench/signing.py', *sys.argv[1:]])}`",
        "",
        f"- CPU: {model}, pinned to CPU {cpu} (nproc {os.cpu_count()}); kernel {platform.release()}",
        f"- Python {platform.python_version()}, dkimpy {_version('dkimpy')}, cryptography {cryptography.__version__}, "
        f"PyNaCl {_version('PyNaCl')}, hedwig at `{git_rev()}`",
        f"- message: {len(message)} bytes ({n_lines} lines), headers signed: "
        "from:to:subject:date:message-id:mime-version:content-type; relaxed/relaxed",
        f"- {args.repeats} run(s) of at least {args.seconds:g} s per case, interleaved; rate = signatures / CPU "
        "seconds of this process",
        f"- load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}",
        "",
        "| signer | signatures/s median | min–max | µs per signature |",
        "|---|---:|---:|---:|",
    ]
    med = {name: statistics.median(xs) for name, xs in runs.items()}
    for name in chosen:
        xs = runs[name]
        lines.append(f"| {name} | {med[name]:,.0f} | {min(xs):,.0f}–{max(xs):,.0f} | {1e6 / med[name]:,.0f} |")
    lines.append("")
    if "hedwig rsa-2048" in med and "dkimpy rsa-2048" in med:
        lines.append(f"- hedwig / dkimpy, RSA-2048: {med['hedwig rsa-2048'] / med['dkimpy rsa-2048']:.1f}×")
    if "hedwig rsa-2048" in med and "openssl rsa-2048" in med:
        fixed = 1e6 / med["hedwig rsa-2048"] - 1e6 / med["openssl rsa-2048"]
        lines.append(f"- hedwig RSA-2048 = {1e6 / med['openssl rsa-2048']:,.0f} µs of OpenSSL RSA + "
                     f"{fixed:,.0f} µs of Hedwig's DKIM format work (parsing, canonicalisation, hashes, "
                     "tags, folding) in Python")
    if "hedwig rsa-2048" in med:
        verdict = "met" if med["hedwig rsa-2048"] >= 2000 else "NOT met"
        lines.append(f"- target ≥ 2,000 RSA-2048 signatures/s on one core for {len(message)} bytes: {verdict}")
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        heading = f"## {stamp} — DKIM signing" + (f" — {args.title}" if args.title else "")
        with open(args.results, "a") as f:
            f.write(f"\n{heading}\n\n{text}\n")
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
