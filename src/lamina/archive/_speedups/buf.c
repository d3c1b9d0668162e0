/* A growable byte buffer on malloc, so the loops can fill it without the GIL; and the
   names JSON carries without escapes. */

#include "speedups.h"

#include <stdlib.h>
#include <string.h>

int buf_reserve(Buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + more)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

void buf_put(Buf *b, const void *s, size_t n)
{
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

void buf_uint(Buf *b, unsigned long long v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        b->data[b->len++] = tmp[--n];
}

int plain_char(unsigned char c)
{
    return c >= 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&';
}

int plain_name(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!plain_char((unsigned char)s[i]))
            return 0;
    return 1;
}
