/* lamina.archive._speedups: the per-entry loops of apply and tar-split replay, in C.

Why: applying a layer of 100,000 small files costs GNU tar about one second, nearly all
of it system calls; the same work driven entry by entry from Python costs three times
that, in interpreter overhead around the same calls (header parsing, tar-split JSON and
base64, CRC-64, the bookkeeping of each file). These two functions do the plainest
entries of a batch in one call each; the Python code in lamina.archive stays the
specification and does everything else.

The rule that keeps the two paths one behaviour: this code never refuses and never
decides. Whatever it does not fully understand -- any header that is not a plain ustar
(or plain GNU) regular file with a clean, printable ASCII name in the directory it was
given, a name already seen with content, a file that exists, a failing system call, a
tar-split line not in the exact form lamina and Docker write -- it leaves untouched and
stops; the Python code then reads that entry (or line) from the same place and does
what it always does, including raising the same error. So this code only has to agree
with the Python code on what it accepts, which the tests check in both modes.

Safety is the caller's as well: it hands over a directory fd it resolved from the layer
root with O_NOFOLLOW per component, and the names accepted here are single components
(no '/', not '.' or '..') opened with O_NOFOLLOW | O_EXCL beneath it.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512

/* ---- CRC-64/ISO as Go's hash/crc64 computes it (reflected, ~init, ~final) -------- */

static uint64_t crc_tab[8][256];

