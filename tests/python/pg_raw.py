"""The few pieces of the PostgreSQL wire protocol the test scripts speak by
hand (libpq hides SQLSTATEs at login, refuses empty passwords and has no
FunctionCall in the drivers here)."""
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
