#!/usr/bin/env bash
# TLS cost, measured side by side in one run: the same headroom build serving plaintext and TLS
# (a self-signed ECDSA P-256 certificate from `headroom gen-cert`) in front of the same mock
# backend, under the same wrk load, in alternating rounds.
#   - keep-alive: req/s and p99 over TLS vs plaintext (the per-request cost of TLS records);
#   - new connection per request (Connection: close): full TLS handshakes per second.
# Needs wrk (Debian: apt-get install wrk) and a release build (cargo build --release).
# Pinning as in the peer benchmark: proxy on CPU 0, backend and wrk on CPU 1.
# Env: ROUNDS (3), DURATION (10s), CONNS (64), HEADROOM_BIN (the release build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-"$repo/target/release/headroom"}
rounds=${ROUNDS:-3} duration=${DURATION:-10s} conns=${CONNS:-64}
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }
# `cargo bench` leaves a build with unwinding panics and the dev-dependencies' features at the
# same path; rebuild the release profile (a no-op when it is current) unless a binary was given.
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

"$bin" gen-cert --out "$dir" --names localhost,127.0.0.1 >/dev/null
taskset -c 1 "$bin" mock-backend --listen 127.0.0.1:18201 >/dev/null 2>&1 & pids+=($!)
write_config() { # port admin_port tls?
  {
    echo "[server]"; echo "listen = [\"127.0.0.1:$1\"]"; echo "workers = 1"
    if [ "$3" = tls ]; then echo "[server.tls]"; echo "cert = \"$dir/dev.crt\""; echo "key = \"$dir/dev.key\""; fi
    echo "[admin]"; echo "listen = \"127.0.0.1:$2\""
    echo "[pools.default]"; echo "max_inflight_per_backend = 100000"
    echo "[[pools.default.backends]]"; echo "addr = \"127.0.0.1:18201\""
  } > "$dir/$1.toml"
}
write_config 18210 18211 plain
write_config 18220 18221 tls
RUST_LOG=warn taskset -c 0 "$bin" --config "$dir/18210.toml" & pids+=($!)
RUST_LOG=warn taskset -c 0 "$bin" --config "$dir/18220.toml" & pids+=($!)
for port in 18211 18221; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
done
curl -sf --cacert "$dir/dev.crt" https://localhost:18220/ >/dev/null || { echo "TLS listener not answering" >&2; exit 1; }

# Prints "req/s p99_ms" for one wrk run.
run() { # url [extra wrk args...]
  local url=$1; shift
  taskset -c 1 timeout 60 wrk -t1 -c"$conns" -d"$duration" --latency "$@" "$url" 2>/dev/null |
    awk '/Requests\/sec/ {rps=$2} /^ +99%/ {v=$2; if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; p99=v} END {printf "%.0f %.2f\n", rps, p99}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A rps p99
for r in $(seq "$rounds"); do
  # Alternate the order each round so neither side is always first.
  if (( r % 2 )); then order="plain tls plain-close tls-close"; else order="tls-close plain-close tls plain"; fi
  for t in $order; do
    case $t in
      plain) out=$(run http://127.0.0.1:18210/) ;;
      tls) out=$(run https://127.0.0.1:18220/) ;;
      plain-close) out=$(run http://127.0.0.1:18210/ -H "Connection: close") ;;
      tls-close) out=$(run https://127.0.0.1:18220/ -H "Connection: close") ;;
    esac
    rps[$t]+="${out% *} "; p99[$t]+="${out#* } "
    echo "round $r $t: ${out% *} req/s, p99 ${out#* } ms"
  done
done
echo
printf "%-12s %10s %10s\n" target "req/s" "p99 ms"
for t in plain tls plain-close tls-close; do
  printf "%-12s %10s %10s\n" "$t" "$(tr ' ' '\n' <<< "${rps[$t]}" | grep . | median)" "$(tr ' ' '\n' <<< "${p99[$t]}" | grep . | median)"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
tls=$(tr ' ' '\n' <<< "${rps[tls]}" | grep . | median); plain=$(tr ' ' '\n' <<< "${rps[plain]}" | grep . | median)
tlsc=$(tr ' ' '\n' <<< "${rps[tls-close]}" | grep . | median); plainc=$(tr ' ' '\n' <<< "${rps[plain-close]}" | grep . | median)
echo
echo "keep-alive: TLS = $(ratio "$tls" "$plain")x plaintext req/s"
echo "new connection per request: $tlsc TLS handshakes/s = $(ratio "$tlsc" "$plainc")x plaintext connections/s"
