#!/usr/bin/env bash
# Restart benchmark, one command from the repo root:
#
#     bash bench/restart.sh [restart.py flags...]
#
# Fills a spool with BENCH_MESSAGES (100000) queued messages through
# hedwig.spool, then starts Hedwig on copies of it and measures the time to
# the 220, the time to the first delivery at an smtp-sink and the worker's
# RSS (bench/restart.py), with the spool in the page cache and out of it.
# The wrapper's work is in bench/common.sh.
#
# Settings (environment, or the restart.py flag in brackets):
#   BENCH_MESSAGES  queued messages   (--messages, default 100000)
#   BENCH_DIR       parent of the scratch directory (default /var/tmp)
# Add --write-results to append the report to bench/RESULTS.md.

BENCH_NAME=restart.sh
BENCH_SCRIPT=bench/restart.py
BENCH_PREFIX=hedwig-restart
BENCH_VARS="BENCH_DIR BENCH_MESSAGES"
BENCH_POSTFIX=0
BENCH_PYTHON_CHECK="import gevent, dkim, dns, prometheus_client, docopt, cryptography, nacl"
BENCH_REQUIREMENTS=requirements.txt
source "$(dirname "$0")/common.sh"
bench_main "$@"
