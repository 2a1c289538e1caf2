#!/usr/bin/env bash
# Relay benchmark, one command from the repo root (as root: it runs a private Postfix):
#
#     bash bench/relay.sh [relay.py flags...]
#
# Measures messages relayed per second, smtp-source -> server -> smtp-sink, all
# on 127.0.0.1, for Hedwig (1 worker, fsync on and off) and a private Postfix
# instance relaying to the same kind of sink. Installs what is missing
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

set -euo pipefail

cd "$(dirname "$0")/.."

# Record the command as it was given, with the settings that came from the environment.
shq() { if [[ $1 =~ ^[A-Za-z0-9_./=:,+@-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi; }
cmdline="bash bench/relay.sh"
for a in "$@"; do cmdline+=" $(shq "$a")"; done
for v in BENCH_DKIM BENCH_DIR BENCH_RELAY_TIMEOUT BENCH_TIMEOUT BENCH_MODES BENCH_SERVERS BENCH_SIZE BENCH_REPEATS \
         BENCH_SESSIONS BENCH_MESSAGES; do
    if [[ -n "${!v:-}" ]]; then cmdline="$v=$(shq "${!v}") $cmdline"; fi
done

PYTHON=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}

log() { echo "relay.sh: $*" >&2; }

# --- smtp-source / smtp-sink / postfix ----------------------------------------------
if [[ ! -x /usr/sbin/smtp-source || ! -x /usr/sbin/smtp-sink || ! -x /usr/sbin/postfix ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        log "smtp-source, smtp-sink or postfix is missing; install them as root: apt-get install -y postfix"; exit 2
    fi
    master_before=0
    pgrep -x master >/dev/null && master_before=1
    log "installing postfix (smtp-source, smtp-sink, and the binaries for the private instances)"
    # "No configuration": the package installs without a main.cf, so it has nothing to start.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y postfix >/dev/null || { apt-get update >/dev/null && apt-get install -y postfix >/dev/null; }
    if [[ $master_before -eq 0 ]] && pgrep -x master >/dev/null; then
        log "postfix master started by the install: stopping it"
        postfix stop >/dev/null 2>&1 || true
        sleep 1
    fi
    # Leave the system daemon disabled at boot, whichever init system this is.
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now postfix >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null; then
        update-rc.d postfix disable >/dev/null 2>&1 || true
    fi
    if [[ $master_before -eq 0 ]] && pgrep -x master >/dev/null; then
        log "warning: a postfix master process is still running (pgrep -x master)"
    fi
fi

# --- Python side: Hedwig's runtime ---------------------------------------------------
if ! "$PYTHON" -c 'import gevent, dkim, dns, prometheus_client, docopt, cryptography, nacl' 2>/dev/null; then
    log "installing requirements.txt (Hedwig's runtime)"
    "$PYTHON" -m pip install -q -r requirements.txt
fi

# --- scratch directory ----------------------------------------------------------
workdir=$(mktemp -d "$BENCH_DIR/hedwig-relay.XXXXXX")
# The postfix user must be able to traverse it to reach its queue and data directories.
chmod 711 "$workdir"
child=""
cleanup() {
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true   # relay.py stops its servers, sinks and Postfix instances
        wait "$child" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

log "scratch directory $workdir ($(df -T "$workdir" | awk 'NR==2 {print $2}'))"
"$PYTHON" bench/relay.py --workdir "$workdir" --command "$cmdline" "$@" &
child=$!
status=0
wait "$child" || status=$?
child=""
exit "$status"
