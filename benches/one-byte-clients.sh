#!/usr/bin/env bash
# Capacity with 5,000 clients that sent one byte of the h2 preface and stopped, against the same
# run with 5,000 idle connections: a release headroom (one worker, CPU 0) in front of the mock
# backend, `headroom load --concurrency 16` on CPU 1, alternating rounds. Prints, per round,
# req/s and headroom's CPU time per request (user + system, from /proc): the CPU figure is the
# steadier one on a shared machine, since req/s also moves with the neighbours' load. Ends with
# the medians and "capacity one-byte vs idle" = idle CPU per request / one-byte CPU per request
# (1.0: the one-byte clients cost nothing). HEADROOM_BIN (default: a fresh `cargo build
# --release`), CONNS, ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-5000}
ROUNDS=${ROUNDS:-2}
if [ -z "${HEADROOM_BIN:-}" ]; then
  cargo build --release -q
  HEADROOM_BIN=target/release/headroom
fi
ulimit -n $((CONNS + 4096))
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
proxy=$(port); admin=$(port); backend=$(port)
cat > "$dir/headroom.toml" <<T
[server]
listen = ["127.0.0.1:$proxy"]
workers = 1
access_log = false
request_header_timeout = "60s"
[admin]
listen = "127.0.0.1:$admin"
[pools.default]
max_inflight_per_backend = 256
[[pools.default.backends]]
addr = "127.0.0.1:$backend"
T
"$HEADROOM_BIN" mock-backend --listen "127.0.0.1:$backend" --capacity 256 --ttft 0ms --token-interval 0ms --tokens 1 >/dev/null 2>&1 &
taskset -c 0 "$HEADROOM_BIN" --config "$dir/headroom.toml" >/dev/null 2>&1 &
hr=$!
sleep 1
# CPU seconds (user + system) of the headroom process so far.
cpu() { awk -v t="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / t }' "/proc/$hr/stat"; }
: > "$dir/rounds"
for _ in $(seq "$ROUNDS"); do
  for mode in idle one-byte; do
    python3 benches/hold-conns.py "$proxy" "$CONNS" "$mode" 12 >/dev/null &
    hold=$!
    sleep 4
    c0=$(cpu)
    taskset -c 1 "$HEADROOM_BIN" load "http://127.0.0.1:$proxy/v1/chat/completions" --concurrency 16 --duration 5s --json >"$dir/out.json"
    c1=$(cpu)
    read -r rps us < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(round(r["throughput"], 1), round((float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / max(r["ok"], 1), 2))' "$dir/out.json" "$c0" "$c1")
    echo "$mode: $rps req/s, $us us CPU/request with $CONNS such connections open"
    echo "$mode $rps $us" >> "$dir/rounds"
    kill "$hold" 2>/dev/null; wait "$hold" 2>/dev/null || true
    sleep 1
  done
done
python3 - "$dir/rounds" <<'M'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {m: (statistics.median(float(r[1]) for r in rows if r[0] == m), statistics.median(float(r[2]) for r in rows if r[0] == m)) for m in ("idle", "one-byte")}
print(f"medians: idle {med['idle'][0]:.0f} req/s, {med['idle'][1]:.2f} us/request; one-byte {med['one-byte'][0]:.0f} req/s, {med['one-byte'][1]:.2f} us/request")
print(f"capacity one-byte vs idle: {med['idle'][1] / med['one-byte'][1]:.3f}")
M
