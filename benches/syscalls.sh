#!/usr/bin/env bash
# System calls each proxy makes per proxied request and per streamed event, headroom beside
# nginx and HAProxy (one worker each, same backends, same load), counted by the kernel's
# syscall tracepoints (`perf stat -e raw_syscalls:sys_enter,syscalls:sys_enter_<call>`: no
# stop per call, unlike strace, so the proxy batches as it does unobserved) over a fixed number
# of requests. Counts, unlike seconds, do not move with the neighbours' load, so they say where
# the kernel time goes.
#
# Workloads (backends: one nginx worker serving four ports, with the echo module for `stream`):
# - fast: GET /fast, a ~130-byte JSON answer (peerbench's `fast`);
# - stream: POST /stream, an SSE answer of STREAM_CHUNKS (32) events STREAM_GAP (0.01 s) apart,
#   each flushed, then `data: [DONE]` (peerbench's `stream`); per event = per response / 33.
# Rows: headroom as the peers run (no access log, no health checks), headroom with its default
# features on (access log, to a file, and active health checks every 2 s), nginx, HAProxy, and
# HAProxy with `option http-no-delay`. Without that option HAProxy sends a response's data with
# MSG_MORE while more is due, so the kernel holds small events back (up to 200 ms, or until the
# response ends): it makes fewer segments per response, but it does not stream. The time to the
# first byte (h2load's mean and max over the requests) shows which proxies deliver each event
# when it comes.
#
# Needs nginx (with libnginx-mod-http-echo), haproxy, h2load (nghttp2-client), perf
# (linux-perf, with access to tracepoints: root or kernel.perf_event_paranoid <= -1) and a
# release build. Env: REQUESTS (fast: 20000; stream: 2000), CONNS (fast: 64; stream: 256),
# WORKLOADS ("fast stream"), PROXIES ("headroom headroom-default nginx haproxy"),
# STREAM_CHUNKS, STREAM_GAP, HEADROOM_BIN (the release build), TOP (6 calls listed per row).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-$repo/target/release/headroom}
workloads=${WORKLOADS:-fast stream}
proxies=${PROXIES:-headroom headroom-default nginx haproxy haproxy-no-delay}
chunks=${STREAM_CHUNKS:-32} gap=${STREAM_GAP:-0.01} top=${TOP:-6}
# shellcheck source=benches/bench-backends.sh
. "$repo/benches/bench-backends.sh"
for tool in nginx haproxy h2load perf taskset; do
  command -v "$tool" >/dev/null || {
    echo "missing: $tool (apt-get install nginx-light libnginx-mod-http-echo haproxy nghttp2-client linux-perf)" >&2
    exit 1
  }
done
perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1 || { echo "perf cannot read syscall tracepoints here" >&2; exit 1; }
calls=(recvfrom sendto read write readv writev recvmsg sendmsg epoll_wait epoll_pwait epoll_ctl
  getsockopt setsockopt accept4 connect close futex clock_gettime brk mmap munmap madvise)
events="raw_syscalls:sys_enter"
for c in "${calls[@]}"; do events+=",syscalls:sys_enter_$c"; done
[ -f "$echo_so" ] || { echo "missing: $echo_so (apt-get install libnginx-mod-http-echo)" >&2; exit 1; }
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
bench_start
ports=(18701 18702 18703 18704)
backends_conf "$dir" yes "$chunks" "$gap" "${ports[@]}" > "$dir/backends.conf"
{
  echo "daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 65536;"
  echo "pid $dir/n.pid; error_log $dir/n.err warn; events { worker_connections 16384; }"
  echo "http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;"
  echo "  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;"
  echo "  upstream be { least_conn; keepalive 1024; keepalive_requests 10000000;"
  for p in "${ports[@]}"; do echo "    server 127.0.0.1:$p max_fails=3 fail_timeout=10s;"; done
  echo "  }"
  echo "  server { listen 127.0.0.1:18711 backlog=4096;"
  echo "    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
  echo "    location = /stream { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; } }"
  echo "}"
} > "$dir/nginx.conf"
haproxy_confs "$dir" 18712 18717 yes "${ports[@]}"
# $1: port, $2: admin port, $3: extra [server] lines, $4: extra [pools.default] lines
headroom_config() {
  printf '[server]\nlisten = ["127.0.0.1:%s"]\nworkers = 1\n%b' "$1" "$3"
  printf '[admin]\nlisten = "127.0.0.1:%s"\n[pools.default]\nmax_inflight_per_backend = 100000\n%b' "$2" "$4"
  for p in "${ports[@]}"; do printf '[[pools.default.backends]]\naddr = "127.0.0.1:%s"\n' "$p"; done
}
headroom_config 18713 18714 'access_log = false\n' '' > "$dir/headroom.toml"
headroom_config 18715 18716 'access_log = true\n' \
  '[pools.default.health]\npath = "/health"\ninterval = "2s"\n' > "$dir/headroom-default.toml"
