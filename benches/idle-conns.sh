#!/usr/bin/env bash
# Memory per idle client connection: RSS of a release headroom before and after N (default
# 10,000) keep-alive client connections that each made one request and then stay idle.
# Needs python3 (the client) and a release build (cargo build --release).
# Env: CONNS (10000), HEADROOM_BIN (the release build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${HEADROOM_BIN:-"$repo/target/release/headroom"}
n=${CONNS:-10000}
# `cargo bench` leaves a build with unwinding panics and the dev-dependencies' features at the
# same path; rebuild the release profile (a no-op when it is current) unless a binary was given.
[ -n "${HEADROOM_BIN:-}" ] || (cd "$repo" && cargo build --release --quiet)
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
# headroom and the client each hold one descriptor per connection: raise the open-file limit as
# far as allowed; fewer connections are opened if it stays low.
ulimit -n $(( n + 1024 )) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
max=$(( $(ulimit -n) - 1024 ))
[ "$n" -le "$max" ] || { echo "open-file limit allows $max connections, not $n" >&2; n=$max; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
"$bin" mock-backend --listen 127.0.0.1:18501 >/dev/null 2>&1 & pids+=($!)
cat > "$dir/h.toml" <<TOML
[server]
listen = ["127.0.0.1:18510"]
workers = 1
idle_timeout = "300s"
access_log = false
[admin]
listen = "127.0.0.1:18511"
[pools.default]
[[pools.default.backends]]
addr = "127.0.0.1:18501"
TOML
RUST_LOG=warn "$bin" --config "$dir/h.toml" & hr=$!; pids+=($hr)
for _ in $(seq 100); do curl -sf http://127.0.0.1:18511/healthz >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:18510/ >/dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
before=$(rss "$hr")
python3 - "$n" "$hr" "$before" <<'PY'
import asyncio, sys
n, pid, before = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", 18510)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    await r.readexactly(length)
    conns.append((r, w))
async def main():
    conns = []
    sem = asyncio.Semaphore(500)
    async def guarded():
        async with sem:
            await one(conns)
    await asyncio.gather(*(guarded() for _ in range(n)))
    await asyncio.sleep(2)
    after = rss()
    print(f"{len(conns)} idle keep-alive connections: RSS {before} KiB -> {after} KiB, "
          f"{(after - before) / len(conns):.2f} KiB per connection")
    for _, w in conns:
        w.close()
asyncio.run(main())
PY
