"""Refusals in places where the client has not asked for ReadyForQuery:
each scenario prints what the client got, as JSON, or {"timeout": ...} when
an answer the protocol owes the client never came.

Scenarios:
  flush       Parse/Bind/Execute of REFUSED_SQL, then Flush (no Sync): the
              error must come on the Flush; then Sync, then a SELECT 1.
  unsynced    Parse/Bind/Execute of ALLOWED_SQL with no Sync, then a simple
              Query of REFUSED_SQL: both answers must come.
  copy        COPY ALLOWED_TABLE FROM STDIN, then a simple Query in the
              middle of the copy data: the session ends with FATAL 08P01.
  copy_early  COPY ALLOWED_TABLE FROM STDIN, one row (REFUSED_SQL is the
              row's text) and CopyDone, sent before the server's
              CopyInResponse; SELECT count(*) FROM ALLOWED_TABLE as soon as
              that arrives, before the copy's ReadyForQuery: both complete.
  transaction BEGIN, then REFUSED_SQL, then ROLLBACK: the refusal aborts
              the transaction as a server error would.

usage: pg_unsynced.py HOST PORT TOKEN SCENARIO REFUSED_SQL ALLOWED_SQL
"""
import json
import socket
import struct
import sys

from pg_raw import cstr, login, msg, read_until


def parse_bind_execute(sql):
    return (
        msg(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
        + msg(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
        + msg(b"E", cstr("") + struct.pack("!i", 0))
    )


def main():
    host, port, token, scenario, refused, allowed = sys.argv[1:7]
    sock = login(host, port, token, timeout=10)
    result = {}
    try:
        if scenario == "flush":
            sock.sendall(parse_bind_execute(refused) + msg(b"H", b""))
            result["on_flush"] = read_until(sock, [b"E"])
            sock.sendall(msg(b"S", b""))
            result["on_sync"] = read_until(sock, [b"Z"])
            sock.sendall(msg(b"Q", cstr("SELECT 1")))
            result["after"] = read_until(sock, [b"Z"])
        elif scenario == "unsynced":
            sock.sendall(parse_bind_execute(allowed) + msg(b"Q", cstr(refused)))
            result["answers"] = read_until(sock, [b"Z"])
            sock.sendall(msg(b"Q", cstr("SELECT 1")))
            result["after"] = read_until(sock, [b"Z"])
        elif scenario == "copy":
            sock.sendall(msg(b"Q", cstr(f"COPY {allowed} FROM STDIN")))
            result["copy"] = read_until(sock, [b"G", b"E"])
            sock.sendall(msg(b"Q", cstr(refused)))
            result["answers"] = read_until(sock, [b"Z"])
        elif scenario == "copy_early":
            sock.sendall(
                msg(b"Q", cstr(f"COPY {allowed} FROM STDIN"))
                + msg(b"d", refused.encode() + b"\n")
                + msg(b"c", b"")
            )
            # The next query goes out as soon as the copy has started,
            # while the server is still committing it.
            started = read_until(sock, [b"G"])
            sock.sendall(msg(b"Q", cstr(f"SELECT count(*) FROM {allowed}")))
            result["answers"] = started + read_until(sock, [b"Z"], count=2)
            sock.sendall(msg(b"Q", cstr("SELECT 1")))
            result["after"] = read_until(sock, [b"Z"])
        elif scenario == "transaction":
            sock.sendall(msg(b"Q", cstr("BEGIN")))
            result["begin"] = read_until(sock, [b"Z"])
            sock.sendall(msg(b"Q", cstr(refused)))
            result["refused"] = read_until(sock, [b"Z"])
            sock.sendall(msg(b"Q", cstr("ROLLBACK")))
            result["rollback"] = read_until(sock, [b"Z"])
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except socket.timeout as err:
        result["timeout"] = str(err)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
