"""The few pieces of the PostgreSQL wire protocol the test scripts speak by
hand (libpq hides SQLSTATEs at login, refuses empty passwords and has no
FunctionCall in the drivers here)."""
import socket
import struct


def msg(tag, body):
    """One tagged message: tag, length, body."""
    return tag + struct.pack("!i", 4 + len(body)) + body


def cstr(text):
    return text.encode() + b"\0"


def read_message(sock):
    """(tag, body) of the next message; EOFError when the peer closes."""
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


def error_fields(body):
    """ErrorResponse / NoticeResponse fields by their one-letter code."""
    return {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}


def startup(sock, user="agent", database="orders"):
    """Sends a protocol 3.0 StartupMessage."""
    params = cstr("user") + cstr(user) + cstr("database") + cstr(database) + b"\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)


def describe(tag, body):
    """One server message as a JSON-able entry: its tag, and what the
    tests look at (error fields, ReadyForQuery status, DataRow values)."""
    entry = {"tag": tag.decode()}
    if tag in (b"E", b"N"):
        fields = error_fields(body)
        entry["severity"] = fields.get("V") or fields.get("S")
        entry["sqlstate"], entry["message"] = fields.get("C"), fields.get("M")
    if tag == b"Z":
        entry["status"] = body.decode()
    if tag == b"D":
        (n,) = struct.unpack("!h", body[:2])
        values, at = [], 2
        for _ in range(n):
            (length,) = struct.unpack("!i", body[at : at + 4])
            at += 4
            values.append(None if length < 0 else body[at : at + length].decode(errors="replace"))
            at += max(length, 0)
        entry["values"] = values
    return entry


def read_until(sock, stop_tags, count=1):
    """Entries up to and including the count-th message with a tag in
    stop_tags, or up to the end of the connection (then the last entry
    is "closed")."""
    got = []
    while count:
        try:
            tag, body = read_message(sock)
        except EOFError:
            got.append({"tag": "closed"})
            return got
        got.append(describe(tag, body))
        if tag in stop_tags:
            count -= 1
    return got


def count_until_ready(sock, counted_tag):
    """Reads answers up to a ReadyForQuery: {"count": messages tagged
    counted_tag, "errors": [fields of each ErrorResponse], "ready": bool},
    with "timeout" when answers stop coming."""
    result = {"count": 0, "errors": [], "ready": False}
    try:
        while True:
            tag, body = read_message(sock)
            if tag == counted_tag:
                result["count"] += 1
            elif tag == b"E":
                result["errors"].append(error_fields(body))
            elif tag == b"Z":
                result["ready"] = True
                return result
    except (socket.timeout, EOFError) as e:
        result["timeout"] = str(e)
    return result


def authenticate(sock, token):
    """Logs in on `sock` as the agent with `token`: None once the session
    is ready for queries, else the error the login ended with (as
    describe() gives it)."""
    startup(sock)
    while True:
        tag, body = read_message(sock)
        if tag == b"R" and struct.unpack("!i", body[:4])[0] == 3:
            sock.sendall(msg(b"p", cstr(token)))
        elif tag == b"E":
            return describe(tag, body)
        elif tag == b"Z":
            return None


def login(host, port, token, timeout):
    """A session logged in as the agent with `token`, ready for queries."""
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    refused = authenticate(sock, token)
    if refused is not None:
        raise RuntimeError("login refused: %s" % (refused,))
    return sock
