# Sourced by the peer benchmarks (cpu-per-request.sh, syscalls.sh, event-latency.sh): their
# scratch directory, the nginx config of their backends and HAProxy's configs.
#
# bench_start: raises the open-file limit, makes $dir (with tmp/ for nginx) and, at exit, stops
# every pid in $pids and removes $dir.
#
# backends_conf DIR STREAM(yes|no) CHUNKS GAP PORT... > DIR/backends.conf: one nginx worker
# serving one server block per port. Each answers GET / and /fast with a ~130-byte JSON body
# (peerbench's `fast`), /health with 200, and, when `stream` is asked for, POST /stream with
# CHUNKS SSE events GAP seconds apart, each flushed, then `data: [DONE]` (nginx's echo module).
#
# haproxy_confs DIR PORT NO_DELAY_PORT CHECKS(yes|no) BACKEND_PORT...: DIR/haproxy.cfg (one
# thread, leastconn, keep-alive both sides; with CHECKS, `GET /health` every 2 s) and
# DIR/haproxy-no-delay.cfg, the same with `option http-no-delay` on NO_DELAY_PORT.

echo_so=/usr/lib/nginx/modules/ngx_http_echo_module.so
fast_body='{"id":"cmpl-fast","object":"text_completion","model":"bench","choices":[{"index":0,"text":"ok","finish_reason":"stop"}]}'

backends_conf() {
  local dir=$1 stream=$2 chunks=$3 gap=$4 i p body=""
  shift 4
  for ((i = 1; i <= chunks; i++)); do
    body+="echo 'data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok$i \"}}]}'; echo ''; echo_flush; "
    ((i < chunks)) && body+="echo_sleep $gap; "
  done
  [ "$stream" != yes ] || echo "load_module $echo_so;"
  echo "daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 65536;"
  echo "pid $dir/b.pid; error_log $dir/b.err warn; events { worker_connections 16384; }"
  echo "http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;"
  echo "  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;"
  for p in "$@"; do
    echo "  server { listen 127.0.0.1:$p backlog=4096; location / { default_type application/json; return 200 '$fast_body\n'; }"
    echo "    location = /health { return 200 ok; }"
    [ "$stream" != yes ] || echo "    location = /stream { default_type text/event-stream; echo_read_request_body; $body echo 'data: [DONE]'; echo ''; }"
    echo "  }"
  done
  echo "}"
}

bench_start() {
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  dir=$(mktemp -d)
  pids=()
  mkdir -p "$dir/tmp"
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
}

haproxy_confs() {
  local dir=$1 port=$2 no_delay_port=$3 checks=$4 i=0 p check=""
  shift 4
  [ "$checks" != yes ] || check=" check inter 2s"
  {
    printf 'global\n  nbthread 1\n  maxconn 9000\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n'
    printf '  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout http-keep-alive 120s\n'
    printf 'frontend fe\n  bind 127.0.0.1:%s backlog 4096\n  default_backend be\nbackend be\n  balance leastconn\n' "$port"
    [ "$checks" != yes ] || printf '  option httpchk GET /health\n'
    for p in "$@"; do printf '  server b%d 127.0.0.1:%s%s\n' $((i++)) "$p" "$check"; done
  } > "$dir/haproxy.cfg"
  sed "s/^  balance leastconn/&\n  option http-no-delay/; s/127.0.0.1:$port /127.0.0.1:$no_delay_port /" \
    "$dir/haproxy.cfg" > "$dir/haproxy-no-delay.cfg"
}
