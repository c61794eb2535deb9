#!/usr/bin/env bash
# When each streamed event reaches the client, through each proxy and direct, while CONNS (256)
# other streams load the proxy: a probe sends PROBES (40) streamed requests, 4 at a time, and
# records for every SSE event the delay after its request was sent; the delay of the first event
# is the time to first token, and each later event's delay minus the backend's schedule
# (i × STREAM_GAP) is how late it came. It prints p50 and p99 of both, and the p99 added over
# direct. Targets: direct (backend 1), headroom, nginx, HAProxy with `option http-no-delay`,
# HAProxy (default; it holds events back: see README).
#
# Layout as the other peer benchmarks: proxy on CPU 0, backends, load and probe on CPU 1.
# Needs nginx with libnginx-mod-http-echo, haproxy, h2load (nghttp2-client), python3 and a
# release build. Env: CONNS (256), LOAD_SECS (12), PROBES (40), STREAM_CHUNKS (32),
# STREAM_GAP (0.01), HEADROOM_BIN.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-$repo/target/release/headroom}
conns=${CONNS:-256} load_secs=${LOAD_SECS:-12} probes=${PROBES:-40}
chunks=${STREAM_CHUNKS:-32} gap=${STREAM_GAP:-0.01}
# shellcheck source=benches/bench-backends.sh
. "$repo/benches/bench-backends.sh"
for tool in nginx haproxy h2load python3 taskset; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
[ -f "$echo_so" ] || { echo "missing: $echo_so (apt-get install libnginx-mod-http-echo)" >&2; exit 1; }
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
bench_start
ports=(18801 18802 18803 18804)
backends_conf "$dir" yes "$chunks" "$gap" "${ports[@]}" > "$dir/backends.conf"
{
  echo "daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 16384;"
  echo "pid $dir/n.pid; error_log $dir/n.err warn; events { worker_connections 8192; }"
  echo "http { access_log off; keepalive_requests 10000000; client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp;"
  echo "  upstream be { least_conn; keepalive 1024;"
  for p in "${ports[@]}"; do echo "    server 127.0.0.1:$p;"; done
  echo "  }"
  echo "  server { listen 127.0.0.1:18811; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  echo "    location / { proxy_pass http://be; proxy_buffering off; } } }"
} > "$dir/nginx.conf"
haproxy_confs "$dir" 18812 18815 no "${ports[@]}"
{
  printf '[server]\nlisten = ["127.0.0.1:18813"]\nworkers = 1\naccess_log = false\n[admin]\nlisten = "127.0.0.1:18814"\n'
  printf '[pools.default]\nmax_inflight_per_backend = 100000\n'
  for p in "${ports[@]}"; do printf '[[pools.default.backends]]\naddr = "127.0.0.1:%s"\n' "$p"; done
} > "$dir/headroom.toml"
echo '{"model":"bench","messages":[{"role":"user","content":"Say something."}],"stream":true}' > "$dir/body.json"
taskset -c 1 nginx -c "$dir/backends.conf" >/dev/null 2>&1 & pids+=($!)

# Starts target $1 (on CPU 0); prints "pid port" (pid 0 for direct).
start() {
  local port
  case $1 in
    direct) echo "0 ${ports[0]}"; return ;;
    headroom) port=18813; RUST_LOG=warn taskset -c 0 "$bin" --config "$dir/headroom.toml" >/dev/null 2>&1 & ;;
    nginx) port=18811; taskset -c 0 nginx -c "$dir/nginx.conf" >/dev/null 2>&1 & ;;
    haproxy) port=18812; taskset -c 0 haproxy -db -f "$dir/haproxy.cfg" >/dev/null 2>&1 & ;;
    haproxy-no-delay) port=18815; taskset -c 0 haproxy -db -f "$dir/haproxy-no-delay.cfg" >/dev/null 2>&1 & ;;
  esac
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/fast" >/dev/null 2>&1 && break; sleep 0.1; done
  echo "$pid $port"
}

# Probes port $1; prints "first_p50 first_p99 late_p50 late_p99" in ms.
probe() {
  taskset -c 1 python3 - "$1" "$probes" "$gap" "$dir/body.json" <<'PY'
import asyncio, sys, time
port, n, gap, body = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), open(sys.argv[4], "rb").read()
request = (b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(body)) + body
first, late = [], []
async def one():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    sent = time.monotonic()
    w.write(request)
    await w.drain()
    seen, buf = 0, b""
    while b"[DONE]" not in buf:
        data = await asyncio.wait_for(r.read(65536), 30)
        if not data:
            break
        now = (time.monotonic() - sent) * 1000
        buf += data
        for _ in range(data.count(b"data:")):
            if seen == 0:
                first.append(now)
            else:
                late.append(now - seen * gap * 1000)
            seen += 1
    w.close()
async def main():
    for _ in range(n // 4):
        await asyncio.gather(*(one() for _ in range(4)))
asyncio.run(main())
q = lambda a, p: sorted(a)[min(len(a) - 1, int(len(a) * p))]
print(f"{q(first, .5):.2f} {q(first, .99):.2f} {q(late, .5):.2f} {q(late, .99):.2f}")
PY
}

printf '| target | first event p50 / p99 (ms) | event lateness p50 / p99 (ms) | p99 lateness added over direct |\n'
printf '|---|---:|---:|---:|\n'
direct_p99=""
for t in direct headroom nginx haproxy-no-delay haproxy; do
  read -r pid port <<<"$(start "$t")"
  taskset -c 1 h2load --h1 -D "$load_secs" -c "$conns" -t 1 -d "$dir/body.json" -H 'content-type: application/json' \
    "http://127.0.0.1:$port/stream" >/dev/null 2>&1 &
  loader=$!
  sleep 2
  read -r f50 f99 l50 l99 <<<"$(probe "$port")"
  kill "$loader" 2>/dev/null || true; wait "$loader" 2>/dev/null || true
  [ "$pid" = 0 ] || { kill "$pid"; wait "$pid" 2>/dev/null || true; }
  [ -n "$direct_p99" ] || direct_p99=$l99
  added=$(awk -v a="$l99" -v b="$direct_p99" 'BEGIN {printf "%+.2f", a - b}')
  printf '| %s | %s / %s | %s / %s | %s |\n' "$t" "$f50" "$f99" "$l50" "$l99" "$added"
done
