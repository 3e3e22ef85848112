/* Loopback micro-benchmarks for `cargo xtask bench-pinning`.
 *
 *   net_bench connect N [CGROUP]
 *       N connect()+accept()+close() pairs to a loopback listener of its
 *       own. The listener is made first, then the process joins CGROUP (a
 *       cgroup v2 directory) if given, so only the client sockets belong
 *       to it: the programs attached there run for the connecting side
 *       alone, as they would for an agent talking to a remote server.
 *       Prints "<median ns per connect()> <mean ns per connect()>".
 *   net_bench stream BYTES
 *       streams BYTES over one loopback TCP connection to a forked reader.
 *       Prints "<MB/s> <CPU ns of writer and reader, user+system>".
 *
 * Written in C so the measurement is the kernel path, not an interpreter.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

static void join_cgroup(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, "0", 1) != 1) {
        perror(path);
        exit(2);
    }
    close(fd);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double cpu_ns(const struct rusage *r) {
    return (r->ru_utime.tv_sec + r->ru_stime.tv_sec) * 1e9 + (r->ru_utime.tv_usec + r->ru_stime.tv_usec) * 1e3;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s connect N [CGROUP] | stream BYTES\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    int l = listener(&addr);
    long n = atol(argv[2]);
    if (n <= 0) {
        fprintf(stderr, "N must be positive\n");
        return 2;
    }
    if (strcmp(argv[1], "connect") == 0) {
        if (argc == 4)
            join_cgroup(argv[3]);
        double *spent = malloc(n * sizeof *spent);
        if (!spent) {
            perror("malloc");
            return 2;
        }
        double total = 0;
        for (long i = 0; i < n; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            double t = now_ns();
            if (connect(s, (struct sockaddr *)&addr, sizeof addr)) {
                perror("connect");
                return 1;
            }
            spent[i] = now_ns() - t;
            total += spent[i];
            int a = accept(l, NULL, NULL);
            close(s);
            close(a);
        }
        qsort(spent, n, sizeof *spent, by_value);
        printf("%.0f %.0f\n", spent[n / 2], total / n);
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
        struct rusage self_before, self_after, children;
        getrusage(RUSAGE_SELF, &self_before);
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
        getrusage(RUSAGE_SELF, &self_after);
        getrusage(RUSAGE_CHILDREN, &children);
        /* The reader's whole life is the transfer (plus one accept). */
        double cpu = cpu_ns(&self_after) - cpu_ns(&self_before) + cpu_ns(&children);
        printf("%.1f %.0f\n", sent / secs / 1e6, cpu);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
