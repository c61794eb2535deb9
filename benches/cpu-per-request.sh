#!/usr/bin/env bash
# CPU time each proxy spends per request, headroom beside nginx and HAProxy (one worker each,
# same backends, same load), measured in the same run. Requests per second on a shared machine
# stop at whatever saturates first (often the load generator and backends, not the proxy); the
# proxy's own CPU microseconds per request is what one core of it can carry: 1e6 / us_per_req.
#
# Layout: the proxy under test on CPU 0; wrk and the backends (one nginx worker serving four
# ports with a ~130-byte JSON answer, like peerbench's `fast`) on CPU 1. Each round measures
# every proxy once (order rotated); the table gives medians and ratios to nginx.
#
# WORKLOAD=stream measures CPU per streamed event instead: POST /stream answered with
# STREAM_CHUNKS (32) SSE events STREAM_GAP (0.01 s) apart, each flushed, then [DONE] (the
# backends need nginx's echo module); per event = per response / (STREAM_CHUNKS + 1). A fourth
# proxy runs then: HAProxy with `option http-no-delay`. Without it HAProxy sends a response's
# data with MSG_MORE while more is due, and the kernel holds small events back (up to 200 ms, or
# to the end of the response): fewer, larger segments and less CPU, but the tokens do not
# stream (benches/syscalls.sh shows the time to the first byte).
#
# Needs nginx, haproxy, wrk and a release build (cargo build --release); for stream,
# libnginx-mod-http-echo. Env: WORKLOAD (fast), ROUNDS (3), DURATION (8 s), CONNS (fast: 64,
# stream: 256), PROXY_CPU (0), LOAD_CPU (1), HEADROOM_BIN (the release build), HEADROOM_DEFAULTS
# (1: headroom with its access log and health checks on, as its default config has them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-$repo/target/release/headroom}
workload=${WORKLOAD:-fast} rounds=${ROUNDS:-3} duration=${DURATION:-8}
chunks=${STREAM_CHUNKS:-32} gap=${STREAM_GAP:-0.01}
if [ "$workload" = stream ]; then conns=${CONNS:-256}; else conns=${CONNS:-64}; fi
# shellcheck source=benches/bench-backends.sh
. "$repo/benches/bench-backends.sh"
pcpu=${PROXY_CPU:-0} lcpu=${LOAD_CPU:-1}
for tool in nginx haproxy wrk taskset; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install nginx-light haproxy wrk)" >&2; exit 1; }
done
# `cargo bench` leaves a build with unwinding panics and the dev-dependencies' features at the
# same path; rebuild the release profile (a no-op when it is current) unless a binary was given.
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
if [ "$workload" = stream ] && [ ! -f "$echo_so" ]; then
  echo "missing: $echo_so (apt-get install libnginx-mod-http-echo)" >&2
  exit 1
