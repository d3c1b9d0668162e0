/* Base64 (RFC 4648, padded), as Go's encoding/json writes []byte and binascii reads it. */

#include "speedups.h"

#include <string.h>

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static signed char VALUE[256];

void b64_init(void)
{
    memset(VALUE, -1, sizeof VALUE);
    for (int i = 0; i < 64; i++)
        VALUE[(unsigned char)ALPHABET[i]] = (signed char)i;
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
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int a = VALUE[(unsigned char)in[i]], b = VALUE[(unsigned char)in[i + 1]];
        if (a < 0 || b < 0)
            return -1;
        int last = i + 4 == n;
        if (last && in[i + 2] == '=') {
            if (in[i + 3] != '=' || (b & 15))
                return -1;
            out[o++] = (unsigned char)(a << 2 | b >> 4);
            break;
        }
        int c = VALUE[(unsigned char)in[i + 2]];
        if (c < 0)
            return -1;
        if (last && in[i + 3] == '=') {
            if (c & 3)
                return -1;
            out[o++] = (unsigned char)(a << 2 | b >> 4);
            out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
            break;
        }
        int d = VALUE[(unsigned char)in[i + 3]];
        if (d < 0)
            return -1;
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
        out[o++] = (unsigned char)((c & 3) << 6 | d);
    }
    return (Py_ssize_t)o;
}
