/* Optional accelerator for ZFiles: LZ4-compress and CRC a whole batch of blocks in one call without the
 * GIL (writer), and read + check + decompress one LZ4 block straight into the caller's buffer (reader).
 *
 * Why: python-lz4 has no batch API, so compressing 4 KiB blocks from Python takes and releases the GIL
 * once per block; with several compression threads they contend for it on every block and two threads
 * end up slower than one. Here a batch (~512 KiB, 128 blocks) costs one GIL release, so threads scale.
 * On the read side a random 4 KiB read is otherwise three library calls (pread, CRC, decompress) plus a
 * bytes object and a copy; here it is one call.
 *
 * The LZ4 code is python-lz4's own (its extension exports the LZ4 symbols; the Python side passes their
 * addresses to init()/init_read()), called exactly as `lz4.block.compress(mode="default",
 * store_size=False)` and `lz4.block.decompress(data, capacity)` call it (reset stream,
 * compress_fast_continue, acceleration 1; decompress_safe), so the bytes are identical to the
 * pure-Python path. The CRC is overlaybd's raw CRC-32C (no pre/post inversion), SSE4.2 when the CPU has
 * it. Without this module (no compiler at install time) both sides fall back to Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <limits.h>
#include <stddef.h>
#include <unistd.h>

typedef void *(*create_stream_fn)(void);
typedef int (*free_stream_fn)(void *);
typedef void (*reset_stream_fn)(void *);
typedef int (*compress_continue_fn)(void *, const char *, char *, int, int, int);
typedef int (*bound_fn)(int);
typedef int (*decompress_fn)(const char *, char *, int, int);

static create_stream_fn lz4_create;
static free_stream_fn lz4_free;
static reset_stream_fn lz4_reset;
static compress_continue_fn lz4_compress;
static bound_fn lz4_bound;
static decompress_fn lz4_decompress;

/* ---- raw CRC-32C (Castagnoli, reflected, poly 0x82F63B78) ------------------------------------------ */
static uint32_t crc_table[256];
static int have_sse42;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[i] = c;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

static uint32_t crc_raw(uint32_t seed, const unsigned char *p, size_t n)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_sse42)
        return crc_hw(seed, p, n);
#endif
    return crc_sw(seed, p, n);
}

static void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* ---- module functions ------------------------------------------------------------------------------- */
static PyObject *zb_init(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long a, b, c, d, e;
    if (!PyArg_ParseTuple(args, "KKKKK", &a, &b, &c, &d, &e))
        return NULL;
    if (!a || !b || !c || !d || !e) {
        PyErr_SetString(PyExc_ValueError, "null LZ4 function address");
        return NULL;
    }
    lz4_create = (create_stream_fn)(uintptr_t)a;
    lz4_free = (free_stream_fn)(uintptr_t)b;
    lz4_reset = (reset_stream_fn)(uintptr_t)c;
    lz4_compress = (compress_continue_fn)(uintptr_t)d;
    lz4_bound = (bound_fn)(uintptr_t)e;
    Py_RETURN_NONE;
}

static PyObject *zb_init_read(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long a;
    if (!PyArg_ParseTuple(args, "K", &a))
        return NULL;
    if (!a) {
        PyErr_SetString(PyExc_ValueError, "null LZ4 function address");
        return NULL;
    }
    lz4_decompress = (decompress_fn)(uintptr_t)a;
    Py_RETURN_NONE;
}

/* lz4_pread_block(fd, offset, stored_len, out, crc_seed_or_None) -> 0 when `out` (exactly the block's
 * decoded length) was filled; a negative value when anything is off (short read -1, CRC -2, decode or
 * length -3): the caller then takes its checked path, which reports the fault and retries. The pread,
 * CRC and decompression run without the GIL, straight into the caller's buffer. METH_FASTCALL with
 * plain conversions: argument-tuple parsing was ~0.1 us of a ~1 us random 4 KiB read. */
