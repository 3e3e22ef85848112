"""Executes a portal right after describing a different statement, so the
RowDescription that comes back is not the portal's; prints the rows the
client received as JSON (NULL as null).

usage: pg_describe_other.py HOST PORT TOKEN
"""
import json
import struct
import sys

from pg_raw import cstr, error_fields, login, msg, read_message


def main():
    host, port, token = sys.argv[1:4]
    sock = login(host, port, token, timeout=15)
    no_types = struct.pack("!h", 0)
    batch = (
        msg(b"P", cstr("s_secret") + cstr("SELECT email FROM customers WHERE id = 1") + no_types)
        + msg(b"P", cstr("s_other") + cstr("SELECT relname FROM pg_catalog.pg_class") + no_types)
        + msg(b"B", cstr("p_secret") + cstr("s_secret") + struct.pack("!hhh", 0, 0, 0))
        + msg(b"D", b"S" + cstr("s_other"))
        + msg(b"E", cstr("p_secret") + struct.pack("!i", 0))
        + msg(b"S", b"")
    )
    sock.sendall(batch)
    rows, errors = [], []
    while True:
        tag, body = read_message(sock)
        if tag == b"D":
            (count,) = struct.unpack("!h", body[:2])
            at, row = 2, []
            for _ in range(count):
                (length,) = struct.unpack("!i", body[at : at + 4])
                at += 4
                if length < 0:
                    row.append(None)
                else:
                    row.append(body[at : at + length].decode(errors="replace"))
                    at += length
            rows.append(row)
        if tag == b"E":
            errors.append(error_fields(body))
        if tag == b"Z":
            break
    print(json.dumps({"rows": rows, "errors": errors}))


if __name__ == "__main__":
    main()
