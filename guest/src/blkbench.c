/*
 * blkbench [DEV=/dev/vda] [SEQ_MiB=32] [RAND_SECONDS=3]
 *
 * Measures a block device with O_DIRECT: sequential write of SEQ_MiB in 1 MiB requests
 * (then fsync), sequential read of the same range, then 4 KiB reads at random aligned offsets
 * over the whole device for RAND_SECONDS. Prints one line:
 *   BLKBENCH seqread=<MB/s> seqwrite=<MB/s> randread_iops=<n>
 * or, on failure,
 *   BLKBENCH error=<what>:<errno text with spaces as dashes>
 * MB = 10^6 bytes. The device's first SEQ_MiB are overwritten.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what)
{
    char msg[128];
    snprintf(msg, sizeof msg, "%s", strerror(errno));
    for (char *p = msg; *p; p++)
        if (*p == ' ')
            *p = '-';
    printf("BLKBENCH error=%s:%s\n", what, msg);
    fflush(stdout);
    return 1;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    const char *dev = argc > 1 ? argv[1] : "/dev/vda";
    long seq_mib = argc > 2 ? atol(argv[2]) : 32;
    double rand_secs = argc > 3 ? atof(argv[3]) : 3.0;
    const size_t big = 1 << 20, small = 4096;

    /* The disk may show up a little after the driver loaded. */
    int fd = -1;
    for (int i = 0; i < 100 && fd < 0; i++) {
        fd = open(dev, O_RDWR | O_DIRECT);
        if (fd < 0)
            usleep(100000);
    }
    if (fd < 0)
        return fail("open");
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < (off_t)small)
        return fail("size");
    if ((off_t)(seq_mib * big) > size)
        seq_mib = size / big;

    void *buf;
    if (posix_memalign(&buf, 4096, big))
        return fail("memalign");
    memset(buf, 0x5a, big);

    double t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pwrite(fd, buf, big, (off_t)i * big) != (ssize_t)big)
            return fail("write");
    if (fsync(fd))
        return fail("fsync");
    double wr = seq_mib * big / (now() - t0) / 1e6;

    t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pread(fd, buf, big, (off_t)i * big) != (ssize_t)big)
            return fail("read");
    double rd = seq_mib * big / (now() - t0) / 1e6;

    uint64_t blocks = size / small, n = 0;
    t0 = now();
    double t;
    do {
        for (int k = 0; k < 16; k++, n++)
            if (pread(fd, buf, small, (off_t)(next() % blocks) * small) != (ssize_t)small)
                return fail("randread");
        t = now() - t0;
    } while (t < rand_secs);

    printf("BLKBENCH seqread=%.1f seqwrite=%.1f randread_iops=%.0f\n", rd, wr, n / t);
    fflush(stdout);
    close(fd);
    return 0;
}
