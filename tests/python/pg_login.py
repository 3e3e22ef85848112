"""Logs in to a PostgreSQL server with a raw protocol exchange and reports
what the server answered, as JSON: {"outcome": "ok"} or
{"outcome": "error", "sqlstate": ..., "message": ...}.

libpq refuses to send an empty password, so the "no token" case needs a
client that speaks the protocol itself.

usage: pg_login.py HOST PORT USER DATABASE PASSWORD
"""
import json
import socket
import struct
import sys


def read_message(sock):
    header = b""
    while len(header) < 5:
        chunk = sock.recv(5 - len(header))
        if not chunk:
            raise EOFError("server closed the connection")
        header += chunk
    tag, length = header[:1], struct.unpack("!i", header[1:])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise EOFError("server closed the connection")
        body += chunk
    return tag, body


def error_fields(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def main():
    host, port, user, database, password = sys.argv[1:6]
    sock = socket.create_connection((host, int(port)), timeout=10)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    sock.sendall(startup)
    while True:
        tag, body = read_message(sock)
        if tag == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 0:
                print(json.dumps({"outcome": "ok"}))
                return
            if code == 3:
                payload = password.encode() + b"\0"
                sock.sendall(b"p" + struct.pack("!i", 4 + len(payload)) + payload)
                continue
            print(json.dumps({"outcome": "unsupported-auth", "code": code}))
            return
        if tag == b"E":
            fields = error_fields(body)
            print(json.dumps({"outcome": "error", "sqlstate": fields.get("C"), "message": fields.get("M")}))
            return


if __name__ == "__main__":
    main()
