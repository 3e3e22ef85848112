"""Holds connections that never log in, as an agent stalling at its
startup packet would, and reports what the one after them was told.

usage: pg_stall_logins.py HOST PORT HELD SECONDS

Opens HELD connections and sends nothing on them; then opens one more and
reads what it is told (a server refusing it at once sends an
ErrorResponse). Prints one JSON line, flushed, then keeps the HELD
connections open for SECONDS (or until stdin closes) and exits.

outcome: {"held": N, "held_told": M (of the HELD, those the server already
          sent something), "next": {"tag": "E", "sqlstate": ..., "message": ...}
          | {"tag": "none"} (nothing within 3 s)}
"""
import json
import socket
import struct
import sys
import time

from pg_raw import error_fields


def main():
    host, port, held, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    stalled = [socket.create_connection((host, port), timeout=5) for _ in range(held)]
    nxt = socket.create_connection((host, port), timeout=5)
    nxt.settimeout(3)
    try:
        head = nxt.recv(5)
        if len(head) == 5 and head[:1] == b"E":
            (length,) = struct.unpack("!i", head[1:5])
            body = b""
            while len(body) < length - 4:
                chunk = nxt.recv(length - 4 - len(body))
                if not chunk:
                    break
                body += chunk
            fields = error_fields(body)
            answer = {"tag": "E", "sqlstate": fields.get("C"), "message": fields.get("M")}
        else:
            answer = {"tag": head[:1].decode("latin-1") or "closed"}
    except socket.timeout:
        answer = {"tag": "none"}
    told = 0
    for s in stalled:
        s.setblocking(False)
        try:
            told += 1 if s.recv(1) else 0
        except BlockingIOError:
            pass
    print(json.dumps({"held": len(stalled), "held_told": told, "next": answer}), flush=True)
    time.sleep(seconds)
    for s in stalled:
        s.close()


if __name__ == "__main__":
    main()
