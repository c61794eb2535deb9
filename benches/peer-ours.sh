#!/usr/bin/env bash
# Starts headroom in the "ours" slot of a side-by-side peer benchmark (nginx, HAProxy, ...).
# Reads the harness's PB_* environment (listen address, backends, weights, workers, run dir),
# writes a config there and execs the release binary in the foreground. Build it first, and again
# after any `cargo bench` (which leaves a build with unwinding panics at the same path):
#   cargo build --release
#   OURS_CMD='exec <repo>/benches/peer-ours.sh' peerbench -w "fast infer"
# HEADROOM_DEFAULTS=1 keeps what the default config has on and the peers' configs leave out: the
# access log (one line per request, to the harness's log file) and active health checks of
# every backend every 2 s (PB_HEALTH_PATH).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cfg="${PB_RUN_DIR:?}/headroom.toml"
IFS=, read -ra backends <<< "${PB_BACKENDS:?}"
IFS=, read -ra weights <<< "${PB_WEIGHTS:-}"
{
  echo "[server]"
  echo "listen = [\"${PB_LISTEN:?}\"]"
  echo "workers = ${PB_WORKERS:-1}"
  if [ -n "${HEADROOM_DEFAULTS:-}" ]; then
    echo "access_log = true"
  else
    echo "access_log = false             # as the peers run: no request logging"
  fi
  echo "[admin]"
  echo "listen = \"127.0.0.1:$(( ${PB_PORT:?} + 1000 ))\""
  echo "[pools.default]"
  echo "balance = \"${HEADROOM_BALANCE:-least_conn}\""
  echo "max_inflight_per_backend = 100000"
  if [ -n "${HEADROOM_DEFAULTS:-}" ]; then
    printf '[pools.default.health]\npath = "%s"\ninterval = "2s"\n' "${PB_HEALTH_PATH:-/health}"
  fi
  for i in "${!backends[@]}"; do
    echo "[[pools.default.backends]]"
    echo "addr = \"${backends[$i]}\""
    echo "weight = ${weights[$i]:-1}"
  done
} > "$cfg"
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/headroom" --config "$cfg"
