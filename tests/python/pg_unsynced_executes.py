"""One named statement of SIZE bytes (a long comment), then COUNT Bind and
Execute pairs of it with no Sync and no Flush: each Execute's audit record
carries the whole statement, so the requests in flight hold COUNT * SIZE
bytes of text. PostgreSQL keeps its answers until a Sync or a Flush (or
8 KiB of them), so a client gets answers before it sends either only if
tollgate asked for them, as it does when it must wait for room.

Reads answers until none has come for WAIT seconds, then sends Sync and
reads the rest. Prints {"before_sync_completed": CommandCompletes read
before the Sync,
"completed": CommandCompletes in all, "ready": bool, "errors": [fields
of each ErrorResponse after the Sync]} as JSON.

usage: pg_unsynced_executes.py HOST PORT TOKEN COUNT SIZE WAIT
"""
import json
import socket
import struct
import sys

from pg_raw import count_until_ready, cstr, login, msg, read_message


def main():
    host, port, token, count, size, wait = sys.argv[1:7]
    count, size, wait = int(count), int(size), float(wait)
    sock = login(host, port, token, timeout=120)
    text = "SELECT 1 /* " + "x" * size + " */"
    sock.sendall(msg(b"P", cstr("s") + cstr(text) + struct.pack("!h", 0)))
    bind = msg(b"B", cstr("") + cstr("s") + struct.pack("!hhh", 0, 0, 0))
    execute = msg(b"E", cstr("") + struct.pack("!i", 0))
    sock.sendall((bind + execute) * count)
    before_sync = 0
    sock.settimeout(wait)
    try:
        while True:
            tag, _ = read_message(sock)
            before_sync += tag == b"C"
    except socket.timeout:
        pass
    sock.settimeout(120)
    sock.sendall(msg(b"S", b""))
    result = count_until_ready(sock, b"C")
    completed = before_sync + result["count"]
    print(json.dumps({
        "before_sync_completed": before_sync,
        "completed": completed,
        "ready": result["ready"],
        "errors": result["errors"],
    }))


if __name__ == "__main__":
    main()
