"""Writes data.bin for the anyvisor distro workload: SIZE bytes (argv[2], default 1 MiB) of
text-like pseudo-random lines from a fixed xorshift seed, so xz and zlib have something to
compress and every build makes the same bytes."""
import sys

path = sys.argv[1]
size = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
words = (
    "anyvisor debian bookworm kernel guest host emu kvm snapshot restore migrate page "
    "register vector float integer virtio block console serial clock timer interrupt "
    "memory cache table entry fault trap syscall process thread signal pipe socket"
).split()
state = 0x2545F4914F6CDD1D
mask = (1 << 64) - 1


def rnd():
    global state
    state ^= (state << 13) & mask
    state ^= state >> 7
    state ^= (state << 17) & mask
    return state


out = bytearray()
line = 0
while len(out) < size:
    n = 4 + rnd() % 9
    ws = [words[rnd() % len(words)] for _ in range(n)]
    out += ("%06d %s %016x\n" % (line, " ".join(ws), rnd())).encode()
    line += 1
with open(path, "wb") as fh:
    fh.write(bytes(out[:size]))
