/* One entry's headers, read exactly as lamina.archive.tar.reader reads them -- or left
   to it. Taken here: a regular file or a symlink in a ustar (or plain old-GNU) header,
   optionally after one PAX header whose records are only mtime, atime and ctime (GNU
   tar's --format=posix writes such a header before every entry). Numbers must be in
   the one octal form the reader's fast path and its strict fallback read alike, the
   checksum the unsigned one, the name clean printable ASCII; anything else is the
   Python reader's, which then accepts or refuses it as it always does. */

#include "speedups.h"

#include <string.h>

#define PAX_MAX (64 << 10)
/* the largest whole seconds whose nanoseconds still fit 64 bits */
#define MAX_SECONDS 9223372035LL

/* Spaces, octal digits, then only spaces and NULs; -1 for any other form. */
static long long octal(const unsigned char *f, int n)
{
    int i = 0;
    long long v = 0;
    while (i < n && f[i] == ' ')
        i++;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++)
        v = v * 8 + (f[i] - '0');
    for (; i < n; i++)
        if (f[i] != ' ' && f[i] != 0)
            return -1;
    return v;
}

static long long round_up(long long n)
{
    return (n + BLOCK - 1) / BLOCK * BLOCK;
}

/* What every block gets before its type is looked at: not the end of the archive, a
   checksum that matches, a size, and a magic under which the name needs no guessing
   (ustar without star's prefix layout, or old GNU without its atime/ctime). */
static int plain_block(const unsigned char *h, long long *size)
{
    static const unsigned char zero[BLOCK];
    if (memcmp(h, zero, BLOCK) == 0)
        return 0;
    long long chk = octal(h + 148, 8);
    if (chk < 0)
        return 0;
    unsigned sum = 8 * ' ';
    for (int i = 0; i < 148; i++)
        sum += h[i];
    for (int i = 156; i < BLOCK; i++)
        sum += h[i];
    if ((long long)sum != chk)
        return 0;
    *size = octal(h + 124, 12);
    if (*size < 0)
        return 0;
    if (memcmp(h + 257, "ustar\0", 6) == 0)
        return memcmp(h + 508, "tar\0", 4) != 0;
    if (memcmp(h + 257, "ustar  \0", 8) == 0)
        return !h[345] && !h[357];
    return 0;
}

/* A PAX time as pax.parse_time reads it, in its plain form: 1-18 digits, then
   optionally '.' and digits (cut or padded to nine). 0 for any other form. */
static int pax_time(const unsigned char *v, size_t n, long long *s, long long *ns)
{
    size_t i = 0;
    long long secs = 0;
    while (i < n && v[i] >= '0' && v[i] <= '9') {
        if (i == 18)
            return 0;
        secs = secs * 10 + (v[i++] - '0');
    }
    if (i == 0 || secs > MAX_SECONDS)
        return 0;
    long long frac = 0;
    if (i < n) {
        if (v[i++] != '.')
            return 0;
        int digits = 0;
        for (; i < n; i++) {
            if (v[i] < '0' || v[i] > '9')
                return 0;
            if (digits < 9) {
                frac = frac * 10 + (v[i] - '0');
                digits++;
            }
        }
        for (; digits < 9; digits++)
            frac *= 10;
    }
    *s = secs;
    *ns = frac;
    return 1;
}

/* The records of a PAX header as pax.parse_records splits them (a later key wins; NUL
   padding after the last record), when they are only mtime, atime and ctime (which
   the reader ignores) with plain times. */
