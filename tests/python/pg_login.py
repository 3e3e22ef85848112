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

from pg_raw import cstr, error_fields, msg, read_message, startup


def main():
    host, port, user, database, password = sys.argv[1:6]
    sock = socket.create_connection((host, int(port)), timeout=10)
    startup(sock, user, database)
    while True:
        tag, body = read_message(sock)
        if tag == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 0:
                print(json.dumps({"outcome": "ok"}))
                return
            if code == 3:
                sock.sendall(msg(b"p", cstr(password)))
                continue
            print(json.dumps({"outcome": "unsupported-auth", "code": code}))
            return
        if tag == b"E":
            fields = error_fields(body)
            print(json.dumps({"outcome": "error", "sqlstate": fields.get("C"), "message": fields.get("M")}))
            return


if __name__ == "__main__":
    main()
