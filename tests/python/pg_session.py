"""One PostgreSQL session (psycopg, autocommit) driven line by line, so a
test can run statements over a connection that stays open.

usage: pg_session.py HOST PORT USER DATABASE PASSWORD

Prints one JSON line when connected ({"ok": true} or {"ok": false, ...}),
then reads one SQL statement per stdin line (JSON string) and answers each
with one JSON line: {"ok": true, "rows": [[...], ...]} or
{"ok": false, "sqlstate": ..., "severity": ..., "message": ..., "closed": bool}.
"""
import json
import sys

import psycopg


def failure(err, conn):
    diag = getattr(err, "diag", None)
    return {
        "ok": False,
        "sqlstate": getattr(err, "sqlstate", None),
        "severity": getattr(diag, "severity_nonlocalized", None) if diag else None,
        "message": (getattr(diag, "message_primary", None) if diag else None) or str(err),
        "closed": conn is None or conn.closed,
    }


def main():
    host, port, user, database, password = sys.argv[1:6]
    try:
        conn = psycopg.connect(host=host, port=int(port), user=user, dbname=database,
                               password=password, sslmode="disable", autocommit=True,
                               connect_timeout=10)
    except psycopg.Error as err:
        print(json.dumps(failure(err, None)), flush=True)
        return
    print(json.dumps({"ok": True}), flush=True)
    for line in sys.stdin:
        sql = json.loads(line)
        try:
            cur = conn.execute(sql)
            rows = cur.fetchall() if cur.description else []
            print(json.dumps({"ok": True, "rows": rows}, default=str), flush=True)
        except psycopg.Error as err:
            print(json.dumps(failure(err, conn)), flush=True)


if __name__ == "__main__":
    main()