static int pax_times(const unsigned char *d, size_t n, Entry *e)
{
    const unsigned char *mtime = NULL, *atime = NULL;
    size_t mtime_len = 0, atime_len = 0;
    size_t pos = 0;
    while (pos < n) {
        if (d[pos] == 0) {
            for (size_t i = pos; i < n; i++)
                if (d[i])
                    return 0;
            break;
        }
        size_t sp = pos;
        while (sp < n && sp < pos + 24 && d[sp] >= '0' && d[sp] <= '9')
            sp++;
        if (sp == pos || sp >= n || sp >= pos + 24 || d[sp] != ' ' || sp - pos > 9)
            return 0;
        size_t len = 0;
        for (size_t i = pos; i < sp; i++)
            len = len * 10 + (d[i] - '0');
        size_t stop = pos + len;
        if (len <= sp - pos + 1 || stop > n || d[stop - 1] != '\n')
            return 0;
        const unsigned char *key = d + sp + 1, *end = d + stop - 1;
        const unsigned char *eq = memchr(key, '=', (size_t)(end - key));
        if (!eq)
            return 0;
        size_t klen = (size_t)(eq - key);
        if (klen == 5 && memcmp(key, "mtime", 5) == 0) {
            mtime = eq + 1;
            mtime_len = (size_t)(end - eq - 1);
        } else if (klen == 5 && memcmp(key, "atime", 5) == 0) {
            atime = eq + 1;
            atime_len = (size_t)(end - eq - 1);
        } else if (!(klen == 5 && memcmp(key, "ctime", 5) == 0)) {
            return 0;
        }
        pos = stop;
    }
    if (mtime && !pax_time(mtime, mtime_len, &e->mtime_s, &e->mtime_ns))
        return 0;
    if (atime && !pax_time(atime, atime_len, &e->atime_s, &e->atime_ns))
        return 0;
    return 1;
}

int parse_entry(const unsigned char *p, Py_ssize_t avail, Entry *e, Py_ssize_t *need)
{
    long long size, pax_size = 0;
    const unsigned char *h = p;
    size_t head = 0;
    int have_pax = 0;
    if (avail < BLOCK) {
        *need = BLOCK;
        return -1;
    }
    if (!plain_block(h, &size))
        return 0;
    if (h[156] == 'x') {
        if (size > PAX_MAX)
            return 0;
        head = BLOCK + (size_t)round_up(size);
        if (avail < (Py_ssize_t)(head + BLOCK)) {
            *need = (Py_ssize_t)(head + BLOCK);
            return -1;
        }
        have_pax = 1;
        pax_size = size;
        h = p + head;
        if (!plain_block(h, &size))
            return 0;
    }
    int type = h[156];
    if (type != ENTRY_FILE && type != ENTRY_SYMLINK)
        return 0;
    e->type = type;
    e->head_len = head + BLOCK;
    e->size = type == ENTRY_FILE ? size : 0; /* a symlink carries no data, whatever it says */
    e->mode = octal(h + 100, 8);
    e->uid = octal(h + 108, 8);
    e->gid = octal(h + 116, 8);
    e->mtime_s = octal(h + 136, 12);
    if (e->mode < 0 || e->uid < 0 || e->gid < 0 || e->mtime_s < 0 || e->mtime_s > MAX_SECONDS)
        return 0;
    e->mode &= 07777;
    e->mtime_ns = 0;
    e->atime_s = -1;
    e->atime_ns = 0;
    if (have_pax && !pax_times(p + BLOCK, (size_t)pax_size, e))
        return 0;
    size_t name_len = strnlen((const char *)h, 100);
    if (h[257 + 5] == 0 && h[345]) { /* ustar with a prefix */
        size_t plen = strnlen((const char *)h + 345, 155);
        memcpy(e->joined, h + 345, plen);
        e->joined[plen] = '/';
        memcpy(e->joined + plen + 1, h, name_len);
        e->name = e->joined;
        e->name_len = plen + 1 + name_len;
    } else {
        e->name = (const char *)h;
        e->name_len = name_len;
    }
    e->skip = 0;
    if (e->name_len >= 2 && e->name[0] == '.' && e->name[1] == '/')
        e->skip = 2;
    if (e->name_len <= e->skip || !plain_name(e->name, e->name_len))
        return 0;
    if (type == ENTRY_SYMLINK) {
        e->link = (const char *)h + 157;
        e->link_len = strnlen(e->link, 100);
        if (e->link_len == 0)
            return 0;
    }
    return 1;
}