fi
bench_start
ports=(18601 18602 18603 18604)
stream=no
[ "$workload" != stream ] || stream=yes
backends_conf "$dir" "$stream" "$chunks" "$gap" "${ports[@]}" > "$dir/backends.conf"
{
  echo "daemon off; master_process off; worker_processes 1; pid $dir/n.pid; error_log $dir/n.err warn;"
  echo "events { worker_connections 8192; }"
  echo "http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;"
  echo "  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;"
  echo "  upstream be { least_conn; keepalive 1024; keepalive_requests 10000000;"
  for p in "${ports[@]}"; do echo "    server 127.0.0.1:$p max_fails=3 fail_timeout=10s;"; done
  echo "  }"
  echo "  server { listen 127.0.0.1:18611 backlog=4096; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  echo "    location / { proxy_pass http://be; } location = /stream { proxy_pass http://be; proxy_buffering off; } }"
  echo "}"
} > "$dir/nginx.conf"
haproxy_confs "$dir" 18612 18615 no "${ports[@]}"
access_log=false
[ -z "${HEADROOM_DEFAULTS:-}" ] || access_log=true
{
  printf '[server]\nlisten = ["127.0.0.1:18613"]\nworkers = 1\naccess_log = %s\n' "$access_log"
  printf '[admin]\nlisten = "127.0.0.1:18614"\n[pools.default]\nmax_inflight_per_backend = 100000\n'
  [ -z "${HEADROOM_DEFAULTS:-}" ] || printf '[pools.default.health]\npath = "/health"\ninterval = "2s"\n'
  for p in "${ports[@]}"; do printf '[[pools.default.backends]]\naddr = "127.0.0.1:%s"\n' "$p"; done
} > "$dir/headroom.toml"

taskset -c "$lcpu" nginx -c "$dir/backends.conf" >/dev/null 2>&1 & pids+=($!)

# name port command...: starts a proxy on the proxy CPU, prints its pid
start() {
  local port=$1; shift
  taskset -c "$pcpu" "$@" >"$dir/proxy.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
  echo "$pid"
}
# User and system CPU ticks of a process.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

declare -A us rps usr sys
names=(headroom nginx haproxy)
[ "$workload" != stream ] || names+=(haproxy-no-delay)
k_n=${#names[@]}
path=/fast wrk_args=()
if [ "$workload" = stream ]; then
  path=/stream
  echo '{"model":"bench","messages":[{"role":"user","content":"Say something."}],"stream":true}' > "$dir/body.json"
  printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nlocal f = io.open("%s", "rb")\nwrk.body = f:read("*a")\nf:close()\n' \
    "$dir/body.json" > "$dir/post.lua"
  wrk_args=(-s "$dir/post.lua")
fi
for r in $(seq "$rounds"); do
  for k in $(seq 0 $((k_n - 1))); do
    name=${names[$(( (k + r) % k_n ))]}
    case $name in
      headroom) port=18613; pid=$(RUST_LOG=warn start $port "$bin" --config "$dir/headroom.toml") ;;
      nginx) port=18611; pid=$(start $port nginx -c "$dir/nginx.conf") ;;
      haproxy) port=18612; pid=$(start $port haproxy -db -f "$dir/haproxy.cfg") ;;
      haproxy-no-delay) port=18615; pid=$(start $port haproxy -db -f "$dir/haproxy-no-delay.cfg") ;;
    esac
    taskset -c "$lcpu" wrk "${wrk_args[@]}" -t1 -c"$conns" -d2s "http://127.0.0.1:$port$path" >/dev/null
    read -r u0 s0 <<<"$(cpu_ticks "$pid")"
    out=$(taskset -c "$lcpu" wrk "${wrk_args[@]}" -t1 -c"$conns" -d"${duration}s" --timeout 10s "http://127.0.0.1:$port$path")
    read -r u1 s1 <<<"$(cpu_ticks "$pid")"
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    per_of() { awk -v t="$1" -v hz="$tck" -v n="$n" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}'; }
    per=$(per_of $((u1 + s1 - u0 - s0)))
    per_user=$(per_of $((u1 - u0)))
    per_sys=$(per_of $((s1 - s0)))
    echo "round $r $name: $rate req/s, $per us CPU per request ($per_user user, $per_sys system)" >&2
    us[$name]+="$per "
    usr[$name]+="$per_user "
    sys[$name]+="$per_sys "
    rps[$name]+="$rate "
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
n_us=$(median <<<"${us[nginx]}")
ref=haproxy
[ "$workload" != stream ] || ref=haproxy-no-delay
h_us=$(median <<<"${us[$ref]}")
events=1
[ "$workload" != stream ] || events=$((chunks + 1))
echo
echo "$workload, -c$conns, $rounds rounds of ${duration}s; per event = per response / $events (stream only)"
echo "| proxy | req/s (median) | CPU us per request (median) | per event | user us | system us | requests per CPU-second | capacity vs nginx | CPU vs $ref |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for name in "${names[@]}"; do
  m=$(median <<<"${us[$name]}")
  q=$(median <<<"${rps[$name]}")
  mu=$(median <<<"${usr[$name]}")
  ms=$(median <<<"${sys[$name]}")
  awk -v n="$name" -v m="$m" -v q="$q" -v b="$n_us" -v h="$h_us" -v mu="$mu" -v ms="$ms" -v ev="$events" \
    'BEGIN {printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.0f | %.3f | %.3f |\n", n, q, m, m / ev, mu, ms, 1e6 / m, b / m, m / h}'
done
