/*
 * Opens TCP connections to a closed port on 127.0.0.1 as fast as it can,
 * for a given time, and reports as one JSON line how many it made. Each
 * connect is a TCP active open the host-wide evidence probe records, and
 * is refused at once (nothing listens), so this is the cheapest way for
 * any unprivileged process to fill the general evidence ring buffer.
 *
 * usage: connect_flood PORT MILLISECONDS
 *
 * outcomes: done (connects, refused: connects answered ECONNREFUSED,
 *           other: any other result) | error
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: connect_flood PORT MILLISECONDS\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long long duration = atoll(argv[2]);
    if (port <= 0 || port > 65535 || duration <= 0) {
        fprintf(stderr, "bad port or duration\n");
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    long long connects = 0, refused = 0, other = 0;
    long long start = now_ms();
    long long deadline = start + duration;
    /* The clock is read once per batch: a read per connect would cost as
     * much as the connect itself. */
    while (now_ms() < deadline) {
        for (int i = 0; i < 256; i++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            if (fd < 0) {
                printf("{\"outcome\":\"error\",\"errno\":%d,\"connects\":%lld}\n", errno, connects);
                return 1;
            }
            int rc = connect(fd, (struct sockaddr *)&addr, sizeof(addr));
            connects++;
            if (rc < 0 && errno == ECONNREFUSED) {
                refused++;
            } else {
                other++;
            }
            close(fd);
        }
    }
    printf("{\"outcome\":\"done\",\"connects\":%lld,\"refused\":%lld,\"other\":%lld,\"ms\":%lld}\n",
           connects, refused, other, now_ms() - start);
    return 0;
}
