#!/bin/bash
# Does the compaction threads' priority matter to the put p99? Fills a fresh
# 3-node dev cluster step by step (1M puts of 1 KiB per step, as grow.sh), and
# at the steps listed in AB runs, in rotation, ROUNDS times, the settled
# default put workload (wait until no node's compactions have written for 10 s,
# then `kv bench put --duration 20 -c 256 --conns 16`) with each node's
# compaction threads set from outside to each of MODES:
#   normal: nice 0, best-effort I/O class;  io: idle I/O class (ionice -c 3);
#   cpu: nice 10 (renice -n 10);  both: the two.
# After each run it prints each node's log fsync quantiles (over about the last
# minute), slowdowns, stall seconds and compaction bytes.
# Usage: compaction-priority.sh path/to/kv-server path/to/kv STEPS [PUTS_PER_STEP]
# (AB default "1 10", ROUNDS default 3, MODES default "normal io cpu both"; needs
# renice and ionice, and root to renice back to 0). Used 2026-12-07, docs/benchmarks.md,
# "Compaction threads at a lower CPU priority".
set -u
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"
SERVER=$1; KVB=$2; STEPS=$3; PUTS=${4:-1000000}; AB=${AB:-"1 10"}; ROUNDS=${ROUNDS:-3}
MODES=${MODES:-"normal io cpu both"}
D=$(mktemp -d /tmp/grow.XXXX); cd "$D"
METRICS_BASE_PORT=27901
CAIRN_QUOTA_BYTES=17179869184 "$SERVER" dev --base-port 27601 --metrics-base-port $METRICS_BASE_PORT > dev.log 2>&1 &
DEV=$!
sleep 4
K="$KVB --dev-dir $D/cairn-data"
tids() { for p in $(pgrep -P "$DEV"); do grep -l '^lsm-compact' /proc/$p/task/*/comm | awk -F/ '{print $5}'; done; }
setmode() {
  for t in $(tids); do
    case $1 in
      normal) renice -n 0 -p $t >/dev/null; ionice -c 2 -n 4 -p $t ;;
      io) renice -n 0 -p $t >/dev/null; ionice -c 3 -p $t ;;
      cpu) renice -n 10 -p $t >/dev/null; ionice -c 2 -n 4 -p $t ;;
      both) renice -n 10 -p $t >/dev/null; ionice -c 3 -p $t ;;
    esac
  done
}
for step in $(seq 1 "$STEPS"); do
  echo "== step $step $(date +%T)"
  setmode normal
  $K bench put --total "$PUTS" --value-size 1024 -c 256 --conns 16 -w json | tail -1
  if [[ " $AB " == *" $step "* ]]; then
    for r in $(seq 1 $ROUNDS); do
      for m in $MODES; do
        settle
        setmode $m
        echo "mode $m round $r $(date +%T) tids $(tids | tr '\n' ' ')"
        $K bench put --duration 20 -c 256 --conns 16 -w json | tail -1
        for i in 0 1 2; do metrics $i | grep -E '^cairn_wal_fsync_seconds\{quantile="(0.99|0.999|1)"|^cairn_lsm_(slowdowns|stall_seconds|compaction_write_bytes) ' | tr '\n' ' '; echo; done
      done
    done
  fi
  for n in "$D"/cairn-data/*/; do printf '%s %s bytes\n' "$(basename "$n")" "$(du -sb "$n" | cut -f1)"; done
done
kill -INT $DEV
while kill -0 $DEV 2>/dev/null; do sleep 1; done
rm -rf "$D"
