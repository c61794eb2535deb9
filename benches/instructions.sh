#!/usr/bin/env bash
# User-space instructions a proxy executes per proxied request, and per streamed event, counted
# by callgrind: steady whatever else the machine does, so two builds compare to the instruction
# (before/after a hot-path change), and headroom compares with nginx and HAProxy behind the same
# backend (PEERS). One worker, one keep-alive client connection, the built-in mock backend
# (outside valgrind). Each proxy serves WARMUP requests first; then the counters are zeroed
# (callgrind_control -z), N requests are sent and the counters dumped, so start-up, one-time
# initialisation and shutdown are left out.
#
# MODE=fast: GET /v1/models (a small JSON answer). MODE=infer: POST of a chat completion (a
# JSON body) answered as one JSON completion after INFER_DELAY (5ms), the shape of an inference
# call. MODE=stream: streamed chat completions of EVENTS (32) tokens, EVENT_GAP (10ms) apart;
# per event = per response / the SSE events each response carried (the tokens, the last chunk
# and [DONE]).
#
# Needs valgrind and python3 (nginx and haproxy for PEERS). Env: HEADROOM_BIN (default: the
# release build, rebuilt first), N (fast: 2000, infer: 500, stream: 30), WARMUP (fast: 200,
# infer: 50, stream: 3),
# PEERS ("" or e.g. "nginx haproxy": nginx with proxy_buffering off, HAProxy with
# option http-no-delay so that it streams), HOLD=idle or HOLD=one-byte keeps HOLD_CONNS (5000)
# other connections open to headroom through its run, silent or stopped after the first byte
# of the h2 preface (what they cost the requests, to the instruction). KEEP=DIR keeps each
# proxy's dump as DIR/callgrind.PROXY, for callgrind_annotate --inclusive=yes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-$repo/target/release/headroom}
mode=${MODE:-fast} events=${EVENTS:-32} gap=${EVENT_GAP:-10ms}
case $mode in
  stream) n=${N:-30} warmup=${WARMUP:-3} ;;
  infer) n=${N:-500} warmup=${WARMUP:-50} ;;
  *) n=${N:-2000} warmup=${WARMUP:-200} ;;
esac
peers=${PEERS:-}
hold=${HOLD:-} hold_conns=${HOLD_CONNS:-5000}
[ -z "$hold" ] || ulimit -n $((hold_conns + 4096))
for tool in valgrind callgrind_control python3 $peers; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install valgrind $peers)" >&2; exit 1; }
done
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(free_port)
if [ "$mode" = stream ]; then
  "$bin" mock-backend --listen "127.0.0.1:$backend" --capacity 64 --ttft 0ms --tokens "$events" --token-interval "$gap" >/dev/null 2>&1 &
elif [ "$mode" = infer ]; then
  "$bin" mock-backend --listen "127.0.0.1:$backend" --capacity 64 --ttft "${INFER_DELAY:-5ms}" --tokens 16 --token-interval 0ms >/dev/null 2>&1 &
else
  "$bin" mock-backend --listen "127.0.0.1:$backend" --capacity 64 >/dev/null 2>&1 &
fi
pids+=($!)

# Writes proxy $1's config for listening port $2 (admin port $3 for headroom); prints its command.
configure() {
  case $1 in
    headroom)
      printf '[server]\nlisten = ["127.0.0.1:%s"]\nworkers = 1\naccess_log = false\n[admin]\nlisten = "127.0.0.1:%s"\n' "$2" "$3" > "$dir/headroom.toml"
      printf '[pools.default]\n[[pools.default.backends]]\naddr = "127.0.0.1:%s"\n' "$backend" >> "$dir/headroom.toml"
      echo "$bin --config $dir/headroom.toml" ;;
    nginx)
      mkdir -p "$dir/tmp"
      cat > "$dir/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $dir/nginx.pid; error_log $dir/nginx.err warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp;
  uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp; keepalive_requests 10000000;
  upstream be { server 127.0.0.1:$backend; keepalive 16; }
  server { listen 127.0.0.1:$2; location / { proxy_pass http://be; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_buffering off; } } }
EOF
      echo "nginx -c $dir/nginx.conf" ;;
    haproxy)
      printf 'global\n  nbthread 1\ndefaults\n  mode http\n  option http-keep-alive\n  option http-no-delay\n  http-reuse always\n' > "$dir/haproxy.cfg"
      printf '  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\nfrontend fe\n  bind 127.0.0.1:%s\n' "$2" >> "$dir/haproxy.cfg"
      printf '  default_backend be\nbackend be\n  server b0 127.0.0.1:%s\n' "$backend" >> "$dir/haproxy.cfg"
      echo "haproxy -db -f $dir/haproxy.cfg" ;;
    *) echo "unknown proxy: $1" >&2; exit 1 ;;
  esac
}

# Sends $2 requests on one keep-alive connection to port $1, each answered 200: GETs of
# /v1/models, or (MODE=infer) chat completions, or (MODE=stream) streamed ones; prints the SSE
# events per response.
send() {
  python3 - "$1" "$2" "$mode" <<'PY'
import http.client, sys, time
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120); c.connect()
        c.request("GET", "/v1/models"); r = c.getresponse(); r.read()
        if r.status == 200: break
    except OSError:
        pass
    time.sleep(0.1)
body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
events = 0
for _ in range(n):
    if mode == "stream":
        c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    elif mode == "infer":
        c.request("POST", "/v1/chat/completions", body=body.replace("true", "false"),
                  headers={"Content-Type": "application/json"})
    else:
        c.request("GET", "/v1/models")
    r = c.getresponse()
    data = r.read()
    assert r.status == 200, r.status
    events = data.count(b"data:")
print(events)
PY
}

# Runs proxy $1 under callgrind; prints the instructions of its N measured requests and the
# events per response.
measure() {
  local port admin out="$dir/cg.$1" holder="" pid events total
  port=$(free_port) admin=$(free_port)
  # shellcheck disable=SC2046
  valgrind --tool=callgrind --callgrind-out-file="$out" $(configure "$1" "$port" "$admin") >/dev/null 2>&1 &
  pid=$!
  if [ -n "$hold" ] && [ "$1" = headroom ]; then
    send "$port" 1 >/dev/null
    # Holds $hold_conns connections ($hold: idle or one-byte) and says "ready" once they are open.
    coproc HOLDER { exec python3 "$repo/benches/hold-conns.py" "$port" "$hold_conns" "$hold"; }
    holder=$HOLDER_PID
    read -r _ <&"${HOLDER[0]}"
  fi
  send "$port" "$warmup" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  events=$(send "$port" "$n")
  callgrind_control -d "$pid" >/dev/null 2>&1
  [ -z "$holder" ] || kill "$holder" 2>/dev/null || true
  kill -TERM "$pid"
  wait "$pid" || true
  total=$(grep -m1 '^summary:' "$out.1" | awk '{print $2}')
  [ -z "${KEEP:-}" ] || cp "$out.1" "$KEEP/callgrind.$1"
  echo "$total $events"
}

for p in headroom $peers; do
  read -r total per_response <<<"$(measure "$p")"
  line="$p: $total instructions for $n requests${hold:+ ($hold_conns $hold connections held open)}; per request: $((total / n))"
  [ "$mode" = stream ] && line+="; per streamed event: $((total / n / per_response)) ($per_response events per response, $gap apart)"
  echo "$line"
done
