"""After login, sends the given statements as simple Queries in one write
(a pipeline that does not wait for answers); prints as JSON what the
client received up to the end of the connection or the last ReadyForQuery.

usage: pg_pipeline.py HOST PORT TOKEN STATEMENT...
"""
import json
import sys

from pg_raw import cstr, login, msg, read_until


def main():
    host, port, token = sys.argv[1:4]
    statements = sys.argv[4:]
    sock = login(host, port, token, timeout=15)
    sock.sendall(b"".join(msg(b"Q", cstr(s)) for s in statements))
    print(json.dumps({"answers": read_until(sock, [b"Z"], count=len(statements))}))


if __name__ == "__main__":
    main()
