/* CRC-64/ISO, the checksum tar-split records for each file's content: Go's
   hash/crc64 with its ISO table (reflected polynomial 0xD800000000000000, initial and
   final value all ones), big-endian in 8 bytes.

   Two ways, one sum. Slicing by 8 (eight table lookups per eight bytes, about 1 GB/s
   here) everywhere, and on x86-64 CPUs with PCLMULQDQ (checked at run time) folding
   with carry-less multiplication, several times faster: on a layer of small files the
   checksum was an eighth of apply's time.

   The folding, derived for this polynomial P = x^64 + x^4 + x^3 + x + 1: 16 bytes
   loaded little-endian hold, bit i, the i-th message bit, i.e. the reflection of a
   128-bit polynomial C = H x^64 + L (H in the low half). Moving C forward by D bits
   is C x^D = H x^(D+64) + L x^D, congruent mod P to H (x^(D+63) mod P) x +
   L (x^(D-1) mod P) x, and a carry-less product of two reflected 64-bit values is the
   reflected product times x: so the constants are the reflections of x^(D+63) mod P
   and x^(D-1) mod P, and the result is again a reflected 128-bit polynomial. What is
   left at the end, 16 bytes, is reduced by the table: it is the CRC (from zero) of
   those 16 bytes as a message. tests/test_speedups.py checks the folding against the
   table at every length to 300 bytes and at random split points. */

#include "speedups.h"

#include <string.h>

static uint64_t tab[8][256];
static void detect(void);

void crc64_init(void)
{
    const uint64_t poly = 0xD800000000000000ULL;
    for (int i = 0; i < 256; i++) {
        uint64_t c = (uint64_t)i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
        tab[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            tab[k][i] = (tab[k - 1][i] >> 8) ^ tab[0][tab[k - 1][i] & 0xff];
    detect();
}

/* The reflected register (no inversion) over p[0:n]. */
static uint64_t table_raw(uint64_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint64_t v = crc ^ ((uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
                            (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 |
                            (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56);
        crc = tab[7][v & 0xff] ^ tab[6][(v >> 8) & 0xff] ^ tab[5][(v >> 16) & 0xff] ^
              tab[4][(v >> 24) & 0xff] ^ tab[3][(v >> 32) & 0xff] ^ tab[2][(v >> 40) & 0xff] ^
              tab[1][(v >> 48) & 0xff] ^ tab[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define FOLD_TARGET __attribute__((target("pclmul,sse2")))

/* reflections of x^575, x^511 (folding by 512 bits) and x^191, x^127 (by 128) mod P */
#define K512_HI 0x01b001b1b0000001ULL
#define K512_LO 0xb100010100000001ULL
#define K128_HI 0x6b70000000000001ULL
#define K128_LO 0xf500000000000001ULL

FOLD_TARGET static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x00); /* H (low half) by the x^(D+63) constant */
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x11); /* L (high half) by the x^(D-1) constant */
    return _mm_xor_si128(_mm_xor_si128(hi, lo), next);
}

FOLD_TARGET static uint64_t folded_raw(uint64_t crc, const unsigned char *p, size_t n)
{
    const __m128i k512 = _mm_set_epi64x((long long)K512_LO, (long long)K512_HI);
    const __m128i k128 = _mm_set_epi64x((long long)K128_LO, (long long)K128_HI);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p),
                               _mm_set_epi64x(0, (long long)crc));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    n -= 64;
    while (n >= 64) {
        x0 = fold(x0, k512, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x1 = fold(x0, k128, x1);
    x2 = fold(x1, k128, x2);
    __m128i x = fold(x2, k128, x3);
    while (n >= 16) {
        x = fold(x, k128, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    unsigned char rest[16];
    _mm_storeu_si128((__m128i *)rest, x);
    return table_raw(table_raw(0, rest, 16), p, n);
}

static int have_clmul;

static void detect(void)
{
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
}
#else
static const int have_clmul = 0;
static void detect(void) {}
#endif

uint64_t crc64_update(uint64_t crc, const unsigned char *p, size_t n)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (have_clmul && n >= 128)
        return ~folded_raw(~crc, p, n);
#endif
    return ~table_raw(~crc, p, n);
}

/* For the tests: force the table (0) or let the CPU decide (1); returns the old value. */
int crc64_set_folding(int on)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    int old = have_clmul;
    if (on)
        detect();
    else
        have_clmul = 0;
    return old;
#else
    (void)on;
    return 0;
#endif
}

void crc64_digest(uint64_t crc, unsigned char out[8])
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(crc & 0xff);
        crc >>= 8;
    }
}
