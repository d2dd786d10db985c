#!/bin/bash
# One Cairn pass: a fresh dev cluster, the kv bench workloads, stop.
set -u
D=$(mktemp -d /tmp/cairnbench.XXXX)
cd "$D"
/tmp/fresh/target/release/kv-server dev --base-port 27301 > dev.log 2>&1 &
DEV=$!
sleep 4
K="/work/main/target/release/kv --dev-dir $D/cairn-data"
for c in 1 16 64 256; do
  k=$(( c < 16 ? c : 16 ))
  $K bench put -c $c --conns $k --duration 10 -w json
done
$K bench get -c 64 --conns 16 --duration 10 -w json
$K bench get -c 64 --conns 16 --duration 10 --consistency s -w json
$K endpoint status --cluster -w json | head -c 300; echo
kill -INT $DEV; wait $DEV
echo "dir $D"
