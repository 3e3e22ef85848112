/* Loopback micro-benchmarks for `cargo xtask bench-pinning`.
 *
 *   net_bench connect N     N connect()+accept()+close() pairs to a loopback
 *                           listener of its own; prints ns per connect()
 *   net_bench stream BYTES  streams BYTES over one loopback TCP connection
 *                           (a forked reader); prints MB/s
 *
 * Written in C so the measurement is the kernel path, not an interpreter.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int listener(struct sockaddr_in *addr) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof *addr;
    if (bind(l, (struct sockaddr *)addr, len) || listen(l, 4096) || getsockname(l, (struct sockaddr *)addr, &len)) {
        perror("listener");
        exit(2);
    }
    return l;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s connect N | stream BYTES\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    int l = listener(&addr);
    long n = atol(argv[2]);
    if (strcmp(argv[1], "connect") == 0) {
        double spent = 0;
        for (long i = 0; i < n; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            double t = now_ns();
            if (connect(s, (struct sockaddr *)&addr, sizeof addr)) {
                perror("connect");
                return 1;
            }
            spent += now_ns() - t;
            int a = accept(l, NULL, NULL);
            close(s);
            close(a);
        }
        printf("%.0f\n", spent / n);
        return 0;
    }
    if (strcmp(argv[1], "stream") == 0) {
        pid_t reader = fork();
        if (reader == 0) {
            int a = accept(l, NULL, NULL);
            static char buf[1 << 16];
            while (read(a, buf, sizeof buf) > 0) {
            }
            _exit(0);
        }
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr)) {
            perror("connect");
            return 1;
        }
        static char buf[1 << 16];
        memset(buf, 'x', sizeof buf);
        double t = now_ns();
        long sent = 0;
        while (sent < n) {
            ssize_t w = write(s, buf, sizeof buf);
            if (w <= 0) {
                perror("write");
                return 1;
            }
            sent += w;
        }
        close(s);
        waitpid(reader, NULL, 0);
        double secs = (now_ns() - t) / 1e9;
        printf("%.1f\n", sent / secs / 1e6);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
