"""A client that pipelines COUNT Syncs without reading its answers, as a
careless or hostile one can. After sending for a while (its sends block
once tollgate stops reading), it prints "stalled" and waits for a line on
stdin; then it reads every answer and prints
{"ready": n, "sent": bool, "other": [tags]} as JSON.

usage: pg_sync_flood.py HOST PORT TOKEN COUNT
"""
import json
import struct
import sys
import threading
import time

from pg_raw import login, msg


def main():
    host, port, token, count = sys.argv[1:5]
    count = int(count)
    sock = login(host, port, token, timeout=120)
    sent = threading.Event()

    def send():
        sock.sendall(msg(b"S", b"") * count)
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    # Long enough for every socket buffer on the way to fill.
    time.sleep(3)
    print("stalled", flush=True)
    sys.stdin.readline()
    result = {"ready": 0, "other": []}
    # Millions of answers: read in large pieces, messages cut out of them.
    pending = b""
    while result["ready"] < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed")
        pending += chunk
        at = 0
        while len(pending) - at >= 5:
            length = struct.unpack("!i", pending[at + 1 : at + 5])[0]
            if len(pending) - at < 1 + length:
                break
            tag = pending[at : at + 1]
            if tag == b"Z":
                result["ready"] += 1
            elif len(result["other"]) < 20:
                result["other"].append(tag.decode())
            at += 1 + length
        pending = pending[at:]
    result["sent"] = sent.wait(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
