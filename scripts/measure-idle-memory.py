#!/usr/bin/env python3
"""Server memory per idle authenticated connection: a stopgap until hermod-bench's `idle`
scenario (issue 3). Starts nothing: point it at a running server and its pid.

    python3 scripts/measure-idle-memory.py --port 7400 --pid $(pgrep -f 'hermod serve') --conns 5000

Logs in one user on N devices (one WebSocket each, standard library only), holds them, and
reports the server's RSS growth per connection. Run the server with cheap password hashing
(--argon2-memory-kib 64 --argon2-passes 1) or the logins take minutes.
"""
import argparse, base64, json, os, socket, struct, time

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")

def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s

def send(s, obj):
    data, mask = json.dumps(obj).encode(), os.urandom(4)
    n = len(data)
    hdr = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

def recv_text(s):
    def exact(k):
        out = b""
        while len(out) < k:
            chunk = s.recv(k - len(out))
            if not chunk:
                raise SystemExit("connection closed")
            out += chunk
        return out
    while True:
        b0, b1 = exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", exact(8))[0]
        payload = exact(n)
        if b0 & 0x0F == 1:
            return json.loads(payload)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7400)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--conns", type=int, default=5000)
    a = ap.parse_args()
    s = connect(a.port)
    send(s, {"op": "register", "rid": 1, "username": "idlemem", "password": "password123"})
    recv_text(s)
    time.sleep(0.5)
    before = rss_kib(a.pid)
    socks = []
    for i in range(a.conns):
        c = connect(a.port)
        send(c, {"op": "login", "rid": 1, "username": "idlemem", "password": "password123", "device": f"d{i}"})
        r = recv_text(c)
        assert "ok" in r, r
        socks.append(c)
    time.sleep(1.0)
    after = rss_kib(a.pid)
    per = (after - before) * 1024 / a.conns
    print(f"{a.conns} idle authenticated connections: RSS {before} KiB -> {after} KiB, "
          f"{per:.0f} bytes per connection")

if __name__ == "__main__":
    main()