static PyObject *zb_lz4_pread_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "lz4_pread_block takes 5 arguments");
        return NULL;
    }
    long fd_l = PyLong_AsLong(args[0]);
    long long offset = PyLong_AsLongLong(args[1]);
    long stored_l = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (fd_l < 0 || fd_l > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "bad file descriptor");
        return NULL;
    }
    int fd = (int)fd_l;
    int stored = (int)stored_l;
    PyObject *seed_obj = args[4];
    Py_buffer out;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) < 0) {
        /* as PyArg "w*": a read-only or non-contiguous buffer is a TypeError the caller handles */
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "a writable contiguous buffer is required");
        return NULL;
    }
    if (lz4_decompress == NULL || stored_l <= 0 || stored_l > (1 << 20)) {
        PyBuffer_Release(&out);
        return PyLong_FromLong(-3);
    }
    int verify = seed_obj != Py_None;
    uint32_t seed = verify ? (uint32_t)PyLong_AsUnsignedLongMask(seed_obj) : 0;
    if (verify && PyErr_Occurred()) {
        PyBuffer_Release(&out);
        return NULL;
    }
    unsigned char stack_buf[65536 + 4096]; /* every stored block of a valid file fits (max_compressed_len) */
    unsigned char *tmp = stored <= (int)sizeof(stack_buf) ? stack_buf : PyMem_RawMalloc((size_t)stored);
    if (tmp == NULL) {
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    long rc;
    Py_BEGIN_ALLOW_THREADS
    ssize_t got = pread(fd, tmp, (size_t)stored, (off_t)offset);
    if (got != stored) {
        rc = -1;
    } else {
        int data_len = stored;
        rc = 0;
        if (verify) {
            data_len -= 4;
            if (data_len <= 0) {
                rc = -2;
            } else {
                uint32_t want = (uint32_t)tmp[data_len] | (uint32_t)tmp[data_len + 1] << 8 |
                                (uint32_t)tmp[data_len + 2] << 16 | (uint32_t)tmp[data_len + 3] << 24;
                if (crc_raw(seed, tmp, (size_t)data_len) != want)
                    rc = -2;
            }
        }
        if (rc == 0) {
            int n = lz4_decompress((const char *)tmp, out.buf, data_len, (int)out.len);
            if (n != (int)out.len)
                rc = -3;
        }
    }
    Py_END_ALLOW_THREADS
    if (tmp != stack_buf)
        PyMem_RawFree(tmp);
    PyBuffer_Release(&out);
    return PyLong_FromLong(rc);
}

/* ---- SegReader: the read-only LSMT lookup of format/lsmt/segments.py in C ------------------------------
 * SegReader(offs, lens, moffs, zeros, tags_or_None, readers, vsize, general) is a callable
 * `(buf, offset) -> int` equal to SegmentTable.fast_reader's closure: a 512-aligned request inside one
 * data mapping is one binary search over the u64 offsets and one call of `readers[tag](buf, source
 * offset)`; everything else (and a short source read) is `general(buf, offset)`. Why: in Python the
 * bisect over an array('Q') (a new int per probe) and the frame cost ~0.6 us, more than half of a
 * random 4 KiB read from an LZ4 ZFile stack. The index arrays' buffers are held for the object's
 * lifetime (so they cannot be resized under it). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Py_buffer offs, lens, moffs, zeros, tags;
    int have[5];
    Py_ssize_t count;
    PyObject *readers; /* tuple */
    PyObject *general;
    long long vsize;
} SegReader;

static PyObject *seg_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SegReader *s = (SegReader *)callable;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL || !PyMemoryView_Check(args[0]) ||
        !PyLong_CheckExact(args[1]) || s->readers == NULL)
        goto general;
    {
        Py_buffer *view = PyMemoryView_GET_BUFFER(args[0]);
        if (view->ndim != 1 || view->itemsize != 1)
            goto general;
        long long n = (long long)view->len;
        int overflow = 0;
        long long off = PyLong_AsLongLongAndOverflow(args[1], &overflow);
        if (overflow || off < 0 || n <= 0 || ((off | n) & 511) || off > s->vsize - n)
            goto general;
        const uint64_t *offs = s->offs.buf;
        uint64_t sector = (uint64_t)off >> 9;
        Py_ssize_t lo = 0, hi = s->count;
        while (lo < hi) { /* bisect_right */
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (sector < offs[mid])
                hi = mid;
            else
                lo = mid + 1;
        }
        Py_ssize_t i = lo - 1;
        if (i < 0)
            goto general;
        uint64_t start = offs[i];
        uint64_t stop = start + ((const uint32_t *)s->lens.buf)[i];
        if ((uint64_t)(off + n) > (stop << 9) || ((const unsigned char *)s->zeros.buf)[i])
            goto general;
        Py_ssize_t tag = s->have[4] ? ((const unsigned char *)s->tags.buf)[i] : 0;
        if (tag >= PyTuple_GET_SIZE(s->readers))
            goto general;
        /* source offset = off + (moffset - start) * 512; warp layers put moffsets near 2^54 sectors, so
         * the byte offset can pass 2^63: compute it wide, hand anything unusual to `general` */
        __int128 wide = (__int128)off + ((__int128)((const uint64_t *)s->moffs.buf)[i] - (__int128)start) * 512;
        if (wide < 0 || wide > (__int128)UINT64_MAX)
            goto general;
        PyObject *src = PyLong_FromUnsignedLongLong((unsigned long long)wide);
        if (src == NULL)
            return NULL;
        PyObject *cargs[2] = {args[0], src};
        PyObject *r = PyObject_Vectorcall(PyTuple_GET_ITEM(s->readers, tag), cargs, 2, NULL);
        Py_DECREF(src);
        if (r == NULL)
            return NULL;
        if (PyLong_CheckExact(r)) {
            long long got = PyLong_AsLongLongAndOverflow(r, &overflow);
            if (!overflow && got == n)
                return r;
        }
        Py_DECREF(r);
    }
