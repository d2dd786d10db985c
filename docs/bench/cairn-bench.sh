#!/bin/bash
# One Cairn pass of the kv bench workloads against a fresh dev cluster, then stop it.
# Usage (from the repository root, after `cargo build --release`):
#   docs/bench/cairn-bench.sh            # KV_SERVER and KV may name other binaries
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KV_SERVER=${KV_SERVER:-$ROOT/target/release/kv-server}
KV_BIN=${KV:-$ROOT/target/release/kv}
D=$(mktemp -d /tmp/cairnbench.XXXX)
cd "$D"
"$KV_SERVER" dev --base-port 27301 > dev.log 2>&1 &
DEV=$!
sleep 4
K="$KV_BIN --dev-dir $D/cairn-data"
for c in 1 16 64 256; do
  k=$(( c < 16 ? c : 16 ))
  $K bench put -c $c --conns $k --duration 10 -w json
done
$K bench get -c 64 --conns 16 --duration 10 -w json
$K bench get -c 64 --conns 16 --duration 10 --consistency s -w json
kill -INT $DEV; wait $DEV
rm -rf "$D"
