#!/usr/bin/env bash
# Idle-connections benchmark, one command from the repo root:
#
#     bash bench/idle.sh [idle.py flags...]
#
# Opens BENCH_CONNECTIONS (10000) connections to one Hedwig worker, holds
# them, sends normal messages through it meanwhile, and reports the worker's
# RSS (bench/idle.py). Run it as root, or with a hard open-file limit above
# the connection count: the client and the worker each hold one descriptor
# per connection. The wrapper's work is in bench/common.sh.
#
# Settings (environment, or the idle.py flag in brackets):
#   BENCH_CONNECTIONS  idle connections to hold   (--connections, default 10000)
#   BENCH_DIR          parent of the scratch directory (default /var/tmp)
# Add --write-results to append the report to bench/RESULTS.md.

BENCH_NAME=idle.sh
BENCH_SCRIPT=bench/idle.py
BENCH_PREFIX=hedwig-idle
BENCH_VARS="BENCH_DIR BENCH_CONNECTIONS"
BENCH_POSTFIX=0
BENCH_PYTHON_CHECK="import gevent, dkim, dns, prometheus_client, docopt, cryptography, nacl"
BENCH_REQUIREMENTS=requirements.txt
source "$(dirname "$0")/common.sh"
bench_main "$@"
