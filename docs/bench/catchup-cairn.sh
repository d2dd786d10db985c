#!/bin/bash
# Follower catch-up after restart: Cairn's side of
# ../shared/tools/etcd-bench/catchup-etcd.sh. Starts a fresh dev cluster (default
# settings: the leader releases its log 10,000 entries behind the applied index, so
# a follower that was away gets a snapshot), stops one follower (SIGTERM), writes
# KEYS keys of VALUE_SIZE bytes through the two others with `kv bench`, restarts the
# follower and measures how long until it has applied the leader's index; then
# prints the phases from the nodes' logs.
# Usage (from the repository root, after `cargo build --release`):
#   docs/bench/catchup-cairn.sh          # KEYS, VALUE_SIZE, C, KV_SERVER, KV may be set;
#                                        # KEEP=1 keeps the cluster folder (about 2 GB)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KV_SERVER=${KV_SERVER:-$ROOT/target/release/kv-server}
KV_BIN=${KV:-$ROOT/target/release/kv}
KEYS=${KEYS:-200000}
VALUE_SIZE=${VALUE_SIZE:-1024}
C=${C:-64}
PORT=${PORT:-28301}
D=$(mktemp -d /tmp/catchup.XXXX)
cd "$D"
"$KV_SERVER" dev --base-port "$PORT" > dev.log 2>&1 &
DEV=$!
cleanup() {
    kill -INT "$DEV" 2>/dev/null || true
    wait "$DEV" 2>/dev/null || true
    [[ -n "${FPID:-}" ]] && kill -TERM "$FPID" 2>/dev/null && wait "$FPID" 2>/dev/null
    if [[ -n "${KEEP:-}" ]]; then echo "cluster folder: $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
kvd() { "$KV_BIN" --dev-dir "$D/cairn-data" "$@"; }
status() { # status ID FIELD (STATUS_TIMEOUT: seconds, default 5)
    kvd --endpoints "127.0.0.1:$((PORT + $1 - 1))" --timeout "${STATUS_TIMEOUT:-5}" endpoint status -w json 2>/dev/null | jq -r ".endpoints[0].$2"
}
for _ in $(seq 100); do
    L=$(status 1 leader || true)
    [[ "$L" =~ ^[1-3]$ ]] && break
    sleep 0.2
done
F=$((L % 3 + 1))
O=$((F % 3 + 1))
FPID=$(pgrep -f -- "--id $F .*--data-dir" | head -1)
tr '\0' '\n' < "/proc/$FPID/cmdline" > follower.args
echo "$("$KV_SERVER" --version 2>/dev/null || echo kv-server); keys=$KEYS value_size=$VALUE_SIZE C=$C"
echo "leader=node-$L stopped follower=node-$F"
kill -TERM "$FPID"
while kill -0 "$FPID" 2>/dev/null; do sleep 0.1; done
FPID=""
kvd --endpoints "127.0.0.1:$((PORT + L - 1)),127.0.0.1:$((PORT + O - 1))" \
    bench put --total "$KEYS" --value-size "$VALUE_SIZE" -c "$C" --conns 16 -w json
LIDX=$(status "$L" applied)
echo "leader after writes: applied=$LIDX first_index=$(status "$L" first_index) state_bytes=$(status "$L" state_bytes) wal_bytes=$(status "$L" wal_bytes)"
du -sh cairn-data/node-*/ | tr '\n' ' '
echo
LOGLINES=$(wc -l < "cairn-data/node-$F.log")
LEADERLINES=$(wc -l < "cairn-data/node-$L.log")
T0=$EPOCHREALTIME
echo "restart at $(date -u -d "@$T0" +%H:%M:%S.%N)"
mapfile -t ARGS < follower.args
"${ARGS[@]}" >> "cairn-data/node-$F.log" 2>&1 &
FPID=$!
# Polling the follower: a `kv endpoint status` begins every 0.1 s (at most four
# at once), each with a short timeout (QUIC ignores the port-unreachable of a node
# not yet listening, so an attempt made before the restarted follower listens would
# otherwise wait for the client's 1 s connect timeout; TCP, and etcd's script, learn
# of a closed port at once). The time of a poll is when its answer is printed, not
# when its `kv` exits (a `kv` that reached a node waits up to 250 ms more so that
# its close reaches the node); etcd's script likewise stops its clock at an answer.
# The poll and this loop start no process but `kv` and `sleep` (the time, the
# field and the test are bash's own): until 2026-12-07 each poll also ran `date`,
# `jq` and `bc` and each round `awk`, `sort` and `head`, and a profile of a
# catch-up put 21% of the machine's CPU during the transfer in them.
poll() { # appends "<seconds since the epoch> <applied>" to polls.txt
    kvd --endpoints "127.0.0.1:$((PORT + F - 1))" --timeout 0.3 endpoint status -w json 2>/dev/null | {
        IFS= read -r -d '' -n 1 first || exit 0
        t=$EPOCHREALTIME
        IFS= read -r -d '' rest || true # (the end of the input ends this read)
        [[ "$first$rest" =~ \"applied\":\ *([0-9]+) ]] && echo "$t ${BASH_REMATCH[1]}" >> polls.txt
    }
}
: > polls.txt
POLLS=()
DONE=""
while :; do
    RUNNING=0
    for p in "${POLLS[@]}"; do kill -0 "$p" 2>/dev/null && RUNNING=$((RUNNING + 1)); done
    if ((RUNNING < 4)); then
        poll &
        POLLS+=($!)
    fi
    sleep 0.1
    while read -r _ a; do if ((a >= LIDX)); then DONE=1; fi; done < polls.txt
    [[ -n "$DONE" ]] && break
    if ((${EPOCHREALTIME%.*} - ${T0%.*} > 600)); then
        echo "the follower did not catch up within 600 s"
        exit 1
    fi
done
for p in "${POLLS[@]}"; do wait "$p" 2>/dev/null || true; done
awk -v t0="$T0" '{ printf "%.3f %s\n", $1 - t0, $2 }' polls.txt | sort -g > polls-since-restart.txt
FIRST=$(head -1 polls-since-restart.txt)
DONE=$(awk -v l="$LIDX" '$2 >= l { print $1; exit }' polls-since-restart.txt)
A=$(awk -v l="$LIDX" '$2 >= l { print $2; exit }' polls-since-restart.txt)
STATUS_TIMEOUT=5
printf 'follower first answered status after %.2f s; caught up (applied %s >= %s) after %.2f s (%d polls)\n' \
    "${FIRST%% *}" "$A" "$LIDX" "$DONE" "$(wc -l < polls.txt)"
echo "follower snapshots installed: $(status "$F" snapshots_installed), deltas: $(status "$F" deltas_installed)"
echo "leader log since the restart:"
tail -n +"$((LEADERLINES + 1))" "cairn-data/node-$L.log" | grep -iE 'checkpoint|snapshot|delta' | head -20
echo "follower log since the restart:"
tail -n +"$((LOGLINES + 1))" "cairn-data/node-$F.log" | grep -iE 'recover|open|snapshot|delta|install|leader changed|start' | head -30
du -sh cairn-data/node-*/ | tr '\n' ' '
echo
