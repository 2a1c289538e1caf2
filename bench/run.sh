#!/usr/bin/env bash
# Ingest benchmark, one command from the repo root:
#
#     bash bench/run.sh [ingest.py flags...]
#
# Installs what is missing (Postfix's smtp-source/smtp-sink from Debian's
# `postfix` package, with no Postfix daemon left running or enabled; aiosmtpd
# and Hedwig's runtime from requirements-dev.txt), makes a scratch directory
# with `mktemp -d` under $BENCH_DIR (default /var/tmp), runs bench/ingest.py
# and removes the scratch directory. Everything listens on 127.0.0.1 only.
#
# Settings (environment, or the ingest.py flag in brackets):
#   BENCH_MESSAGES  messages per run               (--messages, default 20000)
#   BENCH_SESSIONS  concurrent sessions, a list     (--sessions, default "16 64")
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

set -euo pipefail

cd "$(dirname "$0")/.."

# Record the command as it was given, with the settings that came from the environment.
shq() { if [[ $1 =~ ^[A-Za-z0-9_./=:,+@-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi; }
cmdline="bash bench/run.sh"
for a in "$@"; do cmdline+=" $(shq "$a")"; done
for v in BENCH_DIR BENCH_TIMEOUT BENCH_MODES BENCH_SERVERS BENCH_SIZE BENCH_REPEATS BENCH_SESSIONS BENCH_MESSAGES; do
    if [[ -n "${!v:-}" ]]; then cmdline="$v=$(shq "${!v}") $cmdline"; fi
done

PYTHON=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}

log() { echo "run.sh: $*" >&2; }

# --- smtp-source / smtp-sink ------------------------------------------------
if [[ ! -x /usr/sbin/smtp-source || ! -x /usr/sbin/smtp-sink ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        log "smtp-source is missing; install it as root: apt-get install -y postfix"; exit 2
    fi
    master_before=0
    pgrep -x master >/dev/null && master_before=1
    log "installing postfix (for /usr/sbin/smtp-source and smtp-sink only)"
    # "No configuration": the package installs without a main.cf, so it has nothing to start.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y postfix >/dev/null || { apt-get update >/dev/null && apt-get install -y postfix >/dev/null; }
    if [[ $master_before -eq 0 ]] && pgrep -x master >/dev/null; then
        log "postfix master started by the install: stopping it"
        postfix stop >/dev/null 2>&1 || true
        sleep 1
    fi
    # Leave the daemon disabled at boot, whichever init system this is.
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now postfix >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null; then
        update-rc.d postfix disable >/dev/null 2>&1 || true
    fi
    if [[ $master_before -eq 0 ]] && pgrep -x master >/dev/null; then
        log "warning: a postfix master process is still running (pgrep -x master)"
    fi
fi

# --- Python side: Hedwig's runtime and aiosmtpd -------------------------------
if ! "$PYTHON" -c 'import gevent, aiosmtpd' 2>/dev/null; then
    log "installing requirements-dev.txt (aiosmtpd, Hedwig's runtime)"
    "$PYTHON" -m pip install -q -r requirements-dev.txt
fi

# --- scratch directory ----------------------------------------------------------
# /var/tmp by default: on the machine this was written on, creating a file under
# /tmp or /work costs ~300 µs per inode while /var/tmp is fast; see RESULTS.md.
workdir=$(mktemp -d "$BENCH_DIR/hedwig-bench.XXXXXX")
child=""
cleanup() {
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

log "scratch directory $workdir ($(df -T "$workdir" | awk 'NR==2 {print $2}'))"
"$PYTHON" bench/ingest.py --workdir "$workdir" --command "$cmdline" "$@" &
child=$!
status=0
wait "$child" || status=$?
child=""
exit "$status"
