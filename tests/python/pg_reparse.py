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


def msg(tag, body):
    return tag + struct.pack("!i", 4 + len(body)) + body


def cstr(text):
    return text.encode() + b"\0"


def read_message(sock):
    header = b""
    while len(header) < 5:
        chunk = sock.recv(5 - len(header))
        if not chunk:
            raise EOFError("connection closed")
        header += chunk
    tag, length = header[:1], struct.unpack("!i", header[1:])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise EOFError("connection closed")
        body += chunk
    return tag, body


def until_ready(sock, out):
    while True:
        tag, body = read_message(sock)
        entry = {"tag": tag.decode()}
        if tag == b"E":
            fields = {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}
            entry["sqlstate"], entry["message"] = fields.get("C"), fields.get("M")
        out.append(entry)
        if tag == b"Z":
            return


def main():
    host, port, token, first, second = sys.argv[1:6]
    sock = socket.create_connection((host, int(port)), timeout=15)
    params = b"user\0agent\0database\0orders\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    read_message(sock)
    sock.sendall(msg(b"p", cstr(token)))
    answers = []
    until_ready(sock, answers)
    sync = msg(b"S", b"")
    sock.sendall(msg(b"P", cstr("s1") + cstr(first) + struct.pack("!h", 0)) + sync)
    until_ready(sock, answers)
    sock.sendall(msg(b"P", cstr("s1") + cstr(second) + struct.pack("!h", 0)) + sync)
    until_ready(sock, answers)
    bind = cstr("") + cstr("s1") + struct.pack("!hhh", 0, 0, 0)
    sock.sendall(msg(b"B", bind) + msg(b"E", cstr("") + struct.pack("!i", 0)) + sync)
    until_ready(sock, answers)
    for a in answers:
        print(json.dumps(a))


if __name__ == "__main__":
    main()
