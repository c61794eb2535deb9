#!/usr/bin/env bash
# User-space instructions headroom executes per proxied request, counted by callgrind: steady
# whatever else the machine does, so two builds compare to the instruction (before/after a
# hot-path change). One worker, one keep-alive client connection, GET /v1/models answered by the
# built-in mock backend (which runs outside valgrind). Two runs, of N1 and N2 requests; the
# difference of their totals divided by N2 - N1 leaves start-up and shutdown out.
#
# Needs valgrind and python3. Env: HEADROOM_BIN (default: the release build, rebuilt first),
# N1 (500), N2 (2500); HOLD=idle or HOLD=one-byte keeps HOLD_CONNS (5000) other connections
# open through each run, silent or stopped after the first byte of the h2 preface (what they
# cost the requests, to the instruction).
# MODE=stream counts per streamed event instead: each request is a streamed chat completion of
# EVENTS (32) tokens, EVENT_GAP (10ms) apart, and the figure is divided by the SSE events each
# response carried (the tokens, the last chunk and [DONE]).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-$repo/target/release/headroom}
n1=${N1:-500} n2=${N2:-2500}
hold=${HOLD:-} hold_conns=${HOLD_CONNS:-5000}
mode=${MODE:-fast} events=${EVENTS:-32} gap=${EVENT_GAP:-10ms}
[ -z "$hold" ] || ulimit -n $((hold_conns + 4096))
command -v valgrind >/dev/null || { echo "missing: valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(free_port) proxy=$(free_port) admin=$(free_port)
if [ "$mode" = stream ]; then
  "$bin" mock-backend --listen "127.0.0.1:$backend" --capacity 64 --ttft 0ms --tokens "$events" --token-interval "$gap" >/dev/null 2>&1 &
else
  "$bin" mock-backend --listen "127.0.0.1:$backend" --capacity 64 >/dev/null 2>&1 &
fi
pids+=($!)
cat > "$dir/headroom.toml" <<EOF
[server]
listen = ["127.0.0.1:$proxy"]
workers = 1
access_log = false
[admin]
listen = "127.0.0.1:$admin"
[pools.default]
[[pools.default.backends]]
addr = "127.0.0.1:$backend"
EOF

# Sends $1 requests on one keep-alive connection, each answered 200: GETs of /v1/models, or
# (MODE=stream) streamed chat completions; writes the SSE events per response to $dir/events.
send() {
  python3 - "$proxy" "$1" "$mode" "$dir/events" <<'PY'
import http.client, sys, time
port, n, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60); c.connect(); break
    except OSError:
        time.sleep(0.1)
body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
events = 0
for _ in range(n):
    if mode == "stream":
        c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    else:
        c.request("GET", "/v1/models")
    r = c.getresponse()
    data = r.read()
    assert r.status == 200, r.status
    events = data.count(b"data:")
open(out, "w").write(str(events))
PY
}

# Runs headroom under callgrind for $1 requests; prints its total instruction count.
measure() {
  local out="$dir/cg.$1" holder=""
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --config "$dir/headroom.toml" >/dev/null 2>&1 &
  local pid=$!
  if [ -n "$hold" ]; then
    # Holds $hold_conns connections ($hold: idle or one-byte) and says "ready" once they are open.
    coproc HOLDER { exec python3 "$repo/benches/hold-conns.py" "$proxy" "$hold_conns" "$hold"; }
    holder=$HOLDER_PID
    read -r _ <&"${HOLDER[0]}"
  fi
  send "$1"
  [ -z "$holder" ] || kill "$holder" 2>/dev/null || true
  kill -TERM "$pid"
  wait "$pid" || true
  grep -m1 '^summary:' "$out" | awk '{print $2}'
}
a=$(measure "$n1")
b=$(measure "$n2")
echo "instructions: $a for $n1 requests, $b for $n2${hold:+ ($hold_conns $hold connections held open)}"
echo "per request: $(( (b - a) / (n2 - n1) ))"
if [ "$mode" = stream ]; then
  per_response=$(cat "$dir/events")
  echo "per streamed event: $(( (b - a) / (n2 - n1) / per_response )) ($per_response events per response, $gap apart)"
fi
