#!/usr/bin/env bash
# Relay benchmark, one command from the repo root (as root: it runs a private Postfix):
#
#     bash bench/relay.sh [relay.py flags...]
#
# Measures messages relayed per second, smtp-source -> server -> smtp-sink, all
# on 127.0.0.1, for Hedwig (1 and 2 workers, fsync on and off) and a private Postfix
# instance relaying to the same kind of sink. The wrapper's work is in
# bench/common.sh. Installs what is missing
# (Postfix's smtp-source/smtp-sink from Debian's `postfix` package, with no
# system Postfix daemon left running or enabled; Hedwig's runtime from
# requirements.txt), makes a scratch directory with `mktemp -d` under
# $BENCH_DIR (default /var/tmp), runs bench/relay.py and removes the scratch
# directory. The private Postfix instances live in that directory (their own
# main.cf, master.cf and queue) and are stopped after each run; /etc/postfix
# and port 25 are never touched.
#
# Settings (environment, or the relay.py flag in brackets):
#   BENCH_MESSAGES       messages per run                 (--messages, default 10000)
#   BENCH_SESSIONS       concurrent sessions, a list       (--sessions, default "16 64")
#   BENCH_WORKERS        Hedwig's `workers`, a list        (--workers, default "1 2"; a row each)
#   BENCH_SIZE           message payload bytes             (--size, default 1024)
#   BENCH_REPEATS        runs per cell; median, min–max    (--repeats, default 3)
#   BENCH_SERVERS        "all" or a list of hedwig-fsync hedwig-nofsync postfix
#                                                          (--servers, default all)
#   BENCH_MODES          conn (1 msg/connection), d (smtp-source -d)  (--modes, default "conn,d")
#   BENCH_TIMEOUT        seconds before smtp-source is killed           (--timeout, default 120)
#   BENCH_RELAY_TIMEOUT  seconds from the start of smtp-source to wait for the sink
#                                                          (--relay-timeout, default 180)
#   BENCH_DKIM           1: Hedwig signs every message, DKIM RSA-2048   (--dkim, default off)
#   BENCH_DIR            parent of the scratch directory (default /var/tmp)
#   PYTHON               interpreter (default python3)
# Add --write-results to append the report to bench/RESULTS.md.
#
# Example: BENCH_MESSAGES=2000 BENCH_REPEATS=1 bash bench/relay.sh

BENCH_NAME=relay.sh
BENCH_SCRIPT=bench/relay.py
BENCH_PREFIX=hedwig-relay
BENCH_VARS="BENCH_DKIM BENCH_DIR BENCH_RELAY_TIMEOUT BENCH_TIMEOUT BENCH_MODES BENCH_SERVERS BENCH_SIZE BENCH_REPEATS \
    BENCH_WORKERS BENCH_SESSIONS BENCH_MESSAGES"
BENCH_POSTFIX=1
BENCH_PYTHON_CHECK="import gevent, dkim, dns, prometheus_client, docopt, cryptography, nacl"
BENCH_REQUIREMENTS=requirements.txt
source "$(dirname "$0")/common.sh"
bench_main "$@"
