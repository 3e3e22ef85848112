"""After login, sends in one write an INSERT the policy admits and then a
malformed message of the kind named on the command line; prints as JSON
what the client received up to the end of the connection.

usage: pg_malformed.py HOST PORT TOKEN KIND
KIND: not-utf8 (a Query whose text is not UTF-8), cut-parse (a Parse cut
short: its text has no terminator), unknown (a message type protocol 3.0 lacks),
flush-with-body and sync-with-body (a Flush or Sync with a byte in its body,
which has none; the server would answer such a Flush with an error and skip
to the next Sync)
"""
import json
import sys

from pg_raw import cstr, login, msg, read_until

MALFORMED = {
    "not-utf8": msg(b"Q", b"SELECT '\xff\xfe'\0"),
    "cut-parse": msg(b"P", cstr("s1") + b"SELECT 1"),
    "unknown": msg(b"y", b""),
    "flush-with-body": msg(b"H", b"\0"),
    "sync-with-body": msg(b"S", b"\0"),
}



def main():
    host, port, token, kind = sys.argv[1:5]
    sock = login(host, port, token, timeout=15)
    admitted = msg(b"Q", cstr("INSERT INTO customers (id, name, email) VALUES (900, 'before', 'b@example.com')"))
    sock.sendall(admitted + MALFORMED[kind])
    print(json.dumps({"answers": read_until(sock, [], count=-1)}))


if __name__ == "__main__":
    main()
