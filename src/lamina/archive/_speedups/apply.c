/* apply_batch: the regular files and symlinks that follow in the reader's buffer and
   lie in the directory the Python applier last worked in, each made as
   lamina.archive.apply._Applier makes it, with its tar-split lines. */

#include "speedups.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A single path component that needs no cleaning and is no whiteout. */
static int plain_base(const char *s, size_t n)
{
    if (n == 0 || n > 255 || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
        return 0;
    if (n >= 4 && memcmp(s, ".wh.", 4) == 0)
        return 0;
    return memchr(s, '/', n) == NULL;
}

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

typedef struct {
    int dir_fd, privileged, umask_bits;
    long dir_gid, euid;
} Target;

/* (atime, mtime): atime is never older than mtime (Docker's rule, apply._times). */
static void entry_times(const Entry *e, struct timespec ts[2])
{
    ts[1].tv_sec = (time_t)e->mtime_s;
    ts[1].tv_nsec = (long)e->mtime_ns;
    ts[0] = ts[1];
    if (e->atime_s >= 0 && (e->atime_s > e->mtime_s ||
                            (e->atime_s == e->mtime_s && e->atime_ns > e->mtime_ns))) {
        ts[0].tv_sec = (time_t)e->atime_s;
        ts[0].tv_nsec = (long)e->atime_ns;
    }
}

/* _Applier._regular: 0 on success, -1 otherwise (a file may be left behind: the
   Python path's retry replaces it, as it replaces anything in the way, and then meets
   the same error). */
static int make_file(const Target *t, const char *base, const unsigned char *data, const Entry *e)
{
    int fd = openat(t->dir_fd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    (mode_t)e->mode);
    if (fd < 0)
        return -1;
    struct timespec ts[2];
    entry_times(e, ts);
    if ((e->size && write_all(fd, data, (size_t)e->size) < 0) ||
        (t->privileged && (e->uid != t->euid || e->gid != t->dir_gid) &&
         fchown(fd, (uid_t)e->uid, (gid_t)e->gid) < 0) ||
        (((e->mode & t->umask_bits) || (e->mode & 06000)) && fchmod(fd, (mode_t)e->mode) < 0) ||
        futimens(fd, ts) < 0) {
        close(fd);
        return -1;
    }
    return close(fd);
}

/* _Applier._symlink and _path_metadata(chmod=False). */
static int make_symlink(const Target *t, const char *base, const Entry *e)
{
    char link[101];
    memcpy(link, e->link, e->link_len);
    link[e->link_len] = 0;
    if (symlinkat(link, t->dir_fd, base) < 0)
        return -1;
    struct timespec ts[2];
    entry_times(e, ts);
    if ((t->privileged && (e->uid != t->euid || e->gid != t->dir_gid) &&
         fchownat(t->dir_fd, base, (uid_t)e->uid, (gid_t)e->gid, AT_SYMLINK_NOFOLLOW) < 0) ||
        utimensat(t->dir_fd, base, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    return 0;
}

typedef struct {
    Py_ssize_t raw_off;  /* the name as the tar gives it, in the names buffer */
    Py_ssize_t raw_len;
    Py_ssize_t skip;     /* bytes of "./" before the cleaned name */
    int has_content;
} Done;

typedef struct {
    const unsigned char *b;
    Py_ssize_t pos, end, pad, position, need;
    const char *pre;
    size_t pre_len;
    Target target;
    int record;
    Buf lines, names;
    Done *done;
    size_t done_cap, count;
    long long size_sum;
    int failed;
} Batch;

static void record_lines(Batch *t, const Entry *e, const unsigned char *data)
{
    Buf *l = &t->lines;
    size_t raw = (size_t)t->pad + e->head_len;
    if (buf_reserve(l, 4 * (raw / 3 + 1) + e->name_len + 160) < 0) {
        t->failed = 1;
        return;
    }
    BUF_LIT(l, "{\"type\":2,\"payload\":\"");
    l->len += b64_encode(t->b + t->pos, raw, l->data + l->len);
    BUF_LIT(l, "\",\"position\":");
    buf_uint(l, (unsigned long long)t->position++);
    BUF_LIT(l, "}\n{\"type\":1,\"name\":\"");
    buf_put(l, e->name, e->name_len);
    BUF_LIT(l, "\"");
    if (e->size) {
        unsigned char sum[8];
        crc64_digest(crc64_update(0, data, (size_t)e->size), sum);
        BUF_LIT(l, ",\"size\":");
        buf_uint(l, (unsigned long long)e->size);
        BUF_LIT(l, ",\"payload\":\"");
        l->len += b64_encode(sum, 8, l->data + l->len);
        BUF_LIT(l, "\"");
    } else {
        BUF_LIT(l, ",\"payload\":null");
    }
    BUF_LIT(l, ",\"position\":");
    buf_uint(l, (unsigned long long)t->position++);
    BUF_LIT(l, "}\n");
}

/* The loop over entries: system calls and tar-split lines, no Python objects, so it
   runs without the GIL (the DiffID thread hashes meanwhile). */
static void apply_loop(Batch *t)
{
    char base[256];
    for (;;) {
        Py_ssize_t avail = t->end - t->pos - t->pad;
        if (avail < BLOCK) {
            t->need = t->pad + BLOCK;
            return;
        }
        Entry e;
        Py_ssize_t need = 0;
        int got = parse_entry(t->b + t->pos + t->pad, avail, &e, &need);
        if (got < 0) {
            t->need = t->pad + need;
            return;
        }
        if (got == 0)
            return;
        const char *clean = e.name + e.skip;
        size_t clean_len = e.name_len - e.skip;
        if (clean_len <= t->pre_len || memcmp(clean, t->pre, t->pre_len) != 0)
            return;
        const char *bname = clean + t->pre_len;
        size_t blen = clean_len - t->pre_len;
        if (!plain_base(bname, blen))
            return;
        if (avail - (Py_ssize_t)e.head_len < e.size) {
            long long want = t->pad + (long long)e.head_len + e.size;
            t->need = (Py_ssize_t)(want > (1LL << 40) ? (1LL << 40) : want);
            return;
        }
        const unsigned char *data = t->b + t->pos + t->pad + e.head_len;
        memcpy(base, bname, blen);
        base[blen] = 0;
        int made = e.type == ENTRY_FILE ? make_file(&t->target, base, data, &e)
                                        : make_symlink(&t->target, base, &e);
        if (made < 0)
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
        if (buf_reserve(&t->names, e.name_len) < 0) {
            t->failed = 1;
            return;
        }
        Done *d = &t->done[t->count];
        d->raw_off = (Py_ssize_t)t->names.len;
        d->raw_len = (Py_ssize_t)e.name_len;
        d->skip = (Py_ssize_t)e.skip;
        d->has_content = e.size > 0;
        buf_put(&t->names, e.name, e.name_len);
        if (t->record) {
            record_lines(t, &e, data);
            if (t->failed)
                return;
        }
        t->count++;
        if (e.type == ENTRY_FILE)
            t->size_sum += e.size;
        t->pos += t->pad + (Py_ssize_t)e.head_len + (Py_ssize_t)e.size;
        t->pad = (Py_ssize_t)((BLOCK - e.size % BLOCK) % BLOCK);
    }
}

static PyObject *ascii(const Batch *t, Py_ssize_t off, Py_ssize_t len)
{
    return PyUnicode_DecodeASCII(t->names.data + off, len, NULL);
}

/* TarSplitWriter.file's loop: the parents of a cleaned name into content_dirs,
   nearest first, stopping at one already there. */
static int add_parents(PyObject *content_dirs, const char *name, Py_ssize_t n)
{
    for (;;) {
        while (n > 0 && name[n - 1] != '/')
            n--;
        if (--n <= 0)
            return 0;
        PyObject *dir = PyUnicode_DecodeASCII(name, n, NULL);
        if (!dir)
            return -1;
        int has = PySet_Contains(content_dirs, dir);
        if (has == 0 && PySet_Add(content_dirs, dir) < 0)
            has = -1;
        Py_DECREF(dir);
        if (has != 0)
            return has < 0 ? -1 : 0;
    }
}

/* The Python side of each entry made: unpacked, with_content, content_dirs, and the
   first name that repeats one with content, or names a directory that holds some
   (*shadowed, a new reference or None). */
static int bookkeeping(const Batch *t, PyObject *with_content, PyObject *content_dirs,
                       PyObject *unpacked, PyObject **shadowed)
{
    int parents_done = 0;
    for (size_t i = 0; i < t->count; i++) {
        const Done *d = &t->done[i];
        PyObject *key = ascii(t, d->raw_off + d->skip, d->raw_len - d->skip);
        if (!key)
            return -1;
        int seen = 0;
        if ((unpacked != Py_None && PySet_Add(unpacked, key) < 0) ||
            (t->record && (seen = PySet_Contains(with_content, key)) < 0))
            goto fail;
        /* no entry here is a directory: one put where a directory held content from
           this tar removes that content (TarSplitWriter.file's is_dir rule) */
        if (t->record && !seen && (seen = PySet_Contains(content_dirs, key)) < 0)
            goto fail;
        if (seen && *shadowed == Py_None) {
            PyObject *shown = ascii(t, d->raw_off, d->raw_len);
            if (!shown)
                goto fail;
            Py_DECREF(*shadowed);
            *shadowed = shown;
        }
        if (t->record && d->has_content) {
            if (PySet_Add(with_content, key) < 0)
                goto fail;
            if (!parents_done) { /* every entry of a batch has the same parents */
                parents_done = 1;
                if (add_parents(content_dirs, t->names.data + d->raw_off + d->skip,
                                d->raw_len - d->skip) < 0)
                    goto fail;
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

const char apply_batch_doc[] =
    "apply_batch(buf, pos, end, pad, dir_fd, prefix, dir_gid, privileged, euid, umask,\n"
    "            record, with_content, content_dirs, unpacked, position)\n"
    "-> (need, pos, pad, count, size, lines, position, last_name, shadowed)\n\n"
    "Apply the plain regular files and symlinks that follow in buf[pos:end] (pos is at\n"
    "the padding of the previous entry, pad bytes long) and lie directly in the\n"
    "directory dir_fd, whose cleaned name plus '/' is prefix (b'' for the root). Stops\n"
    "at the first entry it leaves to the caller; need > 0 then says it would take that\n"
    "entry with need bytes buffered from pos. size sums the regular files' sizes. With\n"
    "record, the tar-split lines of the entries made are returned (numbered from\n"
    "position), their names added to with_content/content_dirs as TarSplitWriter.file\n"
    "adds them, and shadowed is the first to repeat a name with content. unpacked (a\n"
    "set, or None) gets every cleaned name.";

PyObject *apply_batch(PyObject *self, PyObject *args)
{
    Py_buffer buf, prefix;
    PyObject *with_content, *content_dirs, *unpacked;
    Batch t;
    memset(&t, 0, sizeof t);
    if (!PyArg_ParseTuple(args, "y*nnniy*lplipOOOn", &buf, &t.pos, &t.end, &t.pad,
                          &t.target.dir_fd, &prefix, &t.target.dir_gid, &t.target.privileged,
                          &t.target.euid, &t.target.umask_bits, &t.record, &with_content,
                          &content_dirs, &unpacked, &t.position))
        return NULL;
    PyObject *result = NULL, *shadowed = Py_None, *last = Py_None, *lines = NULL;
    Py_INCREF(shadowed);
    Py_INCREF(last);
    if (t.end > buf.len || t.pos < 0 || t.pos > t.end || t.pad < 0 || t.pad >= BLOCK) {
        PyErr_SetString(PyExc_ValueError, "apply_batch: positions outside the buffer");
        goto out;
    }
    if ((t.record && (!PySet_Check(with_content) || !PySet_Check(content_dirs))) ||
        (unpacked != Py_None && !PySet_Check(unpacked))) {
        PyErr_SetString(PyExc_TypeError, "apply_batch: with_content, content_dirs and "
                                         "unpacked must be sets");
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