general:
    if (s->general == NULL) {
        PyErr_SetString(PyExc_ValueError, "SegReader is cleared");
        return NULL;
    }
    return PyObject_Vectorcall(s->general, args, nargsf, kwnames);
}

static int seg_get(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: items of %zd bytes expected", what, itemsize);
        return -1;
    }
    return 0;
}

static int seg_traverse(SegReader *s, visitproc visit, void *arg)
{
    Py_VISIT(s->readers);
    Py_VISIT(s->general);
    return 0;
}

static int seg_clear(SegReader *s)
{
    Py_CLEAR(s->readers);
    Py_CLEAR(s->general);
    return 0;
}

static void seg_dealloc(SegReader *s)
{
    PyObject_GC_UnTrack(s);
    seg_clear(s);
    Py_buffer *views[5] = {&s->offs, &s->lens, &s->moffs, &s->zeros, &s->tags};
    for (int k = 0; k < 5; k++)
        if (s->have[k])
            PyBuffer_Release(views[k]);
    PyObject_GC_Del(s);
}

static PyObject *seg_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *o_offs, *o_lens, *o_moffs, *o_zeros, *o_tags, *readers, *general;
    long long vsize;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "SegReader takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOO!LO", &o_offs, &o_lens, &o_moffs, &o_zeros, &o_tags, &PyTuple_Type,
                          &readers, &vsize, &general))
        return NULL;
    if (PyTuple_GET_SIZE(readers) == 0 || !PyCallable_Check(general)) {
        PyErr_SetString(PyExc_TypeError, "SegReader needs readers and a callable general reader");
        return NULL;
    }
    SegReader *s = PyObject_GC_New(SegReader, type);
    if (s == NULL)
        return NULL;
    memset(&s->offs, 0, sizeof(SegReader) - offsetof(SegReader, offs));
    s->vectorcall = seg_call;
    s->vsize = vsize;
    PyObject *objs[5] = {o_offs, o_lens, o_moffs, o_zeros, o_tags};
    Py_buffer *views[5] = {&s->offs, &s->lens, &s->moffs, &s->zeros, &s->tags};
    Py_ssize_t sizes[5] = {8, 4, 8, 1, 1};
    const char *names[5] = {"offs", "lens", "moffs", "zeros", "tags"};
    for (int k = 0; k < 5; k++) {
        if (objs[k] == Py_None && k == 4)
            break;
        if (seg_get(objs[k], views[k], sizes[k], names[k]) < 0)
            goto fail;
        s->have[k] = 1;
    }
    s->count = s->offs.len / 8;
    for (int k = 1; k < 5; k++)
        if (s->have[k] && views[k]->len / sizes[k] != s->count) {
            PyErr_SetString(PyExc_ValueError, "index columns differ in length");
            goto fail;
        }
    Py_INCREF(readers);
    s->readers = readers;
    Py_INCREF(general);
    s->general = general;
    PyObject_GC_Track(s);
    return (PyObject *)s;
fail:
    for (int k = 0; k < 5; k++)
        if (s->have[k])
            PyBuffer_Release(views[k]);
    s->have[0] = s->have[1] = s->have[2] = s->have[3] = s->have[4] = 0;
    PyObject_GC_Del(s);
    return NULL;
}

static PyTypeObject SegReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlaybd.format.zfile._zbatch.SegReader",
    .tp_basicsize = sizeof(SegReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SegReader(offs, lens, moffs, zeros, tags|None, readers, vsize, general): (buf, offset) -> int",
    .tp_new = seg_new,
    .tp_dealloc = (destructor)seg_dealloc,
    .tp_traverse = (traverseproc)seg_traverse,
    .tp_clear = (inquiry)seg_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SegReader, vectorcall),
};

