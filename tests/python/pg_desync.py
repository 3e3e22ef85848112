"""Message sequences that used to put tollgate's view of a session out of
step with the server's, each printed as JSON: {"answers": [...]} with one
entry per message received ({tag, sqlstate, message, values}).

Scenarios:
  collision   Parse s as FIRST_SQL + Sync; then, in one write, Parse s as
              SECOND_SQL (the server refuses the taken name) + Sync +
              Bind/Execute of s + Sync. The server runs FIRST_SQL.
  bind_error  Bind to a statement that does not exist + Query(FIRST_SQL) +
              Sync in one write (the server skips the Query); then
              Query(SECOND_SQL) on its own.
  pipeline_error
              Parse/Bind/Execute of FIRST_SQL (which fails) + Flush; after
              the error, Parse/Bind/Execute of SECOND_SQL + Sync (the
              server skips them); then Query(SECOND_SQL) on its own.
  cursor      Parse "h" as "SELECT 1", Bind portal "c" to it, then a Query
              FIRST_SQL that closes "c" and declares a cursor "c", then
              Describe/Execute of portal "c" + Sync, all in one write.
  commit_then_cursor
              Parse "h" as "SELECT 'x'::text AS e", Bind portal "c" to
              it, then Parse/Bind/Execute of "COMMIT" (which ends the
              portal on the server) and of FIRST_SQL (which opens a cursor
              named "c"), then Describe/Execute of portal "c" + Sync, all
              in one write.
  function_then_cursor
              Parse "h" as "SELECT 'x'::text AS e", Bind portal "c" to
              it, then Parse/Bind/Execute of FIRST_SQL (a function that
              closes "c" and opens a cursor under its name, in the same
              transaction), then Describe/Execute of portal "c" + Sync,
              all in one write.
  bind_function_then_cursor
              As function_then_cursor, with FIRST_SQL only parsed and
              bound, not executed (the server plans at Bind, and runs an
              immutable function of constants there).
  steps       Parse "h" as FIRST_SQL and Bind portal "c" to it, then
              Execute of "c" for one row, twice, + Sync, in one write: a
              client reading a portal in steps.
  query_then_cursor
              As commit_then_cursor, with a simple Query of SECOND_SQL in
              place of the COMMIT (a Query ends the implicit transaction
              when done, and with it the portal).
  sync_then_cursor
              Parse "h", Bind portal "c" to it, Flush, and once the server
              confirmed the Bind: Sync (which ends the implicit
              transaction, and the portal), then Parse/Bind/Execute of
              FIRST_SQL, Describe/Execute of portal "c" + Sync, in one
              write.
  describe_after_sync
              In a transaction block: Parse "h" as FIRST_SQL, Bind portal
              "c" to it, Flush, and once the server confirmed the Bind:
              Sync, Describe of portal "c", Flush, Execute of "c", Sync,
              in one write; then COMMIT.
  copy_sync   COPY orders_copy FROM STDIN, CopyDone once it starts; then
              the same COPY + Sync in one write (the server ignores the
              Sync in copy mode), CopyDone once it starts; then
              Query(FIRST_SQL), then Query(SECOND_SQL), each on its own.
  rollback    Parse/Bind/Execute of FIRST_SQL, then of SECOND_SQL (which
              fails), then Sync, in one write: one implicit transaction,
              rolled back by the second's error.
  fetch_portal
              In a transaction block: Parse (unnamed) of FIRST_SQL + Bind
              of portal "p" + Sync, no Execute; then Query(SECOND_SQL)
              (a FETCH of "p"); then COMMIT.
  fetch_parsed_first
              In a transaction block: Parse "f" of SECOND_SQL (a FETCH of
              "p") + Sync; Parse (unnamed) of FIRST_SQL + Bind of portal
              "p" + Sync; Bind (unnamed) of "f" + Execute + Sync; COMMIT.
  bind_only   Parse (unnamed) of FIRST_SQL + Bind + Sync, no Execute (the
              server plans a statement at Bind); then Query(SECOND_SQL).
  copy_data_sync
              COPY orders_copy FROM STDIN + a row of copy data + Sync in
              one write, before the server starts the copy (the Sync goes
              into the copy, which ignores it: copy data does not end a
              copy); CopyDone once it starts; then Query(FIRST_SQL), then
              Query(SECOND_SQL), each on its own.
  copy_error_sync
              COPY orders_copy FROM STDIN; once it starts, a row the copy
              fails on + Sync in one write (the server reads the Sync after
              the copy's error, no longer in copy mode); then
              Query(FIRST_SQL), then Query(SECOND_SQL), each on its own.
  copy_query  COPY orders_copy FROM STDIN + Query(FIRST_SQL) in one write,
              before the server starts the copy: the server would take
              the Query as copy data or throw it away with an error
              (PostgreSQL 13 and older), which tollgate must not take for
              an answer to come; answers are read up to the end of the
              connection.
  two_copies  One Query of two COPY orders_copy FROM STDIN; a row of copy
              data and CopyDone once each copy starts; then
              Query(FIRST_SQL), then Query(SECOND_SQL), each on its own.
  second_copy_query
              One Query of two COPY orders_copy FROM STDIN; once the first
              starts, a row of copy data + CopyDone + Query(FIRST_SQL) in
              one write: the Query comes before the second copy starts, in
              whose data the server would take it; answers are read up to
              the end of the connection.

usage: pg_desync.py HOST PORT TOKEN SCENARIO FIRST_SQL SECOND_SQL
"""
import json
import struct
import sys

