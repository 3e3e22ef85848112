"""Logs in (token as password), sends a FunctionCall message for a function
OID, then a simple query, and reports what the server side answered to
each, as JSON: {"call": {...}, "after": {...}}.

libpq's PQfn is the only common client of FunctionCall and no driver here
exposes it, so the protocol is spoken by hand.

usage: pg_function_call.py HOST PORT TOKEN FUNCTION_OID ARGUMENT
"""
import json
import socket
import struct
import sys

from pg_raw import cstr, error_fields, msg, read_message, startup


def until_ready(sock):
    """Collects the answer up to ReadyForQuery."""
    answer = {"tags": []}
    while True:
        tag, body = read_message(sock)
        answer["tags"].append(tag.decode())
        if tag == b"E":
            fields = error_fields(body)
            answer["sqlstate"], answer["message"] = fields.get("C"), fields.get("M")
        if tag == b"V":
            (length,) = struct.unpack("!i", body[:4])
            answer["result"] = None if length < 0 else body[4 : 4 + length].decode(errors="replace")
        if tag == b"D":
            answer.setdefault("rows", 0)
            answer["rows"] += 1
        if tag == b"Z":
            return answer


def main():
    host, port, token, oid, argument = sys.argv[1:6]
    sock = socket.create_connection((host, int(port)), timeout=10)
    startup(sock)
    tag, body = read_message(sock)
    assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 3, (tag, body)
    sock.sendall(msg(b"p", cstr(token)))
    login = until_ready(sock)
    if "sqlstate" in login:
        print(json.dumps({"login": login}))
        return
    arg = argument.encode()
    body = struct.pack("!IhhhiB", int(oid), 1, 0, 1, len(arg), 0)[:-1] + arg + struct.pack("!h", 0)
    sock.sendall(msg(b"F", body))
    call = until_ready(sock)
    sock.sendall(msg(b"Q", cstr("SELECT 1")))
    after = until_ready(sock)
    print(json.dumps({"call": call, "after": after}))


if __name__ == "__main__":
    main()
