"""Holds client connections open against a proxy port, for the benchmarks that measure what
such connections cost: `hold-conns.py PORT N MODE [SECONDS]`. MODE `idle` connects and says
nothing; `one-byte` sends `P`, the first byte of the h2 preface, and stops. Waits for the port
(up to a minute), opens the N connections, prints "ready", then holds them SECONDS (default 3600)
or until killed."""
import socket
import sys
import time

port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hold = float(sys.argv[4]) if len(sys.argv) > 4 else 3600.0
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", port)).close()
        break
    except OSError:
        time.sleep(0.1)
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if mode == "one-byte":
        s.send(b"P")
    socks.append(s)
print("ready", flush=True)
time.sleep(hold)