"$bin" check --config "$dir/headroom-default.toml" >/dev/null
echo '{"model":"bench","messages":[{"role":"user","content":"Say something."}],"stream":true}' > "$dir/body.json"

taskset -c 1 nginx -c "$dir/backends.conf" >/dev/null 2>&1 & pids+=($!)

# Starts proxy $1 on CPU 0; prints "pid port".
start() {
  local port
  case $1 in
    headroom) port=18713; RUST_LOG=warn taskset -c 0 "$bin" --config "$dir/headroom.toml" >"$dir/proxy.log" 2>&1 & ;;
    headroom-default) port=18715; RUST_LOG=warn taskset -c 0 "$bin" --config "$dir/headroom-default.toml" >"$dir/proxy.log" 2>&1 & ;;
    nginx) port=18711; taskset -c 0 nginx -c "$dir/nginx.conf" >"$dir/proxy.log" 2>&1 & ;;
    haproxy) port=18712; taskset -c 0 haproxy -db -f "$dir/haproxy.cfg" >"$dir/proxy.log" 2>&1 & ;;
    haproxy-no-delay) port=18717; taskset -c 0 haproxy -db -f "$dir/haproxy-no-delay.cfg" >"$dir/proxy.log" 2>&1 & ;;
  esac
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/fast" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/fast" >/dev/null || { echo "$1 did not answer; its log:" >&2; cat "$dir/proxy.log" >&2; exit 1; }
  echo "$pid $port"
}
# $1 workload, $2 port, $3 requests, $4 connections: a fixed-count load; fails unless all 2xx.
# Leaves h2load's report in $dir/h2load.
load() {
  local args=(--h1 -n "$3" -c "$4" -t 1)
  [ "$1" = stream ] && args+=(-d "$dir/body.json" -H 'content-type: application/json')
  local out
  out=$(taskset -c 1 h2load "${args[@]}" "http://127.0.0.1:$2/$1")
  echo "$out" > "$dir/h2load"
  grep -q "status codes: $3 2xx" <<<"$out" || { echo "load on port $2 did not get $3 2xx answers:" >&2; echo "$out" >&2; return 1; }
}

events_per=$((chunks + 1))
printf '| workload | proxy | syscalls per request | per event | first byte mean / max | top calls per request |\n'
printf '|---|---|---:|---:|---:|---|\n'
for w in $workloads; do
  if [ "$w" = fast ]; then n=${REQUESTS:-20000} c=${CONNS:-64}; else n=${REQUESTS:-2000} c=${CONNS:-256}; fi
  for p in $proxies; do
    read -r pid port <<<"$(start "$p")"
    load "$w" "$port" $((n / 4)) "$c"
    perf stat -x, -e "$events" -p "$pid" -o "$dir/perf.$p.$w" 2>/dev/null &
    counter=$!
    sleep 0.5
    load "$w" "$port" "$n" "$c"
    kill -INT "$counter"; wait "$counter" 2>/dev/null || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    ttfb=$(awk '/time to 1st byte/ {print $7 " / " $6}' "$dir/h2load")
    awk -F, -v n="$n" -v w="$w" -v p="$p" -v ev="$events_per" -v top="$top" -v ttfb="$ttfb" '
      $3 == "raw_syscalls:sys_enter" { total = $1 }
      $3 ~ /^syscalls:sys_enter_/ && $1 ~ /^[0-9]+$/ && $1 > 0 { c[substr($3, 20)] = $1 }
      END {
        line = ""
        for (i = 0; i < top; i++) {
          best = ""; for (k in c) if (best == "" || c[k] > c[best]) best = k
          if (best == "") break
          line = line sprintf("%s %.2f, ", best, c[best] / n); delete c[best]
        }
        per_event = (w == "stream") ? sprintf("%.3f", total / n / ev) : "-"
        printf "| %s | %s | %.2f | %s | %s | %s |\n", w, p, total / n, per_event, ttfb, substr(line, 1, length(line) - 2)
      }' "$dir/perf.$p.$w"
  done
done
