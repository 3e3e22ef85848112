/*
 * Sends UDP datagrams to an IPv4 address and port as fast as it can, for a
 * given time, and reports as one JSON line how many it sent. Run in an
 * agent cgroup against a protected target, every send is refused by the
 * cgroup's sendmsg program (EPERM) and reported as an evidence event of
 * the agent: the cheapest way for an agent to fill its own evidence ring
 * buffer.
 *
 * usage: send_flood ADDRESS PORT MILLISECONDS
 *
 * outcomes: done (sends, refused: sends answered EPERM, other: any other
 *           result) | error
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
    if (argc != 4) {
        fprintf(stderr, "usage: send_flood ADDRESS PORT MILLISECONDS\n");
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    int port = atoi(argv[2]);
    long long duration = atoll(argv[3]);
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1 || port <= 0 || port > 65535 ||
        duration <= 0) {
        fprintf(stderr, "bad address, port or duration\n");
        return 2;
    }
    addr.sin_port = htons((unsigned short)port);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        printf("{\"outcome\":\"error\",\"errno\":%d,\"sends\":0}\n", errno);
        return 1;
    }
    const char payload[] = "x";
    long long sends = 0, refused = 0, other = 0;
    long long start = now_ms();
    long long deadline = start + duration;
    /* The clock is read once per batch, as in connect_flood. */
    while (now_ms() < deadline) {
        for (int i = 0; i < 1024; i++) {
            ssize_t rc = sendto(fd, payload, 1, 0, (struct sockaddr *)&addr, sizeof(addr));
            sends++;
            if (rc < 0 && errno == EPERM) {
                refused++;
            } else {
                other++;
            }
        }
    }
    close(fd);
    printf("{\"outcome\":\"done\",\"sends\":%lld,\"refused\":%lld,\"other\":%lld,\"ms\":%lld}\n",
           sends, refused, other, now_ms() - start);
    return 0;
}
