/* vsockcat: tiny AF_VSOCK stream tool for the anyvisor test guest.
 *
 *   vsockcat listen PORT [echo]   accept one connection on PORT; copy what it sends to stdout
 *                                 (with "echo": send it back instead), until the peer closes.
 *   vsockcat connect CID PORT     connect to CID:PORT (host = 2); send stdin, half-close, then
 *                                 copy what comes back to stdout until the peer closes.
 *
 * Exit status: 0 on a clean close, 1 on any socket error (message on stderr).
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what)
{
    fprintf(stderr, "vsockcat: %s: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int parse_u32(const char *s, unsigned int *out)
{
    char *end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v > 0xffffffffUL)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

/* Copies `from` to `to` until EOF. */
static int pump(int from, int to)
{
    static char buf[65536];
    for (;;) {
        ssize_t n = read(from, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (write_all(to, buf, (size_t)n) < 0)
            return -1;
    }
}

static int do_listen(unsigned int port, int echo)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0), c;
    if (s < 0)
        return die("socket");
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return die("bind");
    if (listen(s, 1) < 0)
        return die("listen");
    fprintf(stderr, "vsockcat: listening on port %u\n", port);
    c = accept(s, NULL, NULL);
    if (c < 0)
        return die("accept");
    close(s);
    if (pump(c, echo ? c : 1) < 0)
        return die(echo ? "echo" : "receive");
    close(c);
    return 0;
}

static int do_connect(unsigned int cid, unsigned int port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    struct pollfd p[2];
    static char buf[65536];
    int s = socket(AF_VSOCK, SOCK_STREAM, 0), in_open = 1;
    if (s < 0)
        return die("socket");
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return die("connect");
    /* Send stdin and print replies concurrently, so an echo peer cannot deadlock us. */
    for (;;) {
        p[0].fd = in_open ? 0 : -1;
        p[0].events = POLLIN;
        p[1].fd = s;
        p[1].events = POLLIN;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return die("poll");
        }
        if (p[0].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n < 0 && errno != EINTR)
                return die("read stdin");
            if (n == 0) {
                in_open = 0;
                shutdown(s, SHUT_WR);
            } else if (n > 0 && write_all(s, buf, (size_t)n) < 0) {
                return die("send");
            }
        }
        if (p[1].revents) {
            ssize_t n = read(s, buf, sizeof buf);
            if (n < 0 && errno != EINTR)
                return die("receive");
            if (n == 0)
                break;
            if (n > 0 && write_all(1, buf, (size_t)n) < 0)
                return die("write stdout");
        }
    }
    close(s);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned int cid, port;
    if (argc >= 3 && argc <= 4 && strcmp(argv[1], "listen") == 0 && parse_u32(argv[2], &port) == 0 &&
        (argc == 3 || strcmp(argv[3], "echo") == 0))
        return do_listen(port, argc == 4);
    if (argc == 4 && strcmp(argv[1], "connect") == 0 && parse_u32(argv[2], &cid) == 0 &&
        parse_u32(argv[3], &port) == 0)
        return do_connect(cid, port);
    fprintf(stderr, "usage: vsockcat listen PORT [echo] | vsockcat connect CID PORT\n");
    return 2;
}