from pg_raw import cstr, login, msg, read_until


def copies_then_queries(sock, sent_behind, first, second):
    """COPY orders_copy FROM STDIN once for each of `sent_behind`, sent in
    the same write behind it, and CopyDone once the copy starts; then
    Query(first) and Query(second), each on its own."""
    answers = []
    copy = msg(b"Q", cstr("COPY orders_copy FROM STDIN"))
    for behind in sent_behind:
        sock.sendall(copy + behind)
        answers += read_until(sock, [b"G"])
        sock.sendall(msg(b"c", b""))
        answers += read_until(sock, [b"Z"])
    for sql in [first, second]:
        sock.sendall(msg(b"Q", cstr(sql)))
        answers += read_until(sock, [b"Z"])
    return answers


# One Query that starts two copies, one after the other.
TWO_COPIES = "COPY orders_copy FROM STDIN; COPY orders_copy FROM STDIN"


def main():
    host, port, token, scenario, first, second = sys.argv[1:7]
    sock = login(host, port, token, timeout=15)
    answers = []
    sync = msg(b"S", b"")
    bind = msg(b"B", cstr("") + cstr("s") + struct.pack("!hhh", 0, 0, 0))
    execute = msg(b"E", cstr("") + struct.pack("!i", 0))
    # Parse, Bind and Execute of `sql` as the unnamed statement and portal.
    pbe = lambda sql: (
        msg(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
        + msg(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
        + execute
    )
    # Parse "h" as `sql` and Bind portal "c" to it.
    bind_c = lambda sql: (
        msg(b"P", cstr("h") + cstr(sql) + struct.pack("!h", 0))
        + msg(b"B", cstr("c") + cstr("h") + struct.pack("!hhh", 0, 0, 0))
    )
    describe_c = msg(b"D", b"P" + cstr("c"))
    execute_c = msg(b"E", cstr("c") + struct.pack("!i", 0))
    if scenario == "collision":
        sock.sendall(msg(b"P", cstr("s") + cstr(first) + struct.pack("!h", 0)) + sync)
        answers += read_until(sock, [b"Z"])
        sock.sendall(
            msg(b"P", cstr("s") + cstr(second) + struct.pack("!h", 0)) + sync + bind + execute + sync
        )
        answers += read_until(sock, [b"Z"], 2)
    elif scenario == "bind_error":
        missing = msg(b"B", cstr("") + cstr("no_such_statement") + struct.pack("!hhh", 0, 0, 0))
        sock.sendall(missing + msg(b"Q", cstr(first)) + sync)
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr(second)))
        answers += read_until(sock, [b"Z"])
    elif scenario == "pipeline_error":
        sock.sendall(pbe(first) + msg(b"H", b""))
        answers += read_until(sock, [b"E"])
        sock.sendall(pbe(second) + sync)
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr(second)))
        answers += read_until(sock, [b"Z"])
    elif scenario == "cursor":
        sock.sendall(
            bind_c("SELECT 1") + msg(b"Q", cstr(first)) + describe_c + execute_c + sync
        )
        answers += read_until(sock, [b"Z"], 2)
    elif scenario == "commit_then_cursor":
        sock.sendall(
            bind_c("SELECT 'x'::text AS e")
            + pbe("COMMIT")
            + pbe(first)
            + describe_c
            + execute_c
            + sync
        )
        answers += read_until(sock, [b"Z"])
    elif scenario == "function_then_cursor":
        sock.sendall(
            bind_c("SELECT 'x'::text AS e") + pbe(first) + describe_c + execute_c + sync
        )
        answers += read_until(sock, [b"Z"])
    elif scenario == "bind_function_then_cursor":
        parse_bind = msg(b"P", cstr("") + cstr(first) + struct.pack("!h", 0)) + msg(
            b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0)
        )
        sock.sendall(bind_c("SELECT 'x'::text AS e") + parse_bind + describe_c + execute_c + sync)
        answers += read_until(sock, [b"Z"])
    elif scenario == "steps":
        one_row = msg(b"E", cstr("c") + struct.pack("!i", 1))
        sock.sendall(bind_c(first) + one_row + one_row + sync)
        answers += read_until(sock, [b"Z"])
    elif scenario == "query_then_cursor":
        sock.sendall(
            bind_c("SELECT 'x'::text AS e")
            + msg(b"Q", cstr(second))
            + pbe(first)
            + describe_c
            + execute_c
            + sync
        )
        answers += read_until(sock, [b"Z"], 2)
    elif scenario == "sync_then_cursor":
        sock.sendall(bind_c("SELECT 'x'::text AS e") + msg(b"H", b""))
        answers += read_until(sock, [b"2"])
        sock.sendall(sync + pbe(first) + describe_c + execute_c + sync)
        answers += read_until(sock, [b"Z"], 2)
    elif scenario == "describe_after_sync":
        sock.sendall(msg(b"Q", cstr("BEGIN")))
        answers += read_until(sock, [b"Z"])
        sock.sendall(bind_c(first) + msg(b"H", b""))
        answers += read_until(sock, [b"2"])
        sock.sendall(sync + describe_c + msg(b"H", b"") + execute_c + sync)
        answers += read_until(sock, [b"Z"], 2)
        sock.sendall(msg(b"Q", cstr("COMMIT")))
        answers += read_until(sock, [b"Z"])
    elif scenario == "copy_sync":
        answers += copies_then_queries(sock, [b"", sync], first, second)
    elif scenario == "rollback":
        sock.sendall(pbe(first) + pbe(second) + sync)
        answers += read_until(sock, [b"Z"])
    elif scenario == "fetch_portal":
        sock.sendall(msg(b"Q", cstr("BEGIN")))
        answers += read_until(sock, [b"Z"])
        sock.sendall(
            msg(b"P", cstr("") + cstr(first) + struct.pack("!h", 0))
            + msg(b"B", cstr("p") + cstr("") + struct.pack("!hhh", 0, 0, 0))
            + sync
        )
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr(second)))
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr("COMMIT")))
        answers += read_until(sock, [b"Z"])
    elif scenario == "fetch_parsed_first":
        no_formats = struct.pack("!hhh", 0, 0, 0)
        sock.sendall(msg(b"Q", cstr("BEGIN")))
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"P", cstr("f") + cstr(second) + struct.pack("!h", 0)) + sync)
        answers += read_until(sock, [b"Z"])
        sock.sendall(
            msg(b"P", cstr("") + cstr(first) + struct.pack("!h", 0))
            + msg(b"B", cstr("p") + cstr("") + no_formats)
            + sync
        )
        answers += read_until(sock, [b"Z"])
        sock.sendall(
            msg(b"B", cstr("") + cstr("f") + no_formats)
            + msg(b"E", cstr("") + struct.pack("!i", 0))
            + sync
        )
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr("COMMIT")))
        answers += read_until(sock, [b"Z"])
    elif scenario == "bind_only":
        sock.sendall(
            msg(b"P", cstr("") + cstr(first) + struct.pack("!h", 0))
            + msg(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
            + sync
        )
        answers += read_until(sock, [b"Z"])
        sock.sendall(msg(b"Q", cstr(second)))
        answers += read_until(sock, [b"Z"])
    elif scenario == "copy_data_sync":
        answers += copies_then_queries(sock, [msg(b"d", b"copied\n") + sync], first, second)
    elif scenario == "copy_error_sync":
        sock.sendall(msg(b"Q", cstr("COPY orders_copy FROM STDIN")))
        answers += read_until(sock, [b"G"])
        sock.sendall(msg(b"d", b"one\ttoo many\n") + sync)
        answers += read_until(sock, [b"Z"])
        for sql in [first, second]:
            sock.sendall(msg(b"Q", cstr(sql)))
            answers += read_until(sock, [b"Z"])
    elif scenario == "copy_query":
        sock.sendall(msg(b"Q", cstr("COPY orders_copy FROM STDIN")) + msg(b"Q", cstr(first)))
        answers += read_until(sock, [], 1)
    elif scenario == "two_copies":
        sock.sendall(msg(b"Q", cstr(TWO_COPIES)))
        for _ in range(2):
            answers += read_until(sock, [b"G"])
            sock.sendall(msg(b"d", b"copied twice\n") + msg(b"c", b""))
        answers += read_until(sock, [b"Z"])
        for sql in [first, second]:
            sock.sendall(msg(b"Q", cstr(sql)))
            answers += read_until(sock, [b"Z"])
    elif scenario == "second_copy_query":
        sock.sendall(msg(b"Q", cstr(TWO_COPIES)))
        answers += read_until(sock, [b"G"])
        sock.sendall(msg(b"d", b"copied early\n") + msg(b"c", b"") + msg(b"Q", cstr(first)))
        answers += read_until(sock, [], 1)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps({"answers": answers}))


if __name__ == "__main__":
    main()
