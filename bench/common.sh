# Shared by the bench/*.sh wrappers; sourced, not run. A wrapper sets
#
#     BENCH_NAME    its own name, for messages and the recorded command ("run.sh")
#     BENCH_SCRIPT  the Python benchmark it runs ("bench/ingest.py")
#     BENCH_PREFIX  the scratch directory's mktemp prefix ("hedwig-bench")
#     BENCH_VARS    the environment settings to record with the command
#     BENCH_POSTFIX 1 if it needs /usr/sbin/postfix (a private instance), not
#                   only smtp-source and smtp-sink
#     BENCH_PYTHON_CHECK, BENCH_REQUIREMENTS
#                   a Python import line that must work, and the requirements
#                   file to pip install if it does not
#
# and then calls `bench_main "$@"`, which records the command as given, installs
# what is missing (Debian's `postfix` package, leaving no Postfix daemon running
# or enabled; the requirements), makes a scratch directory with `mktemp -d`
# under $BENCH_DIR (default /var/tmp), runs the script with --workdir and
# --command, and always removes the scratch directory.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}

log() { echo "$BENCH_NAME: $*" >&2; }

# The command as it was given, with the settings that came from the environment.
shq() { if [[ $1 =~ ^[A-Za-z0-9_./=:,+@-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi; }
bench_cmdline() {
    local cmdline="bash bench/$BENCH_NAME" a v
    for a in "$@"; do cmdline+=" $(shq "$a")"; done
    for v in $BENCH_VARS; do
        if [[ -n "${!v:-}" ]]; then cmdline="$v=$(shq "${!v}") $cmdline"; fi
    done
    printf '%s' "$cmdline"
}

# smtp-source, smtp-sink (and postfix) from Debian's package; no daemon left running or enabled.
bench_install_postfix() {
    local need_postfix=${BENCH_POSTFIX:-0} master_before=0
    if [[ -x /usr/sbin/smtp-source && -x /usr/sbin/smtp-sink && ( $need_postfix -eq 0 || -x /usr/sbin/postfix ) ]]; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "smtp-source, smtp-sink or postfix is missing; install them as root: apt-get install -y postfix"; exit 2
    fi
    pgrep -x master >/dev/null && master_before=1
    log "installing postfix (smtp-source, smtp-sink, and the binaries for private instances)"
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
}

bench_install_python() {
    if ! "$PYTHON" -c "$BENCH_PYTHON_CHECK" 2>/dev/null; then
        log "installing $BENCH_REQUIREMENTS"
        "$PYTHON" -m pip install -q -r "$BENCH_REQUIREMENTS"
    fi
}

bench_main() {
    local cmdline workdir status=0
    cmdline=$(bench_cmdline "$@")
    bench_install_postfix
    bench_install_python
    workdir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/$BENCH_PREFIX.XXXXXX")
    # A private Postfix's user must traverse it to reach its queue and data directories.
    if [[ ${BENCH_POSTFIX:-0} -eq 1 ]]; then chmod 711 "$workdir"; fi
    BENCH_CHILD=""
    BENCH_WORKDIR=$workdir
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM HUP
    log "scratch directory $workdir ($(df -T "$workdir" | awk 'NR==2 {print $2}'))"
    "$PYTHON" "$BENCH_SCRIPT" --workdir "$workdir" --command "$cmdline" "$@" &
    BENCH_CHILD=$!
    wait "$BENCH_CHILD" || status=$?
    BENCH_CHILD=""
    exit "$status"
}

bench_cleanup() {
    trap '' INT TERM HUP   # a second signal (timeout(1) signals the whole group) must not cut the cleanup short
    if [[ -n "$BENCH_CHILD" ]] && kill -0 "$BENCH_CHILD" 2>/dev/null; then
        kill -TERM "$BENCH_CHILD" 2>/dev/null || true   # the script stops its servers, sinks and Postfix instances
        wait "$BENCH_CHILD" 2>/dev/null || true
    fi
    rm -rf "$BENCH_WORKDIR"
}
