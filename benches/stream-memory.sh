#!/usr/bin/env bash
# Memory per active stream: RSS of a release headroom before and while STREAMS (default 10,000)
# streamed chat completions pass through it at once, each from its own HTTP/1.1 client
# connection to its own upstream connection (the mock engine sends a token every TOKEN_GAP,
# 1s, for a few minutes; the client reads every event). Each stream holds two sockets in
# headroom, so the open-file limit caps the count: fewer streams are opened, and said so, when
# it is lower than 2 × STREAMS + 1024.
# Needs python3 (the client) and a release build. Env: STREAMS (10000), TOKEN_GAP (1s),
# HEADROOM_BIN (the release build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-"$repo/target/release/headroom"}
n=${STREAMS:-10000} gap=${TOKEN_GAP:-1s}
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
ulimit -n $(( 2 * n + 1024 )) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
max=$(( ($(ulimit -n) - 1024) / 2 ))
[ "$n" -le "$max" ] || { echo "open-file limit $(ulimit -n) allows $max streams, not $n" >&2; n=$max; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
"$bin" mock-backend --listen 127.0.0.1:18521 --capacity $(( n + 100 )) --ttft 0ms --tokens 600 --token-interval "$gap" \
  >/dev/null 2>&1 & pids+=($!)
cat > "$dir/h.toml" <<TOML
[server]
listen = ["127.0.0.1:18520"]
workers = 1
idle_timeout = "300s"
access_log = false
[admin]
listen = "127.0.0.1:18522"
[pools.default]
max_inflight_per_backend = 100000
[[pools.default.backends]]
addr = "127.0.0.1:18521"
TOML
RUST_LOG=warn "$bin" --config "$dir/h.toml" & hr=$!; pids+=($hr)
for _ in $(seq 100); do curl -sf http://127.0.0.1:18522/healthz >/dev/null && break; sleep 0.1; done
python3 - "$n" "$hr" <<'PY'
import asyncio, sys
n, pid = int(sys.argv[1]), sys.argv[2]
body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
async def stream(opened, events):
    r, w = await asyncio.open_connection("127.0.0.1", 18520)
    w.write(request)
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:40]
    await r.readuntil(b"data:")
    opened.set_result(None)
    while True:
        chunk = await r.read(65536)
        if not chunk:
            return
        events[0] += chunk.count(b"data:")
async def main():
    # One warm-up stream, read to its first event, so that the baseline has every lazy start done.
    events = [0]
    first = asyncio.get_running_loop().create_future()
    warm = asyncio.create_task(stream(first, events))
    await first
    before = rss()
    sem = asyncio.Semaphore(500)
    tasks = []
    async def open_one():
        async with sem:
            opened = asyncio.get_running_loop().create_future()
            tasks.append(asyncio.create_task(stream(opened, events)))
            await opened
    await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(n))), 240)
    await asyncio.sleep(3)
    seen = events[0]
    await asyncio.sleep(2)
    after = rss()
    print(f"{n} active streams (events flowing: {events[0] - seen} in 2 s): RSS {before} KiB -> {after} KiB, "
          f"{(after - before) / n:.2f} KiB per active stream")
    for t in tasks + [warm]:
        t.cancel()
asyncio.run(main())
PY
