#!/bin/bash
# Every issue 7 workload, one after another, from a clean checkout of REV
# (default HEAD) in /var/tmp/hedwig-bench-wt, so uncommitted work is not
# measured. Each report is appended to OUT/issue7-<workload>.md (default
# OUT=/var/tmp); this prints the table rows as they come. ~16 minutes on the
# 2-CPU development VM. Run it on a quiet machine: check `uptime` first.
#
#   bash bench/issue7.sh [REV] [OUT]
set -u
REV=${1:-HEAD}
OUT=${2:-/var/tmp}
WT=/var/tmp/hedwig-bench-wt
cd "$(dirname "$0")/.." && git worktree remove --force $WT 2>/dev/null; git worktree prune; git worktree add --detach $WT $REV >/dev/null 2>&1
cd $WT
run() { echo "=== $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg) pytest=$(pgrep -fc 'pytest' ) : $1"; shift; "$@" 2>&1 | grep -E "^\| (hedwig|aiosmtpd|smtp-sink|postfix|worker VmRSS holding|probes accepted)" ; }
run ingest1k env BENCH_MESSAGES=10000 BENCH_SESSIONS=64 BENCH_SERVERS='hedwig-fsync aiosmtpd-fsync smtp-sink' bash bench/run.sh --results $OUT/issue7-ingest1k.md --write-results --title 'ingest, 1 KiB, 64 sessions, workers 1 and 2 beside aiosmtpd and smtp-sink'
run relay1k env BENCH_MESSAGES=10000 BENCH_SESSIONS=64 BENCH_SERVERS='hedwig-fsync postfix' bash bench/relay.sh --results $OUT/issue7-relay1k.md --write-results --title 'relay, 1 KiB, 64 sessions, workers 1 and 2 beside Postfix'
run dkim env BENCH_MESSAGES=10000 BENCH_SESSIONS=64 BENCH_SERVERS=hedwig-fsync BENCH_DKIM=1 bash bench/relay.sh --results $OUT/issue7-dkim.md --write-results --title 'relay with DKIM RSA-2048 on, 64 sessions, workers 1 and 2'
run latency bash bench/latency.sh --results $OUT/issue7-latency.md --write-results --title '64 sessions, 1 KiB, workers 1 and 2 beside Postfix and aiosmtpd'
run ingest100k env BENCH_MESSAGES=3000 BENCH_SESSIONS=64 BENCH_SIZE=102400 BENCH_SERVERS='hedwig-fsync aiosmtpd-fsync' bash bench/run.sh --results $OUT/issue7-ingest100k.md --write-results --title 'ingest, 100 KiB messages, 64 sessions, workers 1 and 2 beside aiosmtpd'
run relay100k env BENCH_MESSAGES=3000 BENCH_SESSIONS=64 BENCH_SIZE=102400 BENCH_SERVERS='hedwig-fsync postfix' bash bench/relay.sh --results $OUT/issue7-relay100k.md --write-results --title 'relay, 100 KiB messages, 64 sessions, workers 1 and 2 beside Postfix'
run idle bash bench/idle.sh --results $OUT/issue7-idle.md --write-results --title '10,000 idle connections, one worker'
echo "=== done $(date -u +%H:%M:%S)"
