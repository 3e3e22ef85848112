"""A pipeline larger than the sockets between client, tollgate and server
can hold: COUNT Parse/Bind/Execute of SQL, one Sync, sent by one thread
while another reads the answers (as libpq's pipeline mode does). Prints
{"complete": n, "errors": [...], "ready": bool} as JSON, or
{"timeout": ...} when answers stop coming.

usage: pg_pipeline_flood.py HOST PORT TOKEN COUNT SQL
"""
import json
import struct
import sys
import threading

from pg_raw import count_until_ready, cstr, login, msg


def main():
    host, port, token, count, sql = sys.argv[1:6]
    count = int(count)
    sock = login(host, port, token, timeout=30)
    one = (
        msg(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
        + msg(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
        + msg(b"E", cstr("") + struct.pack("!i", 0))
    )
    sender = threading.Thread(
        target=lambda: sock.sendall(one * count + msg(b"S", b"")), daemon=True
    )
    sender.start()
    result = count_until_ready(sock, b"C")
    result["complete"] = result.pop("count")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
