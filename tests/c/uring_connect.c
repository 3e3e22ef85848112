/*
 * Connects a TCP socket through io_uring (IORING_OP_CONNECT), sends a
 * PostgreSQL startup message and reports, as one JSON line, who answered:
 * tollgate asks for a cleartext password (AuthenticationCleartextPassword,
 * code 3), the test PostgreSQL for SCRAM (AuthenticationSASL, code 10).
 *
 * Raw io_uring_setup/io_uring_enter system calls and the kernel's UAPI
 * header, so nothing beyond a C compiler is needed (no liburing).
 *
 * usage: uring_connect HOST PORT [--async]
 *   --async sets IOSQE_ASYNC: the connect runs on an io-wq worker thread
 *   instead of inline in io_uring_enter.
 *
 * outcomes: tollgate | postgres | other | refused | denied | error |
 *           uring-unavailable (io_uring_setup failed; "errno" says why)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

static int uring_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int uring_enter(int fd, unsigned submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, NULL, 0);
}

static void fail(const char *outcome, int err, const char *step) {
    printf("{\"outcome\":\"%s\",\"errno\":%d,\"step\":\"%s\"}\n", outcome, err, step);
    exit(0);
}

static const char *outcome_of_errno(int err) {
    if (err == EPERM || err == EACCES) return "denied";
    if (err == ECONNREFUSED) return "refused";
    return "error";
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT [--async]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    int async = argc > 3 && strcmp(argv[3], "--async") == 0;

    struct sockaddr_storage addr;
    socklen_t addr_len;
    memset(&addr, 0, sizeof addr);
    int family = strchr(host, ':') ? AF_INET6 : AF_INET;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&addr;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) fail("error", EINVAL, "address");
        addr_len = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) fail("error", EINVAL, "address");
        addr_len = sizeof *a;
    }

    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    int ring = uring_setup(4, &params);
    if (ring < 0) fail("uring-unavailable", errno, "io_uring_setup");

    size_t sq_size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    size_t cq_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    int single = (params.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && cq_size > sq_size) sq_size = cq_size;
    char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED) fail("error", errno, "mmap sq");
    char *cq = sq;
    if (!single) {
        cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED) fail("error", errno, "mmap cq");
    }
    struct io_uring_sqe *sqes =
        mmap(NULL, params.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) fail("error", errno, "mmap sqes");

    /* The socket is made here, in the agent cgroup; only the connect goes
     * through io_uring. */
    int sock = socket(family, SOCK_STREAM, 0);
    if (sock < 0) fail(outcome_of_errno(errno), errno, "socket");

    unsigned *sq_tail = (unsigned *)(sq + params.sq_off.tail);
    unsigned sq_mask = *(unsigned *)(sq + params.sq_off.ring_mask);
    unsigned *sq_array = (unsigned *)(sq + params.sq_off.array);
    unsigned tail = *sq_tail;
    unsigned index = tail & sq_mask;
    struct io_uring_sqe *sqe = &sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_CONNECT;
    sqe->fd = sock;
    sqe->addr = (uint64_t)(uintptr_t)&addr;
    sqe->off = addr_len;
    sqe->flags = async ? IOSQE_ASYNC : 0;
    sqe->user_data = 42;
    sq_array[index] = index;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);

    if (uring_enter(ring, 1, 1, IORING_ENTER_GETEVENTS) < 0) fail("error", errno, "io_uring_enter");
    unsigned *cq_head = (unsigned *)(cq + params.cq_off.head);
    unsigned *cq_tail = (unsigned *)(cq + params.cq_off.tail);
    unsigned cq_mask = *(unsigned *)(cq + params.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
    unsigned head = *cq_head;
    while (head == __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE)) {
        if (uring_enter(ring, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR)
            fail("error", errno, "io_uring_enter wait");
    }
    struct io_uring_cqe *cqe = &cqes[head & cq_mask];
    int res = cqe->res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    if (res < 0) fail(outcome_of_errno(-res), -res, "IORING_OP_CONNECT");

    uint64_t cookie = 0;
    socklen_t cookie_len = sizeof cookie;
    getsockopt(sock, SOL_SOCKET, SO_COOKIE, &cookie, &cookie_len);

    char peer[INET6_ADDRSTRLEN + 8] = "";
    struct sockaddr_storage peer_addr;
    socklen_t peer_len = sizeof peer_addr;
    if (getpeername(sock, (struct sockaddr *)&peer_addr, &peer_len) == 0) {
        char ip[INET6_ADDRSTRLEN] = "";
        int peer_port = 0;
        if (peer_addr.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&peer_addr;
            inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
            peer_port = ntohs(a->sin_port);
        } else {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&peer_addr;
            inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
            peer_port = ntohs(a->sin6_port);
        }
        snprintf(peer, sizeof peer, "%s:%d", ip, peer_port);
    }

    /* PostgreSQL startup message: protocol 3.0, user agent, database orders. */
    static const char params_text[] = "user\0agent\0database\0orders\0";
    unsigned char message[64];
    uint32_t length = 8 + sizeof params_text; /* includes the final NUL */
    uint32_t be = htonl(length);
    memcpy(message, &be, 4);
    be = htonl(196608);
    memcpy(message + 4, &be, 4);
    memcpy(message + 8, params_text, sizeof params_text);
    if (write(sock, message, length) != (ssize_t)length) fail("error", errno, "write");

    struct timeval timeout = {5, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    unsigned char header[9];
    size_t got = 0;
    while (got < sizeof header) {
        ssize_t n = read(sock, header + got, sizeof header - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    const char *who = "other";
    int code = -1;
    if (got == sizeof header && header[0] == 'R') {
        uint32_t raw;
        memcpy(&raw, header + 5, 4);
        code = (int)ntohl(raw);
        if (code == 3) who = "tollgate";
        if (code == 10) who = "postgres";
    }
    printf("{\"outcome\":\"%s\",\"auth_code\":%d,\"peer\":\"%s\",\"cookie\":%llu,\"async\":%s}\n",
           who, code, peer, (unsigned long long)cookie, async ? "true" : "false");
    close(sock);
    return 0;
}