static PyObject *zb_crc32c_raw(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    unsigned int seed = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &seed))
        return NULL;
    uint32_t crc = crc_raw(seed, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* lz4_batch_into(data, block_size, crc_seed_or_None, out, lens) -> stored bytes written to `out`.
 * `out` must hold blocks * (LZ4_compressBound(block_size) + 4) bytes and `lens` blocks * 4 (u32 little
 * endian stored lengths); both are the caller's reusable buffers, so a batch allocates nothing (fresh
 * ~0.5 MiB allocations per batch cost page faults that showed up as much as the compression). */
static PyObject *zb_lz4_batch_into(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer src, out, lens;
    int bs;
    PyObject *seed_obj;
    if (!PyArg_ParseTuple(args, "y*iOw*w*", &src, &bs, &seed_obj, &out, &lens))
        return NULL;
    const char *err = NULL;
    int verify = seed_obj != Py_None;
    uint32_t seed = 0;
    Py_ssize_t blocks = 0, per = 0;
    if (lz4_compress == NULL)
        err = "init() was not called";
    else if (bs <= 0 || bs > (1 << 20))
        err = "bad block size";
    else {
        blocks = (src.len + bs - 1) / bs;
        per = (Py_ssize_t)lz4_bound(bs) + 4;
        if (out.len < blocks * per || lens.len < blocks * 4)
            err = "output buffers too small";
    }
    if (err == NULL && verify) {
        seed = (uint32_t)PyLong_AsUnsignedLongMask(seed_obj);
        if (PyErr_Occurred())
            err = "bad seed";
    }
    void *stream = err == NULL ? lz4_create() : NULL;
    if (err == NULL && stream == NULL)
        err = "out of memory";
    if (err != NULL) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyBuffer_Release(&lens);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    const char *in = src.buf;
    Py_ssize_t n = src.len;
    unsigned char *dst = out.buf;
    unsigned char *lp = lens.buf;
    Py_ssize_t pos = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < blocks; i++) {
        Py_ssize_t left = n - i * (Py_ssize_t)bs;
        int len = (int)(left < bs ? left : bs);
        lz4_reset(stream);
        int c = lz4_compress(stream, in + i * (Py_ssize_t)bs, (char *)dst + pos, len, (int)(per - 4), 1);
        if (c <= 0) {
            failed = 1;
            break;
        }
        if (verify) {
            put_le32(dst + pos + c, crc_raw(seed, dst + pos, (size_t)c));
            c += 4;
        }
        put_le32(lp + 4 * i, (uint32_t)c);
        pos += c;
    }
    Py_END_ALLOW_THREADS
    lz4_free(stream);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&lens);
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "LZ4 compression failed");
        return NULL;
    }
    return PyLong_FromSsize_t(pos);
}

static PyObject *zb_lz4_bound(PyObject *self, PyObject *args)
{
    (void)self;
    int n;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
    if (lz4_bound == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() was not called");
        return NULL;
    }
    return PyLong_FromLong(lz4_bound(n));
}

static PyMethodDef methods[] = {
    {"init", zb_init, METH_VARARGS, "init(create, free, reset, compress_fast_continue, bound): LZ4 addresses"},
    {"lz4_batch_into", zb_lz4_batch_into, METH_VARARGS,
     "lz4_batch_into(data, block_size, crc_seed or None, out, lens) -> stored length; no GIL while it runs"},
    {"lz4_bound", zb_lz4_bound, METH_VARARGS, "lz4_bound(n): LZ4_compressBound"},
    {"init_read", zb_init_read, METH_VARARGS, "init_read(LZ4_decompress_safe address)"},
    {"lz4_pread_block", (PyCFunction)(void (*)(void))zb_lz4_pread_block, METH_FASTCALL,
     "lz4_pread_block(fd, offset, stored_len, out, crc_seed or None) -> 0 or a negative fault code"},
    {"crc32c_raw", zb_crc32c_raw, METH_VARARGS, "crc32c_raw(data, seed=0): raw CRC-32C (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_zbatch", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__zbatch(void)
{
    crc_init();
    if (PyType_Ready(&SegReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SegReaderType);
    if (PyModule_AddObject(m, "SegReader", (PyObject *)&SegReaderType) < 0) {
        Py_DECREF(&SegReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
