/*
 * faults: trigger CPU exceptions in user space so the guest kernel delivers
 * signals.  Used to check exception/interrupt plumbing of the VMM.
 *   faults ud   -> #UD via ud2          -> SIGILL  (4)
 *   faults pf   -> #PF writing 0x10     -> SIGSEGV (11)
 *   faults de   -> #DE div by zero      -> SIGFPE  (8)
 * If the process survives the fault it exits with status 99.
 */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: faults ud|pf|de\n");
		return 2;
	}
	const char *k = argv[1];
	if (!strcmp(k, "ud")) {
		__asm__ volatile("ud2");
	} else if (!strcmp(k, "pf")) {
		static volatile unsigned long addr = 0x10;
		*(volatile int *)addr = 1;
	} else if (!strcmp(k, "de")) {
		unsigned long a = 1, d = 0, zero = 0;
		__asm__ volatile("divq %2" : "+a"(a), "+d"(d) : "r"(zero));
	} else {
		fprintf(stderr, "faults: unknown kind %s\n", k);
		return 2;
	}
	fprintf(stderr, "faults: %s did not fault\n", k);
	return 99;
}
