"""Holds logged-in sessions open, as an agent with a busy connection pool
does, and reports whether one more still logs in.

usage: pg_hold_sessions.py HOST PORT USER DATABASE HELD SECONDS
       (the password, a token, in PGPASSWORD)

Logs HELD sessions in (psycopg, one at a time, each running SELECT 1),
then logs one more in and runs SELECT 41 + 1 on it. Prints one JSON line,
flushed, then keeps the HELD sessions open for SECONDS and exits.

outcome: {"held": N (of HELD, those that logged in), "held_error": the
          first failure among them or null,
          "next": {"ok": true, "value": 42} | {"ok": false, "sqlstate": ...,
          "message": ...}}
"""
import json
import os
import sys
import time

import psycopg


def failure(err):
    diag = getattr(err, "diag", None)
    return {
        "ok": False,
        "sqlstate": getattr(err, "sqlstate", None),
        "message": (getattr(diag, "message_primary", None) if diag else None) or str(err),
    }


def connect(host, port, user, database):
    return psycopg.connect(host=host, port=port, user=user, dbname=database,
                           password=os.environ.get("PGPASSWORD", ""), sslmode="disable",
                           autocommit=True, connect_timeout=10)


def main():
    host, port, user, database = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    held, seconds = int(sys.argv[5]), float(sys.argv[6])
    sessions, held_error = [], None
    for _ in range(held):
        try:
            conn = connect(host, port, user, database)
            conn.execute("SELECT 1").fetchall()
            sessions.append(conn)
        except psycopg.Error as err:
            held_error = failure(err)
            break
    try:
        nxt = connect(host, port, user, database)
        value = nxt.execute("SELECT 41 + 1").fetchone()[0]
        answer = {"ok": True, "value": value}
        nxt.close()
    except psycopg.Error as err:
        answer = failure(err)
    print(json.dumps({"held": len(sessions), "held_error": held_error, "next": answer}),
          flush=True)
    time.sleep(seconds)
    for conn in sessions:
        conn.close()


if __name__ == "__main__":
    main()
