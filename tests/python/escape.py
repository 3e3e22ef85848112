"""Tries one way of reaching a PostgreSQL port and reports, as JSON, who
answered: the pinning tests run it inside an agent cgroup.

The first answer to a startup message tells the two apart: tollgate asks
for a cleartext password (the token), AuthenticationCleartextPassword
(code 3); the test PostgreSQL asks for SCRAM, AuthenticationSASL (code 10).

usage:
  escape.py tcp HOST PORT [--fastopen] [--source ADDR] [--device DEV] [--wait SECONDS]
                                           -> {"outcome": "tollgate"|"postgres"|"refused"|"denied"
                                                          |"no-answer", ...}
                                              (--source: bind the socket to ADDR, any port, first;
                                              --device: bind it to the network device DEV
                                              (SO_BINDTODEVICE) first;
                                              --wait: how long to wait for an answer, default 5)
  escape.py udp HOST PORT [--connect] [--count N] [--via HOP [--strict] [--per-message]]
               [--timestamp-option]
                                           -> {"outcome": "sent"|"denied", "cookie": ...}
                                              (--via: source-route the datagrams through HOP
                                              first: an IPv4 loose source route option
                                              (IP_OPTIONS) or an IPv6 segment routing header
                                              (IPV6_RTHDR, type 4), set on the socket, or with
                                              --per-message passed with each datagram (IPv4
                                              only: IPv6 takes a type 2 header there, from
                                              kernels built with Mobile IPv6); --strict: a
                                              strict source route instead of a loose one;
                                              --timestamp-option: an IPv4 timestamp option on
                                              the socket, which routes nothing)
  escape.py udplite HOST PORT              -> a UDP-Lite socket, connected to HOST:PORT, sends one
                                              datagram (no socket hook sees a connected
                                              UDP-Lite socket's destination):
                                              {"outcome": "sent"|"denied", ...}
  escape.py raw                            -> {"outcome": "created"|"denied", ...}
  escape.py mptcp                          -> a Multipath TCP socket: {"outcome": "created"|"denied", ...}
  escape.py rawsend HOST PORT              -> a hand-made TCP SYN on a raw socket:
                                              {"outcome": "sent"|"denied", "cookie": ...}
  escape.py rawsend-ah HOST PORT          -> a UDP header to PORT behind an IPsec authentication
                                              header, on a raw IPv4 socket:
                                              {"outcome": "sent"|"denied", "cookie": ...}
  escape.py rawsend6 HOST PORT KIND [N]    -> a hand-made IPv6 packet on a raw socket, KIND one of
                                              "options" (N destination options headers, then a
                                              UDP header to PORT), "ah" (an authentication
                                              header, then that UDP header), "cut-short" (one
                                              destination options header, then the first two
                                              bytes of a UDP header: no port), "esp" (an ESP
                                              header, the ports encrypted behind it) and
                                              "later-fragment" (a fragment after the first: no
                                              ports):
                                              {"outcome": "sent"|"denied", "cookie": ...}
  escape.py ping HOST                      -> an ICMP echo request on an ICMP datagram ("ping")
                                              socket, which net.ipv4.ping_group_range must let
                                              the caller's group open:
                                              {"outcome": "sent"|"denied"|"error",
                                               "replied": true|false, ...}
  escape.py precreated HOST PORT CGROUP    -> like tcp, but the socket is made
                                              before joining CGROUP
  escape.py listen HOST PORT               -> bind HOST:PORT and listen, as a process
                                              taking tollgate's listener port would:
                                              {"outcome": "bound"|"denied"|"in-use", ...}
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


def answer(sock, wait):
    """Reads the first message after the startup message."""
    sock.settimeout(wait)
    header = b""
    while len(header) < 9:
        try:
            chunk = sock.recv(9 - len(header))
        except socket.timeout:
            # Connected, but nobody serves: a listener not yet accepting.
            return {"outcome": "no-answer", "seconds": wait}
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
    if err.errno == errno.EADDRINUSE:
        return {"outcome": "in-use", "errno": err.errno}
    return {"outcome": "error", "errno": err.errno, "message": str(err)}


def tcp(host, port, fastopen=False, sock=None, source=None, wait=5.0, device=None):
    sock = sock or socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        if device is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if source is not None:
            sock.bind((source, 0))
        if fastopen:
            # The connect happens inside sendto: the path io_uring-less TFO
            # clients take.
            sock.sendto(startup_message(), socket.MSG_FASTOPEN, (host, port))
        else:
            sock.connect((host, port))
            sock.sendall(startup_message())
        result = answer(sock, wait)
        peer = sock.getpeername()
        result["peer"] = "%s:%d" % (peer[0], peer[1])
        return result
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


SO_COOKIE = 57


def cookie_of(sock):
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


IPOPT_LSRR = 131
IPOPT_SSRR = 137
# Type, length, pointer, flags (timestamps only), and room for one.
TIMESTAMP_OPTION = bytes([68, 8, 5, 0, 0, 0, 0, 0])
# The cmsg type that passes IPv4 options with one message.
IP_RETOPTS = 7
IPV6_SRCRT_TYPE_4 = 4


def source_route(family, hop, destination, per_message=False, strict=False):
    """(level, option name, value) of a socket option or control message
    that routes a datagram through `hop` before `destination`, as any
    unprivileged process may set it."""
    if family == socket.AF_INET:
        # A no-op to align, then the source route: type, length, pointer,
        # and the first hop (the kernel adds the destination).
        kind = IPOPT_SSRR if strict else IPOPT_LSRR
        value = bytes([1, kind, 7, 4]) + socket.inet_aton(hop)
        name = IP_RETOPTS if per_message else socket.IP_OPTIONS
        return socket.IPPROTO_IP, name, value
    if per_message:
        # With one message the kernel takes only a type 2 (Mobile IPv6)
        # routing header, and only when built with CONFIG_IPV6_MIP6.
        raise SystemExit("no per-message IPv6 source route here")
    segments = [destination, hop]
    header = struct.pack(
        "!BBBBBBH",
        0,  # next header: the kernel fills it in
        len(segments) * 2,  # length in 8-byte units past the first 8
        IPV6_SRCRT_TYPE_4,
        len(segments) - 1,  # segments left: the packet goes to the last first
        len(segments) - 1,  # last entry
        0,
        0,
    )
    value = header + b"".join(socket.inet_pton(socket.AF_INET6, a) for a in segments)
    return socket.IPPROTO_IPV6, socket.IPV6_RTHDR, value


def udp(host, port, connect=False, count=1, via=None, per_message=False, strict=False,
        timestamp_option=False):
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        ancillary = []
        if timestamp_option:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, TIMESTAMP_OPTION)
        if via is not None:
            level, name, value = source_route(family, via, host, per_message, strict)
            if per_message:
                ancillary = [(level, name, value)]
            else:
                sock.setsockopt(level, name, value)
        if connect:
            sock.connect((host, port))
        for _ in range(count):
            sock.sendmsg([b"x"], ancillary, 0, None if connect else (host, port))
        return {"outcome": "sent", "cookie": cookie_of(sock), "count": count}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


IPPROTO_UDPLITE = 136


def udplite(host, port):
    try:
        sock = socket.socket(family_of(host), socket.SOCK_DGRAM, IPPROTO_UDPLITE)
    except OSError as err:
        return failure(err)
    try:
        sock.connect((host, port))
        sock.send(b"x")
        return {"outcome": "sent"}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rawsend(host, port):
    """A TCP SYN built by hand and sent on a raw IPv4 socket: the way
    around every socket-address hook, which only the packet evidence sees."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    except OSError as err:
        return failure(err)
    try:
        source_port = 40000 + (cookie_of(sock) % 20000)
        header = struct.pack("!HHIIBBHHH", source_port, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        pseudo = socket.inet_aton("127.0.0.1") + socket.inet_aton(host) + struct.pack(
            "!BBH", 0, socket.IPPROTO_TCP, len(header)
        )
        header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
        sock.sendto(header, (host, 0))
        return {"outcome": "sent", "cookie": cookie_of(sock)}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


IPPROTO_DSTOPTS = 60
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51


def authentication_header(next_header):
    """An IPsec authentication header: next header, length 4 (24 bytes, in
    4-byte units less two), reserved, SPI, sequence number, 12-byte ICV."""
    return struct.pack("!BBHII", next_header, 4, 0, 0x1000, 1) + bytes(range(1, 13))


def rawsend_ah(host, port):
    """A UDP header behind an authentication header, on a raw IPv4 socket
    (the kernel writes the IPv4 header, protocol AH)."""
    payload = authentication_header(socket.IPPROTO_UDP) + struct.pack("!HHHH", 40000, port, 8, 0)
    return send_raw(socket.AF_INET, IPPROTO_AH, host, payload)


def send_raw(family, protocol, host, payload):
    """Sends `payload` on a raw socket of `protocol`, the IP header the
    kernel's: {"outcome": "sent", "cookie": ...} or the failure."""
    try:
        sock = socket.socket(family, socket.SOCK_RAW, protocol)
    except OSError as err:
        return failure(err)
    try:
        sock.sendto(payload, (host, 0))
        return {"outcome": "sent", "cookie": cookie_of(sock)}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def rawsend6(host, port, kind, count):
    """The IPv6 header is the kernel's (the socket's protocol is its next
    header); what follows it is made here, so extension headers can hide
    the transport header from anything that does not walk them all."""
    udp = struct.pack("!HHHH", 40000, port, 8, 0)
    if kind == "options":
        protocol = IPPROTO_DSTOPTS
        payload = b""
        for i in range(count):
            following = socket.IPPROTO_UDP if i == count - 1 else IPPROTO_DSTOPTS
            # 8 bytes: next header, length 0 (in 8-byte units past the
            # first 8), and a PadN option filling the other six.
            payload += struct.pack("!BBBB4x", following, 0, 1, 4)
        payload += udp
    elif kind == "ah":
        protocol = IPPROTO_AH
        payload = authentication_header(socket.IPPROTO_UDP) + udp
    elif kind == "cut-short":
        protocol = IPPROTO_DSTOPTS
        payload = struct.pack("!BBBB4x", socket.IPPROTO_UDP, 0, 1, 4) + udp[:2]
    elif kind == "esp":
        protocol = IPPROTO_ESP
        # SPI, sequence number, then ciphertext: nothing readable.
        payload = struct.pack("!II", 0x1000, 1) + bytes(range(1, 33))
    elif kind == "later-fragment":
        protocol = IPPROTO_FRAGMENT
        # Next header UDP, offset 8 (in 8-byte units), more fragments: the
        # bytes behind it are the middle of a datagram, not its header.
        payload = struct.pack("!BBHI", socket.IPPROTO_UDP, 0, (8 << 3) | 1, 7) + udp
    else:
        raise SystemExit("unknown rawsend6 kind " + kind)
    return send_raw(socket.AF_INET6, protocol, host, payload)


def raw():
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        sock.close()
        return {"outcome": "created"}
    except OSError as err:
        return failure(err)


IPPROTO_MPTCP = 262


def mptcp():
    """A Multipath TCP stream socket: under egress deny no hook judges
    where it goes, so agents may not make one."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        sock.close()
        return {"outcome": "created"}
    except OSError as err:
        return failure(err)


ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128


def ping(host, wait=1.0):
    """One echo request on a datagram socket of protocol ICMP: no sendmsg
    hook sees where it goes (those run for UDP only). The kernel fills in
    the identifier and the checksum."""
    family = family_of(host)
    if family == socket.AF_INET6:
        protocol, kind = socket.IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST
    else:
        protocol, kind = socket.IPPROTO_ICMP, ICMP_ECHO_REQUEST
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, protocol)
    except OSError as err:
        return failure(err)
    try:
        sock.sendto(struct.pack("!BBHHH", kind, 0, 0, 0, 1) + b"tollgate", (host, 0))
        sock.settimeout(wait)
        try:
            replied = len(sock.recv(64)) > 0
        except socket.timeout:
            replied = False
        return {"outcome": "sent", "replied": replied, "cookie": cookie_of(sock)}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def listen(host, port):
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen()
        return {"outcome": "bound", "local": "%s:%d" % sock.getsockname()[:2]}
    except OSError as err:
        return failure(err)
    finally:
        sock.close()


def precreated(host, port, cgroup):
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    with open(cgroup + "/cgroup.procs", "w") as procs:
        procs.write("0")
    return tcp(host, port, sock=sock)


def option(argv, name, default=None):
    """The value after `name` in argv, or `default` when it is absent."""
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv):
    mode = argv[1]
    if mode == "tcp":
        result = tcp(
            argv[2],
            int(argv[3]),
            fastopen="--fastopen" in argv,
            source=option(argv, "--source"),
            wait=float(option(argv, "--wait", 5.0)),
            device=option(argv, "--device"),
        )
    elif mode == "udp":
        result = udp(
            argv[2],
            int(argv[3]),
            connect="--connect" in argv,
            count=int(option(argv, "--count", 1)),
            via=option(argv, "--via"),
            per_message="--per-message" in argv,
            strict="--strict" in argv,
            timestamp_option="--timestamp-option" in argv,
        )
    elif mode == "udplite":
        result = udplite(argv[2], int(argv[3]))
    elif mode == "rawsend":
        result = rawsend(argv[2], int(argv[3]))
    elif mode == "rawsend-ah":
        result = rawsend_ah(argv[2], int(argv[3]))
    elif mode == "rawsend6":
        count = int(argv[5]) if len(argv) > 5 else 1
        result = rawsend6(argv[2], int(argv[3]), argv[4], count)
    elif mode == "raw":
        result = raw()
    elif mode == "mptcp":
        result = mptcp()
    elif mode == "ping":
        result = ping(argv[2])
    elif mode == "listen":
        result = listen(argv[2], int(argv[3]))
    elif mode == "precreated":
        result = precreated(argv[2], int(argv[3]), argv[4])
    else:
        raise SystemExit("unknown mode " + mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
