"""Tries one way of reaching a PostgreSQL port and reports, as JSON, who
answered: the pinning tests run it inside an agent cgroup.

The first answer to a startup message tells the two apart: tollgate asks
for a cleartext password (the token), AuthenticationCleartextPassword
(code 3); the test PostgreSQL asks for SCRAM, AuthenticationSASL (code 10).

usage:
  escape.py tcp HOST PORT [--fastopen]     -> {"outcome": "tollgate"|"postgres"|"refused"|"denied", ...}
  escape.py udp HOST PORT [--connect]      -> {"outcome": "sent"|"denied", ...}
  escape.py raw                            -> {"outcome": "created"|"denied", ...}
  escape.py precreated HOST PORT CGROUP    -> like tcp, but the socket is made
                                              before joining CGROUP
"""
import errno
import json
import socket
import struct
import sys


def startup_message():
    params = b"user\0agent\0database\0orders\0\0"
    body = struct.pack("!i", 196608) + params
    return struct.pack("!i", len(body) + 4) + body


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def answer(sock):
    """Reads the first message after the startup message."""
    sock.settimeout(5)
    header = b""
    while len(header) < 9:
        chunk = sock.recv(9 - len(header))
        if not chunk:
            break
        header += chunk
    if len(header) < 9 or header[:1] != b"R":
        return {"outcome": "other", "bytes": header.hex()}
    code = struct.unpack("!i", header[5:9])[0]
    who = {3: "tollgate", 10: "postgres"}.get(code, "other")
    return {"outcome": who, "auth_code": code}


def failure(err):
    if err.errno in (errno.EPERM, errno.EACCES):
        return {"outcome": "denied", "errno": err.errno}
    if err.errno == errno.ECONNREFUSED:
        return {"outcome": "refused", "errno": err.errno}
    return {"outcome": "error", "errno": err.errno, "message": str(err)}


def tcp(host, port, fastopen=False, sock=None):
    sock = sock or socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        if fastopen:
            # The connect happens inside sendto: the path io_uring-less TFO
            # clients take.
            sock.sendto(startup_message(), socket.MSG_FASTOPEN, (host, port))
        else:
            sock.connect((host, port))
            sock.sendall(startup_message())
        result = answer(sock)
        peer = sock.getpeername()
        result["peer"] = "%s:%d" % (peer[0], peer[1])
        return result
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def udp(host, port, connect=False):
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        if connect:
            sock.connect((host, port))
            sock.send(b"x")
        else:
            sock.sendto(b"x", (host, port))
        return {"outcome": "sent"}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def raw():
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        sock.close()
        return {"outcome": "created"}
    except OSError as err:
        return failure(err)


def precreated(host, port, cgroup):
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    with open(cgroup + "/cgroup.procs", "w") as procs:
        procs.write("0")
    return tcp(host, port, sock=sock)


def main(argv):
    mode = argv[1]
    if mode == "tcp":
        result = tcp(argv[2], int(argv[3]), fastopen="--fastopen" in argv)
    elif mode == "udp":
        result = udp(argv[2], int(argv[3]), connect="--connect" in argv)
    elif mode == "raw":
        result = raw()
    elif mode == "precreated":
        result = precreated(argv[2], int(argv[3]), argv[4])
    else:
        raise SystemExit("unknown mode " + mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