static void crc_init(void)
{
    const uint64_t poly = 0xD800000000000000ULL; /* Go's crc64.ISO, reversed x^64+x^4+x^3+x+1 */
    for (int i = 0; i < 256; i++) {
        uint64_t c = (uint64_t)i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
        crc_tab[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            crc_tab[k][i] = (crc_tab[k - 1][i] >> 8) ^ crc_tab[0][crc_tab[k - 1][i] & 0xff];
}

/* The CRC of `crc`'s message followed by p[0:n] (crc of nothing is 0). */
static uint64_t crc_update(uint64_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n >= 8) {
        uint64_t v = crc ^ ((uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
                            (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 |
                            (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56);
        crc = crc_tab[7][v & 0xff] ^ crc_tab[6][(v >> 8) & 0xff] ^ crc_tab[5][(v >> 16) & 0xff] ^
              crc_tab[4][(v >> 24) & 0xff] ^ crc_tab[3][(v >> 32) & 0xff] ^
              crc_tab[2][(v >> 40) & 0xff] ^ crc_tab[1][(v >> 48) & 0xff] ^ crc_tab[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void crc_digest(uint64_t crc, unsigned char out[8])
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(crc & 0xff);
        crc >>= 8;
    }
}

/* ---- base64, standard alphabet, padded ---------------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static signed char B64_VALUE[256];

static void b64_init(void)
{
    memset(B64_VALUE, -1, sizeof B64_VALUE);
    for (int i = 0; i < 64; i++)
        B64_VALUE[(unsigned char)B64[i]] = (signed char)i;
}

static size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
    char *o = out;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
        *o++ = B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = '=';
        *o++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
        *o++ = '=';
    }
    return (size_t)(o - out);
}

/* Decode canonical base64 only (whole quads, padding only at the end, unused bits
   zero); -1 for anything else, which the Python code then judges. */
static Py_ssize_t b64_decode(const char *in, size_t n, unsigned char *out)
{
    if (n % 4)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int a = B64_VALUE[(unsigned char)in[i]], b = B64_VALUE[(unsigned char)in[i + 1]];
        if (a < 0 || b < 0)
            return -1;
        int last = i + 4 == n;
        if (last && in[i + 2] == '=') {
            if (in[i + 3] != '=' || (b & 15))
                return -1;
            out[o++] = (unsigned char)(a << 2 | b >> 4);
            break;
        }
        int c = B64_VALUE[(unsigned char)in[i + 2]];
        if (c < 0)
            return -1;
        if (last && in[i + 3] == '=') {
            if (c & 3)
                return -1;
            out[o++] = (unsigned char)(a << 2 | b >> 4);
            out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
            break;
        }
        int d = B64_VALUE[(unsigned char)in[i + 3]];
        if (d < 0)
            return -1;
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
        out[o++] = (unsigned char)((c & 3) << 6 | d);
    }
    return (Py_ssize_t)o;
}

/* ---- a growable byte buffer ------------------------------------------------------------ */

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t more)
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

static void buf_put(Buf *b, const char *s, size_t n)
{
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static void buf_num(Buf *b, unsigned long long v)
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

#define PUT_LIT(b, s) buf_put((b), (s), sizeof(s) - 1)

/* ---- names --------------------------------------------------------------------------- */

/* Printable ASCII that Go's JSON encoder writes as is (and the Python writer's _PLAIN):
   not '"', '\\', '<', '>', '&', nor controls or DEL or anything past ASCII. */
static int plain_char(unsigned char c)
{
    return c >= 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&';
}

static int plain_name(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!plain_char((unsigned char)s[i]))
            return 0;
    return 1;
}

/* A single path component that needs no cleaning and is no whiteout. */
static int plain_base(const char *s, size_t n)
{
    if (n == 0 || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
        return 0;
    if (n >= 4 && memcmp(s, ".wh.", 4) == 0)
        return 0;
    return memchr(s, '/', n) == NULL;
}

/* ---- tar header fields ------------------------------------------------------------------- */

/* An octal field in the one form both the Python reader's fast path and its strict
   fallback read alike: spaces, octal digits, then only spaces and NULs. -1 otherwise. */
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

typedef struct {
    const char *name;   /* the name as the tar gives it (for tar-split) */
    size_t name_len;
    size_t skip;        /* leading "./" that cleaning drops */
    char joined[256 + 1 + 100]; /* prefix + '/' + name when the ustar prefix is used */
    long long size, mode, uid, gid, mtime;
} Header;

/* Parse the header at h; 1 if it is a plain regular file this code handles. */
static int plain_header(const unsigned char *h, Header *out)
{
    static const unsigned char zero[BLOCK];
    if (memcmp(h, zero, BLOCK) == 0)
        return 0;
    if (h[156] != '0')
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
    const unsigned char *name = h;
    size_t name_len = strnlen((const char *)h, 100);
    if (memcmp(h + 257, "ustar\0", 6) == 0) {
        if (memcmp(h + 508, "tar\0", 4) == 0)
            return 0; /* star: another prefix layout */
        if (h[345]) {
            size_t plen = strnlen((const char *)h + 345, 155);
            memcpy(out->joined, h + 345, plen);
            out->joined[plen] = '/';
            memcpy(out->joined + plen + 1, name, name_len);
            out->name = out->joined;
            out->name_len = plen + 1 + name_len;
            goto named;
        }
    } else if (memcmp(h + 257, "ustar  \0", 8) == 0) {
        if (h[345] || h[357])
            return 0; /* old GNU atime/ctime: the Python reader reads those */
    } else {
        return 0;
    }
    out->name = (const char *)name;
    out->name_len = name_len;
named:
    out->size = octal(h + 124, 12);
    out->mode = octal(h + 100, 8);
    out->uid = octal(h + 108, 8);
    out->gid = octal(h + 116, 8);
    out->mtime = octal(h + 136, 12);
    if (out->size < 0 || out->mode < 0 || out->uid < 0 || out->gid < 0 || out->mtime < 0)
        return 0;
    if (out->mtime > 9223372036LL) /* the nanoseconds would not fit 64 bits */
        return 0;
    out->mode &= 07777;
    out->skip = 0;
    while (out->name_len - out->skip >= 2 && out->name[out->skip] == '.' &&
           out->name[out->skip + 1] == '/')
        out->skip += 2;
    if (out->skip > 2)
        return 0;
    return out->name_len > out->skip && plain_name(out->name, out->name_len);
}

/* ---- apply_batch ------------------------------------------------------------------------ */

typedef struct {
    Py_ssize_t raw_off;  /* the name as the tar gives it, in the names buffer */
    Py_ssize_t raw_len;
    Py_ssize_t skip;     /* bytes of "./" before the cleaned name */
    int has_content;
} Done;

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Create, fill and finish one regular file as _Applier._regular does; 0 on success,
   -1 otherwise (a file may be left behind: the Python path's retry replaces it, as it
   replaces any file in the way, and then meets the same error). */
static int make_file(int dir_fd, const char *base, const unsigned char *data, const Header *hd,
                     int privileged, long euid, long dir_gid, int umask_bits)
{
    int fd = openat(dir_fd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    (mode_t)hd->mode);
    if (fd < 0)
        return -1;
    if (hd->size && write_all(fd, data, (size_t)hd->size) < 0)
        goto fail;
    if (privileged && (hd->uid != euid || hd->gid != dir_gid) &&
        fchown(fd, (uid_t)hd->uid, (gid_t)hd->gid) < 0)
        goto fail;
    if (((hd->mode & umask_bits) || (hd->mode & 06000)) && fchmod(fd, (mode_t)hd->mode) < 0)
        goto fail;
    struct timespec ts[2];
    ts[0].tv_sec = ts[1].tv_sec = (time_t)hd->mtime;
    ts[0].tv_nsec = ts[1].tv_nsec = 0;
    if (futimens(fd, ts) < 0)
        goto fail;
    return close(fd);
fail:
    close(fd);
    return -1;
}

typedef struct {
    const unsigned char *b;
    Py_ssize_t pos, end, pad, position, need;
    const char *pre;
    size_t pre_len;
    int dir_fd, privileged, umask_bits, record;
    long dir_gid, euid;
    Buf lines, names;
    Done *done;
    size_t done_cap, count;
    long long size_sum;
    int failed;
} Batch;

/* The loop over entries: system calls and tar-split lines, no Python objects (so it
   runs without the GIL, and the DiffID thread hashes meanwhile). */
static void apply_loop(Batch *t)
{
    char base[256];
    for (;;) {
        if (t->end - t->pos < t->pad + BLOCK) {
            t->need = t->pad + BLOCK;
            return;
        }
        const unsigned char *h = t->b + t->pos + t->pad;
        Header hd;
        if (!plain_header(h, &hd))
            return;
        const char *clean = hd.name + hd.skip;
        size_t clean_len = hd.name_len - hd.skip;
        if (clean_len <= t->pre_len || memcmp(clean, t->pre, t->pre_len) != 0)
            return;
        const char *bname = clean + t->pre_len;
        size_t blen = clean_len - t->pre_len;
        if (blen > 255 || !plain_base(bname, blen))
            return;
        if (t->end - t->pos - t->pad - BLOCK < hd.size) {
            long long want = t->pad + BLOCK + hd.size;
            t->need = (Py_ssize_t)(want > (1LL << 40) ? (1LL << 40) : want);
            return;
        }
        const unsigned char *data = h + BLOCK;
        memcpy(base, bname, blen);
        base[blen] = 0;
        if (make_file(t->dir_fd, base, data, &hd, t->privileged, t->euid, t->dir_gid,
                      t->umask_bits) < 0)
            return;
        if (t->count == t->done_cap) {
            size_t cap = t->done_cap ? t->done_cap * 2 : 256;
            Done *d = realloc(t->done, cap * sizeof *d);
            if (!d) {
                t->failed = 1;
                return;
            }
            t->done = d;
            t->done_cap = cap;
        }
        if (buf_reserve(&t->names, hd.name_len) < 0) {
            t->failed = 1;
            return;
        }
        Done *d = &t->done[t->count];
        d->raw_off = (Py_ssize_t)t->names.len;
        d->raw_len = (Py_ssize_t)hd.name_len;
        d->skip = (Py_ssize_t)hd.skip;
        d->has_content = hd.size > 0;
        buf_put(&t->names, hd.name, hd.name_len);
        if (t->record) {
            Buf *l = &t->lines;
            size_t raw = (size_t)t->pad + BLOCK;
            if (buf_reserve(l, 4 * (raw / 3 + 1) + hd.name_len + 160) < 0) {
                t->failed = 1;
                return;
            }
            PUT_LIT(l, "{\"type\":2,\"payload\":\"");
            l->len += b64_encode(t->b + t->pos, raw, l->data + l->len);
            PUT_LIT(l, "\",\"position\":");
            buf_num(l, (unsigned long long)t->position++);
            PUT_LIT(l, "}\n{\"type\":1,\"name\":\"");
            buf_put(l, hd.name, hd.name_len);
            l->data[l->len++] = '"';
            if (hd.size) {
                unsigned char sum[8];
                crc_digest(crc_update(0, data, (size_t)hd.size), sum);
                PUT_LIT(l, ",\"size\":");
                buf_num(l, (unsigned long long)hd.size);
                PUT_LIT(l, ",\"payload\":\"");
                l->len += b64_encode(sum, 8, l->data + l->len);
                l->data[l->len++] = '"';
            } else {
                PUT_LIT(l, ",\"payload\":null");
            }
            PUT_LIT(l, ",\"position\":");
            buf_num(l, (unsigned long long)t->position++);
            PUT_LIT(l, "}\n");
        }
        t->count++;
        t->size_sum += hd.size;
        t->pos += t->pad + BLOCK + (Py_ssize_t)hd.size;
        t->pad = (Py_ssize_t)((BLOCK - hd.size % BLOCK) % BLOCK);
    }
}

static PyObject *ascii(const Batch *t, Py_ssize_t off, Py_ssize_t len)
{
    return PyUnicode_DecodeASCII(t->names.data + off, len, NULL);
}

/* Add the parents of a cleaned name to content_dirs, nearest first, stopping at one
   already there: TarSplitWriter.file's loop. */
static int add_parents(PyObject *content_dirs, const char *name, Py_ssize_t n)
{
    while (n > 0 && name[n - 1] != '/')
        n--;
    n--;
    while (n > 0) {
        PyObject *dir = PyUnicode_DecodeASCII(name, n, NULL);
        if (!dir)
            return -1;
        int has = PySet_Contains(content_dirs, dir);
        if (has == 0 && PySet_Add(content_dirs, dir) < 0)
            has = -1;
        Py_DECREF(dir);
        if (has != 0)
            return has < 0 ? -1 : 0;
        while (n > 0 && name[n - 1] != '/')
            n--;
        n--;
    }
    return 0;
}

/* The Python side of each entry done: unpacked, with_content, content_dirs, shadowed
   (a new reference to the first shadowing name, or None). */
static int bookkeeping(const Batch *t, PyObject *with_content, PyObject *content_dirs,
                       PyObject *unpacked, PyObject **shadowed)
{
    int parents_done = 0;
    for (size_t i = 0; i < t->count; i++) {
        const Done *d = &t->done[i];
        PyObject *key = ascii(t, d->raw_off + d->skip, d->raw_len - d->skip);
        if (!key)
            return -1;
        if (unpacked != Py_None && PySet_Add(unpacked, key) < 0)
            goto fail;
        if (t->record) {
            int seen = PySet_Contains(with_content, key);
            if (seen < 0)
                goto fail;
            if (seen && *shadowed == Py_None) {
                PyObject *shown = ascii(t, d->raw_off, d->raw_len);
                if (!shown)
                    goto fail;
                Py_DECREF(*shadowed);
                *shadowed = shown;
            }
            if (d->has_content) {
                if (PySet_Add(with_content, key) < 0)
                    goto fail;
                if (!parents_done) { /* every entry of a batch has the same parents */
                    parents_done = 1;
                    if (add_parents(content_dirs, t->names.data + d->raw_off + d->skip,
                                    d->raw_len - d->skip) < 0)
                        goto fail;
                }
            }
        }
        Py_DECREF(key);
        continue;
    fail:
        Py_DECREF(key);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(apply_batch_doc,
"apply_batch(buf, pos, end, pad, dir_fd, prefix, dir_gid, privileged, euid, umask,\n"
"            record, with_content, content_dirs, unpacked, position)\n"
"-> (need, pos, pad, count, size, lines, position, last_name, shadowed)\n\n"
"Apply the plain regular files that follow in buf[pos:end] (pos is at the padding of\n"
"the previous entry, pad bytes long) and lie directly in the directory dir_fd, whose\n"
"cleaned name plus '/' is prefix (b'' for the root). Stops at the first entry it\n"
"leaves to the caller; need > 0 then says it would take that entry with need bytes\n"
"buffered from pos. With record, the tar-split lines of the entries done are returned\n"
"(numbered from position), their names added to with_content/content_dirs as\n"
"TarSplitWriter.file adds them, and shadowed is the first that repeats a name with\n"
"content. unpacked (a set, or None) gets every cleaned name.");

static PyObject *apply_batch(PyObject *self, PyObject *args)
{
    Py_buffer buf, prefix;
    PyObject *with_content, *content_dirs, *unpacked;
    Batch t;
    memset(&t, 0, sizeof t);
    if (!PyArg_ParseTuple(args, "y*nnniy*lplipOOOn", &buf, &t.pos, &t.end, &t.pad, &t.dir_fd,
                          &prefix, &t.dir_gid, &t.privileged, &t.euid, &t.umask_bits, &t.record,
                          &with_content, &content_dirs, &unpacked, &t.position))
        return NULL;
    PyObject *result = NULL, *shadowed = Py_None, *last = Py_None, *lines = NULL;
    Py_INCREF(shadowed);
    Py_INCREF(last);
    if (t.end > buf.len || t.pos < 0 || t.pos > t.end || t.pad < 0 || t.pad >= BLOCK) {
        PyErr_SetString(PyExc_ValueError, "apply_batch: positions outside the buffer");
        goto out;
    }
    if (t.record && (!PySet_Check(with_content) || !PySet_Check(content_dirs))) {
        PyErr_SetString(PyExc_TypeError, "apply_batch: with_content and content_dirs must be sets");
        goto out;
    }
    if (unpacked != Py_None && !PySet_Check(unpacked)) {
        PyErr_SetString(PyExc_TypeError, "apply_batch: unpacked must be a set or None");
        goto out;
    }
    t.b = buf.buf;
    t.pre = prefix.buf;
    t.pre_len = (size_t)prefix.len;

    Py_BEGIN_ALLOW_THREADS
    apply_loop(&t);
    Py_END_ALLOW_THREADS

    if (t.failed) {
        PyErr_NoMemory();
        goto out;
    }
    if (bookkeeping(&t, with_content, content_dirs, unpacked, &shadowed) < 0)
        goto out;
    if (t.count) {
        const Done *d = &t.done[t.count - 1];
        Py_DECREF(last);
        last = ascii(&t, d->raw_off, d->raw_len);
        if (!last)
            goto out;
    }
    if (t.lines.len)
        lines = PyBytes_FromStringAndSize(t.lines.data, (Py_ssize_t)t.lines.len);
    else {
        lines = Py_None;
        Py_INCREF(lines);
    }
    if (!lines)
        goto out;
    result = Py_BuildValue("nnnnLOnOO", t.need, t.pos, t.pad, (Py_ssize_t)t.count, t.size_sum,
                           lines, t.position, last, shadowed);
out:
    Py_XDECREF(lines);
    Py_XDECREF(last);
    Py_XDECREF(shadowed);
    free(t.lines.data);
    free(t.names.data);
    free(t.done);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    return result;
}

/* ---- replay_batch: tar-split lines back into tar bytes ------------------------------------ */

enum { REPLAY_END = 0, REPLAY_STOP = 1, REPLAY_NEED_DIR = 2, REPLAY_FULL = 3 };

static int lit(const char **p, const char *e, const char *s, size_t n)
{
    if ((size_t)(e - *p) < n || memcmp(*p, s, n) != 0)
        return 0;
    *p += n;
    return 1;
}
#define LIT(p, e, s) lit((p), (e), (s), sizeof(s) - 1)

/* A JSON integer as Go writes it (0, or no leading zero), at most 18 digits. */
static int json_uint(const char **p, const char *e, long long *v)
{
    const char *s = *p;
    if (s == e || *s < '0' || *s > '9')
        return 0;
    if (*s == '0') {
        *v = 0;
        *p = s + 1;
        return 1;
    }
    long long x = 0;
    int n = 0;
    while (s < e && *s >= '0' && *s <= '9') {
        if (++n > 18)
            return 0;
        x = x * 10 + (*s++ - '0');
    }
    *v = x;
    *p = s;
    return 1;
}

/* A JSON string of base64 characters (no escapes): its bounds. */
static int json_b64(const char **p, const char *e, const char **s, size_t *n)
{
    if (!LIT(p, e, "\""))
        return 0;
    const char *q = *p;
    while (q < e && *q != '"') {
        if (B64_VALUE[(unsigned char)*q] < 0 && *q != '=')
            return 0;
        q++;
    }
    if (q == e)
        return 0;
    *s = *p;
    *n = (size_t)(q - *p);
    *p = q + 1;
    return 1;
}

typedef struct {
    const char *blk;
    Py_ssize_t off, len, lines, limit;
    int dir_fd;
    const char *pre;
    size_t pre_len;
    Buf out;
    int status, failed;
} Replay;

/* Read a file of `size` bytes into r->out, checking its size and CRC; 0 if all is as
   recorded (else nothing is added and the Python path re-reads it, yielding the bytes
   and raising as it always does). */
static int replay_file(Replay *r, const char *base, long long size, const unsigned char want[8])
{
    int fd = openat(r->dir_fd, base, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || buf_reserve(&r->out, (size_t)size + 1) < 0) {
        close(fd);
        return -1;
    }
    unsigned char *p = (unsigned char *)r->out.data + r->out.len;
    long long got = 0;
    for (;;) {
        ssize_t n = read(fd, p + got, (size_t)(size + 1 - got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        got += n;
        if (got > size)
            break;
        if (got == size) /* a short read of a regular file: its end, as the Python path reads it */
            break;
    }
    close(fd);
    if (got != size)
        return -1;
    unsigned char sum[8];
    crc_digest(crc_update(0, p, (size_t)size), sum);
    if (memcmp(sum, want, 8) != 0)
        return -1;
    r->out.len += (size_t)size;
    return 0;
}

/* A name the layer's getter would open as is: an optional "./", then components that
   are neither empty nor "." nor "..". Sets the directory part (with its '/') and base. */
static int clean_name(const char *s, size_t n, const char **dir, size_t *dir_len,
                      const char **base, size_t *base_len)
{
    if (n >= 2 && s[0] == '.' && s[1] == '/') {
        s += 2;
        n -= 2;
    }
    const char *comp = s, *e = s + n;
    for (const char *q = s;; q++) {
        if (q == e || *q == '/') {
            size_t k = (size_t)(q - comp);
            if (k == 0 || (k == 1 && comp[0] == '.') || (k == 2 && comp[0] == '.' && comp[1] == '.'))
                return 0;
            if (q == e)
                break;
            comp = q + 1;
        }
    }
    *dir = s;
    *dir_len = (size_t)(comp - s);
    *base = comp;
    *base_len = (size_t)(e - comp);
    return 1;
}

/* One line; sets r->status and returns 0 to stop at it, 1 when done with it. */
static int replay_line(Replay *r, const char *p, const char *e)
{
    size_t out_mark = r->out.len;
    if (p == e)
        return 1; /* an empty line: the Python reader skips it too */
    if (LIT(&p, e, "{\"type\":2,\"payload\":")) {
        const char *s;
        size_t n;
        long long pos;
        if (!json_b64(&p, e, &s, &n) || !LIT(&p, e, ",\"position\":") || !json_uint(&p, e, &pos) ||
            !LIT(&p, e, "}") || p != e)
            goto stop;
        if (buf_reserve(&r->out, n / 4 * 3 + 3) < 0) {
            r->failed = 1;
            goto stop;
        }
        Py_ssize_t k = b64_decode(s, n, (unsigned char *)r->out.data + r->out.len);
        if (k < 0)
            goto stop;
        r->out.len += (size_t)k;
        return 1;
    }
    if (!LIT(&p, e, "{\"type\":1,\"name\":\""))
        goto stop;
    const char *name = p;
    while (p < e && plain_char((unsigned char)*p))
        p++;
    size_t name_len = (size_t)(p - name);
    if (!LIT(&p, e, "\"") || name_len == 0)
        goto stop;
    long long size = 0, pos;
    if (LIT(&p, e, ",\"size\":") && !json_uint(&p, e, &size))
        goto stop;
    const char *sum = NULL;
    size_t sum_len = 0;
    if (!LIT(&p, e, ",\"payload\":"))
        goto stop;
    if (!LIT(&p, e, "null") && !json_b64(&p, e, &sum, &sum_len))
        goto stop;
    if (!LIT(&p, e, ",\"position\":") || !json_uint(&p, e, &pos) || !LIT(&p, e, "}") || p != e)
        goto stop;
    if (size == 0)
        return 1; /* nothing to read back, as in the Python path */
    unsigned char want[9];
    if (sum == NULL || sum_len != 12 || b64_decode(sum, sum_len, want) != 8)
        goto stop;
    if (size > r->limit)
        goto stop; /* big: the Python path streams it */
    const char *dir, *base;
    size_t dir_len, base_len;
    if (!clean_name(name, name_len, &dir, &dir_len, &base, &base_len) || base_len > 255)
        goto stop;
    if (dir_len != r->pre_len || memcmp(dir, r->pre, dir_len) != 0) {
        r->status = REPLAY_NEED_DIR;
        return 0;
    }
    char cbase[256];
    memcpy(cbase, base, base_len);
    cbase[base_len] = 0;
    if (replay_file(r, cbase, size, want) < 0)
        goto stop;
    return 1;
stop:
    r->out.len = out_mark;
    if (r->status != REPLAY_NEED_DIR)
        r->status = REPLAY_STOP;
    return 0;
}

static void replay_loop(Replay *r)
{
    while (r->off < r->len) {
        const char *p = r->blk + r->off, *e = r->blk + r->len;
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        const char *line_end = nl ? nl : e;
        if (!replay_line(r, p, line_end))
            return;
        r->off = (Py_ssize_t)(line_end - r->blk) + (nl ? 1 : 0);
        r->lines++;
        if ((Py_ssize_t)r->out.len >= r->limit) {
            r->status = REPLAY_FULL;
            return;
        }
    }
    r->status = REPLAY_END;
}

PyDoc_STRVAR(replay_batch_doc,
"replay_batch(block, off, dir_fd, prefix, limit) -> (status, off, out, lines)\n\n"
"Rebuild tar bytes from the tar-split lines in block[off:]: segments decoded, files of\n"
"at most limit bytes read from the directory dir_fd (whose cleaned name plus '/' is\n"
"prefix) and checked against their size and CRC-64. Stops after about limit bytes of\n"
"output (status 3), at the end of the block (0), at a line it leaves to the caller (1),\n"
"or at a file in another directory (2). lines counts the lines done.");

static PyObject *replay_batch(PyObject *self, PyObject *args)
{
    Py_buffer block, prefix;
    Replay r;
    memset(&r, 0, sizeof r);
    if (!PyArg_ParseTuple(args, "y*niy*n", &block, &r.off, &r.dir_fd, &prefix, &r.limit))
        return NULL;
    PyObject *result = NULL;
    if (r.off < 0 || r.off > block.len || r.limit <= 0) {
        PyErr_SetString(PyExc_ValueError, "replay_batch: offset outside the block");
        goto out;
    }
    r.blk = block.buf;
    r.len = block.len;
    r.pre = prefix.buf;
    r.pre_len = (size_t)prefix.len;
    Py_BEGIN_ALLOW_THREADS
    replay_loop(&r);
    Py_END_ALLOW_THREADS
    if (r.failed) {
        PyErr_NoMemory();
        goto out;
    }
    result = Py_BuildValue("nny#n", (Py_ssize_t)r.status, r.off, r.out.data ? r.out.data : "",
                           (Py_ssize_t)r.out.len, r.lines);
out:
    free(r.out.data);
    PyBuffer_Release(&block);
    PyBuffer_Release(&prefix);
    return result;
}

/* ---- small pieces, for the tests ------------------------------------------------------------ */

static PyObject *py_crc64(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long crc = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &data, &crc))
        return NULL;
    uint64_t v;
    Py_BEGIN_ALLOW_THREADS
    v = crc_update(crc, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(v);
}

static PyMethodDef methods[] = {
    {"apply_batch", apply_batch, METH_VARARGS, apply_batch_doc},
    {"replay_batch", replay_batch, METH_VARARGS, replay_batch_doc},
    {"crc64", py_crc64, METH_VARARGS,
     "crc64(data, crc=0) -> int: CRC-64/ISO (Go's) of what crc covered followed by data"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lamina.archive._speedups",
    "The per-entry loops of apply and tar-split replay in C; see lamina.archive.native.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    crc_init();
    b64_init();
    return PyModule_Create(&module);
}
