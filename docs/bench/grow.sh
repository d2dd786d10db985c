#!/bin/bash
# Grows a fresh 3-node dev cluster step by step and prints, after each step,
# the put figures, each node's folder size and each node process's peak RSS.
# Usage (from the repository root): docs/bench/grow.sh path/to/kv-server STEPS [PUTS_PER_STEP]
# (KV may name the kv binary; CAIRN_QUOTA_BYTES raises the nodes' quota; with
# METRICS_BASE_PORT set, the nodes serve metrics there and each step also prints
# every node's LSM figures (write amplification, slowdowns, stall seconds, levels),
# its p99 and p99.9 of the writes it answered (`cairn_request_seconds`, over about
# the last minute) and its largest log fsyncs;
# with RATE set, each step is followed by RATE_SECONDS (default 20, plus 2 of
# warm-up) of the same puts offered at RATE per second, open loop, whose
# latencies count from when each put was due: `kv bench put --rate`;
# with DEFAULT_SECONDS set, each step ends with that many seconds (plus 2 of
# warm-up) of `kv bench put`'s default workload, 256-byte values at C=256 over
# 16 connections, closed loop: the issue's put workload at each state size.
# With SETTLE set to a list of step numbers (and METRICS_BASE_PORT), those steps then
# wait until no node's compactions have written for 10 s (at most 15 min), print how
# long that took, and run the default workload again: the same state size without the fill's
# compaction backlog.
# Each step also prints what the disk holding the data did during it, from
# /proc/diskstats: requests, bytes and average size of reads and writes.)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SERVER=$1
STEPS=$2
PUTS=${3:-1000000}
KV_BIN=${KV:-$ROOT/target/release/kv}
D=$(mktemp -d /tmp/grow.XXXX)
cd "$D"
"$SERVER" dev --base-port 27601 ${METRICS_BASE_PORT:+--metrics-base-port "$METRICS_BASE_PORT"} > dev.log 2>&1 &
DEV=$!
sleep 4
K="$KV_BIN --dev-dir $D/cairn-data"
DISK=$(basename "$(findmnt -no SOURCE --target "$D")")
disk() { awk -v d="$DISK" '$3 == d {print $4, $6, $8, $10}' /proc/diskstats; }
# shellcheck source=common.sh
. "$ROOT/docs/bench/common.sh"
default_puts() { $K bench put --duration "${DEFAULT_SECONDS:-20}" -c 256 --conns 16 -w json | tail -1; }
for step in $(seq 1 "$STEPS"); do
  echo "== step $step $(date +%T)"
  read -r r0 rs0 w0 ws0 < <(disk)
  $K bench put --total "$PUTS" --value-size 1024 -c 256 --conns 16 -w json | tail -1
  if [[ -n "${RATE:-}" ]]; then
    # The same puts offered at a fixed rate (open loop): latency at a load
    # every step can carry, rather than at each step's own saturation.
    $K bench put --rate "$RATE" --duration "${RATE_SECONDS:-20}" --value-size 1024 -c 256 --conns 16 -w json | tail -1
  fi
  if [[ -n "${DEFAULT_SECONDS:-}" ]]; then
    default_puts
  fi
  read -r r1 rs1 w1 ws1 < <(disk)
  if [[ " ${SETTLE:-} " == *" $step "* && -n "${METRICS_BASE_PORT:-}" ]]; then
    settle
    default_puts
  fi
  echo "disk $DISK: reads $((r1 - r0)) ($(((rs1 - rs0) / 2048)) MiB, $(((rs1 - rs0) / 2 / (r1 - r0 + 1))) KiB each)," \
    "writes $((w1 - w0)) ($(((ws1 - ws0) / 2048)) MiB, $(((ws1 - ws0) / 2 / (w1 - w0 + 1))) KiB each)"
  sleep 2
  $K endpoint status -w json 2>/dev/null | tr ',' '\n' | grep -E '"(applied|state_bytes)"' | tr '\n' ' '
  echo
  for n in "$D"/cairn-data/*/; do printf '%s %s bytes\n' "$(basename "$n")" "$(du -sb "$n" | cut -f1)"; done
  if [[ -n "${METRICS_BASE_PORT:-}" ]]; then
    for i in 0 1 2; do
      printf 'node-%s metrics: ' $((i + 1))
      metrics $i |
        grep -E '^cairn_lsm_(write_amplification|slowdowns|stall_seconds|compaction_write_bytes|flush_bytes|level_bytes)|^cairn_request_seconds\{kind="write",quantile="0.99|^cairn_wal_fsync_seconds\{quantile="(0.999|1)"' |
        sed -E 's/^cairn_lsm_//; s/\{level="([^"]*)"\}/_\1/' | awk '{printf "%s=%s ", $1, $2}'
      echo
    done
  fi
  for p in $(pgrep -P "$DEV"); do
    printf 'pid %s %s %s\n' "$p" "$(grep VmHWM /proc/"$p"/status | tr -s ' ')" "$(grep VmRSS /proc/"$p"/status | tr -s ' ')"
  done
done
kill -INT $DEV
while kill -0 $DEV 2>/dev/null; do sleep 1; done
rm -rf "$D"
