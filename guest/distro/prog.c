/* The gcc step of the anyvisor distro workload (guest/distro/anyvisor-distro): compiled in the
 * guest with `gcc -O2`, run, and its output hashed. Integer work (xorshift, sorting, a hash
 * table, CRC-32) and double-precision basic arithmetic (a small n-body integration and a matrix
 * product: + - * / and sqrt are correctly rounded, so any conforming x86-64 CPU gives the same
 * bits; -O2 without -march keeps the code SSE2 and without FMA contraction). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

#define N 50000
#define TABLE 65536

int main(void)
{
    static uint64_t v[N];
    for (int i = 0; i < N; i++)
        v[i] = next();
    qsort(v, N, sizeof v[0], cmp_u64);
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < N; i += 7)
        h = (h ^ v[i]) * 1099511628211ull;
    printf("sort %016llx %016llx %016llx\n", (unsigned long long)v[0],
           (unsigned long long)v[N - 1], (unsigned long long)h);

    static uint32_t keys[TABLE], counts[TABLE];
    unsigned collisions = 0;
    for (int i = 0; i < 3 * TABLE / 4; i++) {
        uint32_t k = (uint32_t)(next() % 100000u) + 1u;
        uint32_t s = (k * 2654435761u) & (TABLE - 1);
        while (keys[s] && keys[s] != k) {
            s = (s + 1) & (TABLE - 1);
            collisions++;
        }
        keys[s] = k;
        counts[s]++;
    }
    printf("hash collisions %u crc %08x\n", collisions,
           crc32((const unsigned char *)counts, sizeof counts));

    double px[5], py[5], vx[5], vy[5], m[5];
    for (int i = 0; i < 5; i++) {
        px[i] = (double)(i + 1);
        py[i] = (double)(i * i) * 0.25;
        vx[i] = 0.0;
        vy[i] = 1.0 / (double)(i + 1);
        m[i] = 1.0 + (double)i / 3.0;
    }
    for (int step = 0; step < 5000; step++) {
        for (int i = 0; i < 5; i++) {
            double ax = 0.0, ay = 0.0;
            for (int j = 0; j < 5; j++) {
                if (i == j)
                    continue;
                double dx = px[j] - px[i], dy = py[j] - py[i];
                double d2 = dx * dx + dy * dy + 0.01;
                double inv = 1.0 / (d2 * sqrt(d2));
                ax += m[j] * dx * inv;
                ay += m[j] * dy * inv;
            }
            vx[i] += 0.0001 * ax;
            vy[i] += 0.0001 * ay;
        }
        for (int i = 0; i < 5; i++) {
            px[i] += 0.0001 * vx[i];
            py[i] += 0.0001 * vy[i];
        }
    }
    for (int i = 0; i < 5; i++)
        printf("body %d %.17g %.17g %a\n", i, px[i], py[i], vx[i]);

    enum { M = 32 };
    static double a[M][M], b[M][M], c[M][M];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < M; j++) {
            a[i][j] = (double)((i * 31 + j * 17) % 101) / 7.0;
            b[i][j] = (double)((i * 13 + j * 29) % 97) / 3.0;
        }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < M; j++) {
            double s = 0.0;
            for (int k = 0; k < M; k++)
                s += a[i][k] * b[k][j];
            c[i][j] = s;
        }
    double tr = 0.0;
    for (int i = 0; i < M; i++)
        tr += c[i][i];
    printf("matrix trace %.17g c[3][5] %a crc %08x\n", tr, c[3][5],
           crc32((const unsigned char *)c, sizeof c));

    char buf[256];
    size_t total = 0;
    for (int i = 0; i < 2000; i++)
        total += (size_t)snprintf(buf, sizeof buf, "%d:%x:%.3f;", i, (unsigned)(i * 2654435761u),
                                  (double)i / 8.0);
    printf("snprintf %zu %zu\n", total, strlen(buf));
    return 0;
}
