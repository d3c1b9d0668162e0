/* Base64 (RFC 4648, padded), as Go's encoding/json writes []byte and binascii reads it. */

#include "speedups.h"

#include <string.h>

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static signed char VALUE[256];
/* DEC[k][c]: character c in place k of a quad, shifted to its bits of the 24; BAD for
   a character outside the alphabet (a bit no shifted value reaches) */
#define BAD 0x01000000u
static uint32_t DEC[4][256];

void b64_init(void)
{
    memset(VALUE, -1, sizeof VALUE);
    for (int i = 0; i < 64; i++)
        VALUE[(unsigned char)ALPHABET[i]] = (signed char)i;
    for (int k = 0; k < 4; k++)
        for (int c = 0; c < 256; c++)
            DEC[k][c] = VALUE[c] < 0 ? BAD : (uint32_t)VALUE[c] << (18 - 6 * k);
}

int b64_char(unsigned char c)
{
    return VALUE[c] >= 0 || c == '=';
}

size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
    char *o = out;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = ALPHABET[v >> 18];
        *o++ = ALPHABET[(v >> 12) & 63];
        *o++ = ALPHABET[(v >> 6) & 63];
        *o++ = ALPHABET[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *o++ = ALPHABET[v >> 18];
        *o++ = ALPHABET[(v >> 12) & 63];
        *o++ = '=';
        *o++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *o++ = ALPHABET[v >> 18];
        *o++ = ALPHABET[(v >> 12) & 63];
        *o++ = ALPHABET[(v >> 6) & 63];
        *o++ = '=';
    }
    return (size_t)(o - out);
}

Py_ssize_t b64_decode(const char *in, size_t n, unsigned char *out)
{
    if (n % 4)
        return -1;
    if (n == 0)
        return 0;
    const unsigned char *p = (const unsigned char *)in;
    size_t o = 0, full = n - 4; /* every quad but the last: no padding there */
    uint32_t bad = 0;
    for (size_t i = 0; i < full; i += 4) {
        uint32_t v = DEC[0][p[i]] | DEC[1][p[i + 1]] | DEC[2][p[i + 2]] | DEC[3][p[i + 3]];
        bad |= v;
        out[o] = (unsigned char)(v >> 16);
        out[o + 1] = (unsigned char)(v >> 8);
        out[o + 2] = (unsigned char)v;
        o += 3;
    }
    if (bad & BAD)
        return -1;
    p += full;
    int a = VALUE[p[0]], b = VALUE[p[1]];
    if (a < 0 || b < 0)
        return -1;
    if (p[2] == '=') {
        if (p[3] != '=' || (b & 15))
            return -1;
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        return (Py_ssize_t)o;
    }
    int c = VALUE[p[2]];
    if (c < 0)
        return -1;
    if (p[3] == '=') {
        if (c & 3)
            return -1;
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
        return (Py_ssize_t)o;
    }
    int d = VALUE[p[3]];
    if (d < 0)
        return -1;
    out[o++] = (unsigned char)(a << 2 | b >> 4);
    out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
    out[o++] = (unsigned char)((c & 3) << 6 | d);
    return (Py_ssize_t)o;
}
