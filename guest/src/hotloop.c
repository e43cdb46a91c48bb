/*
 * hotloop: bignum-style hot loops with an exact instruction count, timed in the guest.
 *
 * The two loops have the shape of the kernel's multi-precision helpers that dominate its
 * boot-time crypto self-tests: add_n (limb-wise add with carry) and addmul_1 (multiply a
 * number by one limb and add it in). Both loops, their repetitions included, are written in
 * inline assembly so the number of instructions retired is known exactly, whatever the
 * compiler does around them:
 *   add_n:    REPS_ADD * (2 + 5 * LIMBS + 2)
 *   addmul_1: REPS_MUL * (2 + 9 * LIMBS + 2)
 * Prints one line for `cargo xtask bench hotloop`:
 *   HOTLOOP add_n_insns=N add_n_ns=T addmul_1_insns=N addmul_1_ns=T check=X
 * where check is a digest of the results (the same on every correct CPU).
 */
#include <stdio.h>
#include <time.h>

#define LIMBS 64
#define REPS_ADD 2000000L
#define REPS_MUL 1000000L

static unsigned long u[LIMBS], v[LIMBS], r[LIMBS];

static long long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* r = u + v over LIMBS limbs, REPS_ADD times (each pass adds into r's previous value's
 * inputs, so the work cannot be folded away). */
static void add_n(void)
{
	long reps = REPS_ADD;
	__asm__ volatile(
		"2:\n\t"
		"mov %[neg], %%rcx\n\t"
		"clc\n\t"
		"1:\n\t"
		"mov (%[up],%%rcx,8), %%rax\n\t"
		"adc (%[vp],%%rcx,8), %%rax\n\t"
		"mov %%rax, (%[rp],%%rcx,8)\n\t"
		"inc %%rcx\n\t"
		"jnz 1b\n\t"
		"dec %[reps]\n\t"
		"jnz 2b\n\t"
		: [reps] "+r"(reps)
		: [up] "r"(u + LIMBS), [vp] "r"(r + LIMBS), [rp] "r"(r + LIMBS),
		  [neg] "i"(-LIMBS)
		: "rax", "rcx", "cc", "memory");
}

/* r += u * limb over LIMBS limbs, REPS_MUL times. */
static void addmul_1(unsigned long limb)
{
	long reps = REPS_MUL;
	__asm__ volatile(
		"2:\n\t"
		"mov %[neg], %%rcx\n\t"
		"xor %%r9d, %%r9d\n\t"
		"1:\n\t"
		"mov (%[up],%%rcx,8), %%rax\n\t"
		"mul %[limb]\n\t"
		"add %%r9, %%rax\n\t"
		"adc $0, %%rdx\n\t"
		"add %%rax, (%[rp],%%rcx,8)\n\t"
		"adc $0, %%rdx\n\t"
		"mov %%rdx, %%r9\n\t"
		"inc %%rcx\n\t"
		"jnz 1b\n\t"
		"dec %[reps]\n\t"
		"jnz 2b\n\t"
		: [reps] "+r"(reps)
		: [up] "r"(u + LIMBS), [rp] "r"(r + LIMBS), [limb] "r"(limb),
		  [neg] "i"(-LIMBS)
		: "rax", "rcx", "rdx", "r9", "cc", "memory");
}

static unsigned long digest(void)
{
	unsigned long h = 1469598103934665603UL;
	for (int i = 0; i < LIMBS; i++)
		h = (h ^ r[i]) * 1099511628211UL;
	return h;
}

int main(void)
{
	for (int i = 0; i < LIMBS; i++) {
		u[i] = 0x9e3779b97f4a7c15UL * (unsigned long)(i + 1);
		v[i] = 0xc2b2ae3d27d4eb4fUL ^ (unsigned long)i;
		r[i] = v[i];
	}
	long long t0 = now_ns();
	add_n();
	long long t1 = now_ns();
	addmul_1(0xff51afd7ed558ccdUL);
	long long t2 = now_ns();
	printf("HOTLOOP add_n_insns=%ld add_n_ns=%lld addmul_1_insns=%ld addmul_1_ns=%lld "
	       "check=%016lx\n",
	       REPS_ADD * (4 + 5 * LIMBS), t1 - t0, REPS_MUL * (4 + 9 * LIMBS), t2 - t1,
	       digest());
	fflush(stdout);
	return 0;
}
