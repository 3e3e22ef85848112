"""COUNT Parse messages of a statement of SIZE bytes, unnamed, with no
Sync until the last, sent by one thread while another reads the answers:
more statement text than tollgate keeps in flight for a session. Prints
{"parsed": n, "ready": bool} as JSON, or {"timeout": ...} if answers
stop coming.

usage: pg_big_parses.py HOST PORT TOKEN COUNT SIZE
"""
import json
import struct
import sys
import threading

from pg_raw import count_until_ready, cstr, login, msg


def main():
    host, port, token, count, size = sys.argv[1:6]
    count, size = int(count), int(size)
    sock = login(host, port, token, timeout=60)
    text = "SELECT 1 /* " + "x" * size + " */"
    parse = msg(b"P", cstr("") + cstr(text) + struct.pack("!h", 0))

    def send():
        for _ in range(count):
            sock.sendall(parse)
        sock.sendall(msg(b"S", b""))

    threading.Thread(target=send, daemon=True).start()
    result = count_until_ready(sock, b"1")
    result["parsed"] = result.pop("count")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
