"""After login, sends the given statements in one write (a pipeline that
does not wait for answers); prints as JSON what the client received up to
the end of the connection or the last ReadyForQuery.

usage: pg_pipeline.py HOST PORT TOKEN [--extended | --unsynced-first | --bound-first] STATEMENT...
Each statement goes as a simple Query, or with --extended as Parse, Bind,
Execute and Sync of the unnamed statement and portal. With
--unsynced-first the first goes as Parse, Bind and Execute with no Sync
after it, the others as simple Queries right behind it; with
--bound-first the first goes as Parse and Bind only (the server plans it,
and never runs it).
"""
import json
import struct
import sys

from pg_raw import cstr, login, msg, read_until


def bound(statement):
    no_formats_or_parameters = struct.pack("!hhh", 0, 0, 0)
    return msg(b"P", cstr("") + cstr(statement) + struct.pack("!h", 0)) + msg(
        b"B", cstr("") + cstr("") + no_formats_or_parameters
    )


def unsynced(statement):
    return bound(statement) + msg(b"E", cstr("") + struct.pack("!i", 0))


def extended(statement):
    return unsynced(statement) + msg(b"S", b"")


def main():
    host, port, token = sys.argv[1:4]
    statements = sys.argv[4:]
    as_messages = lambda s: msg(b"Q", cstr(s))
    first = b""
    if statements and statements[0] == "--extended":
        statements, as_messages = statements[1:], extended
    elif statements and statements[0] == "--unsynced-first":
        first, statements = unsynced(statements[1]), statements[2:]
    elif statements and statements[0] == "--bound-first":
        first, statements = bound(statements[1]), statements[2:]
    sock = login(host, port, token, timeout=15)
    sock.sendall(first + b"".join(as_messages(s) for s in statements))
    print(json.dumps({"answers": read_until(sock, [b"Z"], count=len(statements))}))


if __name__ == "__main__":
    main()
