#!/usr/bin/env bash
# Ingest benchmark, one command from the repo root:
#
#     bash bench/run.sh [ingest.py flags...]
#
# The wrapper's work is in bench/common.sh. Installs what is missing (Postfix's smtp-source/smtp-sink from Debian's
# `postfix` package, with no Postfix daemon left running or enabled; aiosmtpd
# and Hedwig's runtime from requirements-dev.txt), makes a scratch directory
# with `mktemp -d` under $BENCH_DIR (default /var/tmp), runs bench/ingest.py
# and removes the scratch directory. Everything listens on 127.0.0.1 only.
#
# Settings (environment, or the ingest.py flag in brackets):
#   BENCH_MESSAGES  messages per run               (--messages, default 20000)
#   BENCH_SESSIONS  concurrent sessions, a list     (--sessions, default "16 64")
#   BENCH_WORKERS   Hedwig's `workers`, a list      (--workers, default "1 2"; a row each)
#   BENCH_SIZE      message payload bytes           (--size, default 1024)
#   BENCH_REPEATS   runs per cell; median, min–max  (--repeats, default 3)
#   BENCH_SERVERS   "all" or a list of hedwig-fsync hedwig-nofsync aiosmtpd-fsync
#                   aiosmtpd-nofsync smtp-sink      (--servers, default all)
#   BENCH_MODES     conn (1 msg/connection), d (smtp-source -d)  (--modes, default "conn,d")
#   BENCH_TIMEOUT   seconds before a run is killed  (--timeout, default 120)
#   BENCH_DIR       parent of the scratch directory (default /var/tmp)
#   PYTHON          interpreter (default python3)
# Add --write-results to append the report to bench/RESULTS.md.
#
# Example: BENCH_MESSAGES=2000 BENCH_REPEATS=1 bash bench/run.sh

BENCH_NAME=run.sh
BENCH_SCRIPT=bench/ingest.py
BENCH_PREFIX=hedwig-bench
BENCH_VARS="BENCH_DIR BENCH_TIMEOUT BENCH_MODES BENCH_SERVERS BENCH_SIZE BENCH_REPEATS BENCH_WORKERS BENCH_SESSIONS BENCH_MESSAGES"
BENCH_POSTFIX=0
BENCH_PYTHON_CHECK="import gevent, aiosmtpd"
BENCH_REQUIREMENTS=requirements-dev.txt
source "$(dirname "$0")/common.sh"
bench_main "$@"
