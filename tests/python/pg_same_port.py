"""Two connections through tollgate from the same local port, one from
127.0.0.1 and one bound to 127.0.0.2, each made under its own task name,
then a statement on each: tollgate must tell the two sockets apart when it
names the process behind each session. With FAMILY "inet6" the second is
an AF_INET6 socket, bound to ::ffff:127.0.0.2 and connecting to the
IPv4-mapped form of HOST.

Prints "connected" once both are established (the test holds tollgate
stopped until then, so that both wait in its accept queue), waits for a
line on stdin, then logs in on each, runs SELECT 'first-FAMILY' / SELECT
'second-FAMILY', and prints what each got, as JSON.

usage: pg_same_port.py HOST PORT TOKEN FAMILY
"""
import ctypes
import json
import socket
import sys

from pg_raw import authenticate, cstr, msg, read_until

PR_SET_NAME = 15


def set_task_name(name):
    """The name the kernel records for the connect() that follows."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def login_and_select(sock, token, word):
    """The answers to the login, then to SELECT 'word' (as describe()
    gives them)."""
    refused = authenticate(sock, token)
    if refused is not None:
        return [refused]
    sock.sendall(msg(b"Q", cstr(f"SELECT '{word}'")))
    return read_until(sock, {b"Z"})


def main():
    host, port, token, family = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    set_task_name("first-conn")
    first = socket.create_connection((host, port), timeout=20)
    _, shared_port = first.getsockname()
    set_task_name("second-conn")
    if family == "inet6":
        second = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        second.settimeout(20)
        second.bind(("::ffff:127.0.0.2", shared_port))
        second.connect(("::ffff:" + host, port))
    else:
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        second.settimeout(20)
        second.bind(("127.0.0.2", shared_port))
        second.connect((host, port))
    print("connected", flush=True)
    sys.stdin.readline()
    answers = {
        "port": shared_port,
        "first": login_and_select(first, token, f"first-{family}"),
        "second": login_and_select(second, token, f"second-{family}"),
    }
    print(json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
