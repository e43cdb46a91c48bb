"""The python step of the anyvisor distro workload (guest/distro/anyvisor-distro).

Prints lines that depend only on this program and data.bin: integer and big-number arithmetic,
IEEE-754 basic float operations (+ - * / sqrt are correctly rounded, so every conforming CPU
gives the same bits; no libm transcendental functions, whose last bit may differ between code
paths), decimal, zlib, hashlib, json and sorting.
"""
import decimal
import hashlib
import json
import math
import random
import struct
import sys
import zlib

DATA = "/usr/local/share/anyvisor-distro/data.bin"
if len(sys.argv) > 1:
    DATA = sys.argv[1]


def out(*args):
    print(*args)


# A sieve of Eratosthenes.
N = 50_000
sieve = bytearray([1]) * (N + 1)
sieve[0] = sieve[1] = 0
for i in range(2, math.isqrt(N) + 1):
    if sieve[i]:
        sieve[i * i :: i] = bytes(len(range(i * i, N + 1, i)))
primes = [i for i in range(N + 1) if sieve[i]]
out("primes", len(primes), sum(primes), primes[-5:])

# Big integers.
f = math.factorial(1400)
out("factorial-1400 digits", len(str(f)), "digit-sum", sum(map(int, str(f))))
out("2^4423-1 mod 10^30", (pow(2, 4423) - 1) % 10**30)
out("pow-mod", pow(3, 10**18 + 7, 2**255 - 19))

# Floats: basic operations only.
s = 0.0
for k in range(1, 25_001):
    s += 1.0 / (k * k)
out("basel", repr(s), struct.pack("<d", s).hex())
x = 2.0
for _ in range(60):
    x = 0.5 * (x + 2.0 / x)
out("newton-sqrt2", repr(x), repr(math.sqrt(2.0)), x == math.sqrt(2.0))
acc = 1.0
for k in range(1, 5000):
    acc = acc * 1.0001 - 1e-5 / k
out("recurrence", repr(acc), float.hex(acc))

# Decimal (libmpdec).
decimal.getcontext().prec = 300
out("decimal-sqrt2", str(decimal.Decimal(2).sqrt())[:120])
out("decimal-1/7", str(decimal.Decimal(1) / decimal.Decimal(7))[-40:])

# A seeded PRNG, sorting, json.
rng = random.Random(20261206)
vals = [rng.randrange(10**9) for _ in range(12_000)]
vals.sort()
out("sorted", vals[:3], vals[-3:], sum(vals[::97]))
doc = {"k%d" % i: [i, str(i * i), i % 7 == 0] for i in range(500)}
text = json.dumps(doc, sort_keys=True)
out("json", len(text), hashlib.sha256(text.encode()).hexdigest())
out("json-roundtrip", json.loads(text) == doc)

# The data file: hashes and zlib.
with open(DATA, "rb") as fh:
    data = fh.read()
out("data", len(data))
for name in ("md5", "sha1", "sha256", "sha512", "sha3_256", "blake2b"):
    out(name, hashlib.new(name, data).hexdigest())
out("crc32", zlib.crc32(data), "adler32", zlib.adler32(data))
z = zlib.compress(data, 9)
out("zlib", len(z), hashlib.sha256(z).hexdigest(), zlib.decompress(z) == data)
