/*
 * memwork: guest memory workload for anyvisor tests (live migration,
 * snapshot/restore, dirty tracking).
 *
 * usage: memwork [MiB] [seed] [dirty_MiB_per_s]
 *   MiB              buffer size (default 64)
 *   seed             PRNG seed / pattern salt (default 1)
 *   dirty_MiB_per_s  rewrite rate cap; 0 = unthrottled (default 32)
 *
 * Every 4 KiB page holds 511 words derived from (seed, page index, page
 * generation) plus a checksum word.  The generation of each page is kept in
 * a separate small array.  The main loop keeps rewriting pseudo-random pages
 * with generation+1 and, once per second (CLOCK_MONOTONIC), verifies every
 * page and prints exactly one line:
 *   MEMWORK OK <iterations> <seconds>
 *   MEMWORK CORRUPT page=<i> expected_gen=<g> found=<...>
 * Additionally (informative only):
 *   MEMWORK CLOCK-JUMP <delta_ms>   (verification gap > 30 s, or negative
 *                                    delta if CLOCK_MONOTONIC went backwards)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define BATCH 16u /* pages rewritten between clock checks / yields */

static uint64_t seed = 1;

static inline uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

/* word 0 is a readable header: page index and generation. */
static inline uint64_t header(uint64_t page, uint32_t gen)
{
	return (page << 32) | gen;
}

static inline uint64_t word_val(uint64_t page, uint32_t gen, uint64_t i)
{
	if (i == 0)
		return header(page, gen);
	return mix64(seed ^ (page * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)gen << 40) ^ i);
}

static void fill_page(uint64_t *p, uint64_t page, uint32_t gen)
{
	uint64_t sum = 0;
	for (uint64_t i = 0; i < WORDS - 1; i++) {
		uint64_t v = word_val(page, gen, i);
		p[i] = v;
		sum = (sum ^ v) * 0x100000001b3ull;
	}
	p[WORDS - 1] = sum;
}

/* returns -1 if ok, else index of first bad word */
static int check_page(const volatile uint64_t *p, uint64_t page, uint32_t gen)
{
	uint64_t sum = 0;
	for (uint64_t i = 0; i < WORDS - 1; i++) {
		uint64_t v = word_val(page, gen, i);
		if (p[i] != v)
			return (int)i;
		sum = (sum ^ v) * 0x100000001b3ull;
	}
	if (p[WORDS - 1] != sum)
		return (int)(WORDS - 1);
	return -1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000ull, .tv_nsec = ns % 1000000000ull };
	nanosleep(&ts, NULL);
}

static uint64_t rng_state;
static inline uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

int main(int argc, char **argv)
{
	uint64_t mib = 64, rate_mib = 32;
	if (argc > 1)
		mib = strtoull(argv[1], NULL, 0);
	if (argc > 2)
		seed = strtoull(argv[2], NULL, 0);
	if (argc > 3)
		rate_mib = strtoull(argv[3], NULL, 0);
	if (mib == 0)
		mib = 1;
	setvbuf(stdout, NULL, _IOLBF, 0);

	uint64_t npages = mib * (1024 * 1024 / PAGE);
	size_t len = npages * PAGE;
	uint8_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED) {
		perror("memwork: mmap");
		return 1;
	}
	uint32_t *gens = calloc(npages, sizeof(*gens));
	if (!gens) {
		perror("memwork: calloc");
		return 1;
	}
	memset(buf, 0xa5, len); /* touch all */
	for (uint64_t pg = 0; pg < npages; pg++)
		fill_page((uint64_t *)(buf + pg * PAGE), pg, 0);

	rng_state = mix64(seed + 0x1234567) | 1;
	/* pages allowed per second; 0 = unlimited */
	uint64_t budget_per_s = rate_mib * (1024 * 1024 / PAGE);

	printf("MEMWORK START mib=%llu pages=%llu seed=%llu rate_mib_s=%llu\n",
	       (unsigned long long)mib, (unsigned long long)npages,
	       (unsigned long long)seed, (unsigned long long)rate_mib);

	const uint64_t start = now_ns();
	uint64_t last = start, last_verify = start;
	uint64_t iterations = 0, written_this_period = 0;

	for (;;) {
		/* rewrite a batch of random pages with generation+1 */
		if (budget_per_s == 0 || written_this_period < budget_per_s) {
			for (unsigned b = 0; b < BATCH; b++) {
				uint64_t pg = rng() % npages;
				uint32_t g = gens[pg] + 1;
				fill_page((uint64_t *)(buf + pg * PAGE), pg, g);
				gens[pg] = g;
			}
			written_this_period += BATCH;
			iterations++;
			sleep_ns(1000000); /* yield 1 ms per batch */
		} else {
			sleep_ns(5000000); /* budget exhausted; wait for next second */
		}

		uint64_t t = now_ns();
		if (t < last) {
			printf("MEMWORK CLOCK-JUMP -%llu\n",
			       (unsigned long long)((last - t) / 1000000ull));
			/* resync so we do not spin */
			last_verify = t;
		}
		last = t;
		if (t - last_verify < 1000000000ull)
			continue;

		uint64_t gap = t - last_verify;
		if (gap > 30ull * 1000000000ull)
			printf("MEMWORK CLOCK-JUMP %llu\n", (unsigned long long)(gap / 1000000ull));
		last_verify = t;
		written_this_period = 0;

		/* verify all pages */
		uint64_t bad = 0, first = 0;
		int first_word = -1;
		for (uint64_t pg = 0; pg < npages; pg++) {
			int w = check_page((const volatile uint64_t *)(buf + pg * PAGE), pg, gens[pg]);
			if (w >= 0) {
				if (bad == 0) {
					first = pg;
					first_word = w;
				}
				bad++;
			}
		}
		if (bad == 0) {
			printf("MEMWORK OK %llu %llu\n", (unsigned long long)iterations,
			       (unsigned long long)((t - start) / 1000000000ull));
		} else {
			const volatile uint64_t *p = (const volatile uint64_t *)(buf + first * PAGE);
			uint64_t h = p[0];
			printf("MEMWORK CORRUPT page=%llu expected_gen=%u found=hdr_page:%llu,hdr_gen:%u,"
			       "word%d=0x%016llx bad_pages=%llu\n",
			       (unsigned long long)first, gens[first],
			       (unsigned long long)(h >> 32), (uint32_t)h, first_word,
			       (unsigned long long)p[first_word], (unsigned long long)bad);
		}
	}
}
