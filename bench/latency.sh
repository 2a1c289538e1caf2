#!/usr/bin/env bash
# Accept-latency benchmark, one command from the repo root (as root, for the private Postfix):
#
#     bash bench/latency.sh [latency.py flags...]
#
# p50/p90/p99 time from the final dot to the 250 under --sessions concurrent
# sessions (bench/latency.py's own asyncio client), for Hedwig (1 and 2
# workers, relaying to smtp-sink), a private Postfix relaying to smtp-sink and
# the aiosmtpd peer, closed loop and at a fixed offered rate. The wrapper's
# work (installing Debian's `postfix` package and requirements-dev.txt, the
# scratch directory under $BENCH_DIR) is in bench/common.sh.
#
# Settings (environment, or the latency.py flag in brackets):
#   BENCH_MESSAGES  messages per run                        (--messages, default 10000)
#   BENCH_SESSIONS  concurrent sessions                     (--sessions, default 64)
#   BENCH_RATES     offered msg/s, a list; 0 = closed loop  (--rates, default "0 500")
#   BENCH_WORKERS   Hedwig's `workers`, a list              (--workers, default "1 2")
#   BENCH_SERVERS   "all" or hedwig-fsync postfix aiosmtpd-fsync  (--servers)
#   BENCH_SIZE      message bytes                           (--size, default 1024)
#   BENCH_REPEATS   runs per cell                           (--repeats, default 3)
#   BENCH_TIMEOUT   seconds before a run is given up        (--timeout, default 120)
#   BENCH_DIR       parent of the scratch directory (default /var/tmp)
# Add --write-results to append the report to bench/RESULTS.md.

BENCH_NAME=latency.sh
BENCH_SCRIPT=bench/latency.py
BENCH_PREFIX=hedwig-latency
BENCH_VARS="BENCH_DIR BENCH_TIMEOUT BENCH_SERVERS BENCH_SIZE BENCH_REPEATS BENCH_WORKERS BENCH_RATES BENCH_SESSIONS BENCH_MESSAGES"
BENCH_POSTFIX=1
BENCH_PYTHON_CHECK="import gevent, dkim, dns, prometheus_client, docopt, cryptography, nacl, aiosmtpd"
BENCH_REQUIREMENTS=requirements-dev.txt
source "$(dirname "$0")/common.sh"
bench_main "$@"
