#!/bin/bash
# One pass of an A/B comparison: a fresh dev cluster of the kv-server binary given,
# three kv bench workloads, stop. Alternate the binaries: ab.sh A; ab.sh B; ab.sh A; ab.sh B.
# Usage (from the repository root): docs/bench/ab.sh path/to/kv-server   (KV may name the kv binary)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SERVER=$1
KV_BIN=${KV:-$ROOT/target/release/kv}
D=$(mktemp -d /tmp/ab.XXXX)
cd "$D"
"$SERVER" dev --base-port 27501 > dev.log 2>&1 &
DEV=$!
sleep 4
K="$KV_BIN --dev-dir $D/cairn-data"
$K bench put -c 256 --conns 16 --duration 10 -w json
$K bench put -c 16 --conns 16 --duration 10 -w json
$K bench get -c 64 --conns 16 --duration 10 -w json
kill -INT $DEV; wait $DEV
rm -rf "$D"
