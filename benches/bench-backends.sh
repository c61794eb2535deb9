# Sourced by the peer benchmarks: the nginx config of their backends, one worker serving one
# server block per port. Each answers GET / and /fast with a ~130-byte JSON body (peerbench's
# `fast`), /health with 200, and, when `stream` is asked for, POST /stream with STREAM_CHUNKS
# SSE events STREAM_GAP seconds apart, each flushed, then `data: [DONE]` (nginx's echo module).
# Usage: backends_conf DIR STREAM(yes|no) CHUNKS GAP PORT... > DIR/backends.conf

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
