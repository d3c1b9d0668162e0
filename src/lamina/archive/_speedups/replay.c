/* replay_batch: tar-split lines back into tar bytes, for the lines in the exact form
   lamina and Docker write (Go's encoding/json: keys in struct order, no spaces), small
   files read by fd from the directory the Python side resolved. Any other line, and
   any file that is big, missing, not regular, or not as recorded, is the Python
   path's (lamina.archive.tar.replay), which reads it, yields it and raises as always. */

#include "speedups.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* A JSON string (its bounds), for base64 text: no escapes can be in it, since the
   decoder takes only the base64 alphabet. */
static int json_b64(const char **p, const char *e, const char **s, size_t *n)
{
    if (!LIT(p, e, "\""))
        return 0;
    const char *q = memchr(*p, '"', (size_t)(e - *p));
    if (q == NULL)
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
    char *out;           /* the bytes object being filled: limit + 1 bytes */
    size_t out_len;
    int status;
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
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    unsigned char *p = (unsigned char *)r->out + r->out_len; /* size + 1 bytes are free */
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
    crc64_digest(crc64_update(0, p, (size_t)size), sum);
    if (memcmp(sum, want, 8) != 0)
        return -1;
    r->out_len += (size_t)size;
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
    if (p == e)
        return 1; /* an empty line: the Python reader skips it too */
    if (LIT(&p, e, "{\"type\":2,\"payload\":")) {
        const char *s;
        size_t n;
        long long pos;
        if (!json_b64(&p, e, &s, &n) || !LIT(&p, e, ",\"position\":") || !json_uint(&p, e, &pos) ||
            !LIT(&p, e, "}") || p != e)
            goto stop;
        if (r->out_len + n / 4 * 3 > r->limit) {
            if (r->out_len == 0)
                goto stop; /* larger than any batch: the Python path's */
            r->status = REPLAY_FULL;
            return 0;
        }
        Py_ssize_t k = b64_decode(s, n, (unsigned char *)r->out + r->out_len);
        if (k < 0)
            goto stop;
        r->out_len += (size_t)k;
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
    if (r->out_len + (size_t)size > (size_t)r->limit) {
        r->status = REPLAY_FULL; /* out_len > 0 here: a file alone fits */
        return 0;
    }
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
        if ((Py_ssize_t)r->out_len >= r->limit) {
            r->status = REPLAY_FULL;
            return;
        }
    }
    r->status = REPLAY_END;
}

const char replay_batch_doc[] =
"replay_batch(block, off, end, dir_fd, prefix, limit) -> (status, off, out, lines)\n\n"
"Rebuild tar bytes from the tar-split lines in block[off:end] (the last one may lack\n"
"its newline): segments decoded, files of at most limit bytes read from the directory\n"
"dir_fd (whose cleaned name plus '/' is prefix) and checked against their size and\n"
"CRC-64. Stops before its output would pass limit bytes (status 3), at end (0), at a\n"
"line it leaves to the caller (1), or at a file in another directory (2); off is then\n"
"that line's. lines counts the lines done.";

PyObject *replay_batch(PyObject *self, PyObject *args)
{
    Py_buffer block, prefix;
    Replay r;
    memset(&r, 0, sizeof r);
    if (!PyArg_ParseTuple(args, "y*nniy*n", &block, &r.off, &r.len, &r.dir_fd, &prefix, &r.limit))
        return NULL;
    PyObject *result = NULL, *out = NULL;
    if (r.off < 0 || r.len > block.len || r.off > r.len || r.limit <= 0 ||
        r.limit > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "replay_batch: offsets outside the block");
        goto done;
    }
    /* at most limit bytes (a reader asking for that much takes each as it is), and
       the byte a file is read past its end by */
    out = PyBytes_FromStringAndSize(NULL, r.limit + 1);
    if (out == NULL)
        goto done;
    r.out = PyBytes_AS_STRING(out);
    r.blk = block.buf;
    r.pre = prefix.buf;
    r.pre_len = (size_t)prefix.len;
    Py_BEGIN_ALLOW_THREADS /* the bytes object is ours alone until it is returned */
    replay_loop(&r);
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&out, (Py_ssize_t)r.out_len) < 0)
        goto done;
    result = Py_BuildValue("nnOn", (Py_ssize_t)r.status, r.off, out, r.lines);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&block);
    PyBuffer_Release(&prefix);
    return result;
}
