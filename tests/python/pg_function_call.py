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


def until_ready(sock):
    """Collects the answer up to ReadyForQuery."""
    answer = {"tags": []}
    while True:
        tag, body = read_message(sock)
        answer["tags"].append(tag.decode())
        if tag == b"E":
            fields = {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}
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
    params = b"user\0agent\0database\0orders\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    tag, body = read_message(sock)
    assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 3, (tag, body)
    payload = token.encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!i", 4 + len(payload)) + payload)
    login = until_ready(sock)
    if "sqlstate" in login:
        print(json.dumps({"login": login}))
        return
    arg = argument.encode()
    body = struct.pack("!IhhhiB", int(oid), 1, 0, 1, len(arg), 0)[:-1] + arg + struct.pack("!h", 0)
    sock.sendall(b"F" + struct.pack("!i", 4 + len(body)) + body)
    call = until_ready(sock)
    query = b"SELECT 1\0"
    sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
    after = until_ready(sock)
    print(json.dumps({"call": call, "after": after}))


if __name__ == "__main__":
    main()
