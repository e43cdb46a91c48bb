/*
 * diskwork: guest disk workload for anyvisor tests (snapshot/restore, live migration).
 *
 * usage: diskwork [DEV=/dev/vda] [interval_ms=100] [verify_cap_blocks=1024]
 *
 * Writes 4 KiB blocks k = 0, 1, 2, ... with O_DIRECT, each followed by fdatasync (a flush on
 * the virtio disk), one every interval_ms, block k at byte offset (k mod nblocks) * 4096 where
 * nblocks = device size / 4096 (so it wraps around). Word i (0..511, 8 bytes little-endian) of
 * block k is
 *     0xD15C000000000000 | (k << 9) | i
 * (never zero, distinct per block and per position inside it). Once per second
 * (CLOCK_MONOTONIC) it re-reads the most recent min(count, nblocks, verify_cap_blocks) blocks
 * past the page cache, checks them, and prints exactly one line:
 *   DISKWORK <count> ok          count = blocks written so far (0..count-1 are on the disk)
 *   DISKWORK CORRUPT at <k>      block k does not hold its pattern (first bad block)
 * It starts with `DISKWORK START dev=<dev> blocks=<nblocks>`; on a failed system call it prints
 * `DISKWORK error=<what>:<errno text with spaces as dashes>` and exits 1.
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

#define BLOCK 4096u
#define WORDS (BLOCK / 8u)
#define CHUNK 64u /* blocks per verification read */

static int fail(const char *what)
{
	char msg[128];
	snprintf(msg, sizeof msg, "%s", strerror(errno));
	for (char *p = msg; *p; p++)
		if (*p == ' ')
			*p = '-';
	printf("DISKWORK error=%s:%s\n", what, msg);
	return 1;
}

static inline uint64_t word_val(uint64_t k, uint64_t i)
{
	return 0xD15C000000000000ull | (k << 9) | i;
}

static void fill_block(uint64_t *p, uint64_t k)
{
	for (uint64_t i = 0; i < WORDS; i++)
		p[i] = word_val(k, i); /* x86-64: stored little-endian */
}

static int block_ok(const uint64_t *p, uint64_t k)
{
	for (uint64_t i = 0; i < WORDS; i++)
		if (p[i] != word_val(k, i))
			return 0;
	return 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
	const char *dev = argc > 1 ? argv[1] : "/dev/vda";
	uint64_t interval_ms = argc > 2 ? strtoull(argv[2], NULL, 0) : 100;
	uint64_t cap = argc > 3 ? strtoull(argv[3], NULL, 0) : 1024;
	if (cap == 0)
		cap = 1;
	setvbuf(stdout, NULL, _IOLBF, 0);

	/* The disk may show up a little after the driver loaded. */
	int fd = -1;
	for (int i = 0; i < 100 && fd < 0; i++) {
		fd = open(dev, O_RDWR | O_DIRECT);
		if (fd < 0)
			sleep_ms(100);
	}
	if (fd < 0)
		return fail("open");
	off_t size = lseek(fd, 0, SEEK_END); /* a block device's size, or a file's */
	if (size < 0)
		return fail("size");
	uint64_t nblocks = (uint64_t)size / BLOCK;
	if (nblocks == 0) {
		errno = ENOSPC;
		return fail("size");
	}

	uint64_t *wbuf, *rbuf;
	if (posix_memalign((void **)&wbuf, BLOCK, BLOCK) ||
	    posix_memalign((void **)&rbuf, BLOCK, CHUNK * BLOCK))
		return fail("memalign");

	printf("DISKWORK START dev=%s blocks=%llu\n", dev, (unsigned long long)nblocks);

	uint64_t count = 0, last_verify = now_ns();
	for (;;) {
		fill_block(wbuf, count);
		off_t off = (off_t)((count % nblocks) * BLOCK);
		if (pwrite(fd, wbuf, BLOCK, off) != (ssize_t)BLOCK)
			return fail("write");
		if (fdatasync(fd))
			return fail("fdatasync");
		count++;
		sleep_ms(interval_ms);

		uint64_t t = now_ns();
		if (t - last_verify < 1000000000ull && t >= last_verify)
			continue;
		last_verify = t;

		uint64_t window = count;
		if (window > nblocks)
			window = nblocks;
		if (window > cap)
			window = cap;
		uint64_t k = count - window, bad = UINT64_MAX;
		while (k < count && bad == UINT64_MAX) {
			/* one read per run of consecutive slots, at most CHUNK blocks */
			uint64_t slot = k % nblocks, n = count - k;
			if (n > CHUNK)
				n = CHUNK;
			if (n > nblocks - slot)
				n = nblocks - slot;
			ssize_t want = (ssize_t)(n * BLOCK);
			if (pread(fd, rbuf, (size_t)want, (off_t)(slot * BLOCK)) != want)
				return fail("read");
			for (uint64_t j = 0; j < n; j++)
				if (!block_ok(rbuf + j * WORDS, k + j)) {
					bad = k + j;
					break;
				}
			k += n;
		}
		if (bad == UINT64_MAX)
			printf("DISKWORK %llu ok\n", (unsigned long long)count);
		else
			printf("DISKWORK CORRUPT at %llu\n", (unsigned long long)bad);
	}
}
