"""Tries to make tollgate decide one statement while the server runs
another: parse `s1` as a refused statement, re-parse `s1` as a harmless one
(the server refuses the duplicate name and keeps the first), then bind and
execute `s1`. Prints every answer as JSON lines of {tag, sqlstate, message}.

usage: pg_reparse.py HOST PORT TOKEN FIRST_SQL SECOND_SQL
"""
import json
import socket
import struct
import sys

from pg_raw import cstr, msg, read_message, read_until, startup


def main():
    host, port, token, first, second = sys.argv[1:6]
    sock = socket.create_connection((host, int(port)), timeout=15)
    startup(sock)
    read_message(sock)
    sock.sendall(msg(b"p", cstr(token)))
    answers = []
    answers += read_until(sock, [b"Z"])
    sync = msg(b"S", b"")
    sock.sendall(msg(b"P", cstr("s1") + cstr(first) + struct.pack("!h", 0)) + sync)
    answers += read_until(sock, [b"Z"])
    sock.sendall(msg(b"P", cstr("s1") + cstr(second) + struct.pack("!h", 0)) + sync)
    answers += read_until(sock, [b"Z"])
    bind = cstr("") + cstr("s1") + struct.pack("!hhh", 0, 0, 0)
    sock.sendall(msg(b"B", bind) + msg(b"E", cstr("") + struct.pack("!i", 0)) + sync)
    answers += read_until(sock, [b"Z"])
    for a in answers:
        print(json.dumps(a))


if __name__ == "__main__":
    main()
