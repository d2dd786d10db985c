# Helpers the benchmark scripts here source; they need METRICS_BASE_PORT (the
# dev cluster's `--metrics-base-port`).

# Node N's (0, 1, 2) Prometheus metrics.
metrics() { curl -s "127.0.0.1:$((METRICS_BASE_PORT + $1))/metrics"; }

# Waits until no node's compactions have written for 10 s (at most 15 min) and
# prints how long that took.
settle() {
  local t0 last="" quiet=0 now
  t0=$(date +%s)
  while ((quiet < 10 && $(date +%s) - t0 < 900)); do
    now=$(for i in 0 1 2; do metrics $i | grep '^cairn_lsm_compaction_write_bytes '; done | tr '\n' ' ')
    if [[ "$now" == "$last" ]]; then quiet=$((quiet + 1)); else quiet=0; last=$now; fi
    sleep 1
  done
  echo "settled after $(($(date +%s) - t0)) s"
}
