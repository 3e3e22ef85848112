"""A client that sends one statement with a large answer and stops
reading for a while, as a stalled or hostile agent can; then it reads
until the connection ends or nothing comes for 20 s. Prints
{"closed": bool, "bytes": n, "tags": [the last few message tags]} as JSON.

usage: pg_stop_reading.py HOST PORT TOKEN SQL PAUSE_SECONDS
"""
import json
import socket
import struct
import sys
import time

from pg_raw import cstr, login, msg


def main():
    host, port, token, sql, pause = sys.argv[1:6]
    sock = login(host, port, token, timeout=60)
    sock.sendall(msg(b"Q", cstr(sql)))
    time.sleep(float(pause))
    sock.settimeout(20)
    result = {"closed": False, "bytes": 0, "tags": []}
    pending = b""
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                result["closed"] = True
                break
            result["bytes"] += len(chunk)
            pending += chunk
            # Message tags, as far as whole headers go (the last message
            # may be cut off).
            while len(pending) >= 5:
                length = struct.unpack("!i", pending[1:5])[0]
                if len(pending) < 1 + length:
                    break
                result["tags"] = (result["tags"] + [pending[:1].decode()])[-5:]
                pending = pending[1 + length :]
    except socket.timeout:
        pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
