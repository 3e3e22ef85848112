"""Logs in to a PostgreSQL server with a raw protocol exchange and reports
what the server answered, as JSON: {"outcome": "ok"} or
{"outcome": "error", "sqlstate": ..., "message": ...}.

libpq refuses to send an empty password, so the "no token" case needs a
client that speaks the protocol itself.

With COUNT, logs in COUNT times, one connection after another, and
reports how many of each answer there were: {"count": COUNT, "outcomes":
{"ok": n, "28000": m, ...}} (an error is counted by its SQLSTATE).

usage: pg_login.py HOST PORT USER DATABASE PASSWORD [COUNT]
"""
import json
import socket
import struct
import sys

from pg_raw import cstr, error_fields, msg, read_message, startup


def login(host, port, user, database, password):
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        startup(sock, user, database)
        while True:
            tag, body = read_message(sock)
            if tag == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 0:
                    return {"outcome": "ok"}
                if code == 3:
                    sock.sendall(msg(b"p", cstr(password)))
                    continue
                return {"outcome": "unsupported-auth", "code": code}
            if tag == b"E":
                fields = error_fields(body)
                return {"outcome": "error", "sqlstate": fields.get("C"), "message": fields.get("M")}


def main():
    host, port, user, database, password = sys.argv[1:6]
    if len(sys.argv) < 7:
        print(json.dumps(login(host, port, user, database, password)))
        return
    count = int(sys.argv[6])
    outcomes = {}
    for _ in range(count):
        answer = login(host, port, user, database, password)
        key = answer.get("sqlstate") or answer["outcome"]
        outcomes[key] = outcomes.get(key, 0) + 1
    print(json.dumps({"count": count, "outcomes": outcomes}))


if __name__ == "__main__":
    main()
