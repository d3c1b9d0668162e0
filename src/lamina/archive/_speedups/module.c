/* The module: its functions, and crc64() for the tests (the CRC the C paths record). */

#include "speedups.h"

static PyObject *py_crc64(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long crc = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &data, &crc))
        return NULL;
    uint64_t v;
    Py_BEGIN_ALLOW_THREADS
    v = crc64_update(crc, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *py_crc64_folding(PyObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    return PyBool_FromLong(crc64_set_folding(on));
}

static PyMethodDef methods[] = {
    {"apply_batch", apply_batch, METH_VARARGS, apply_batch_doc},
    {"replay_batch", replay_batch, METH_VARARGS, replay_batch_doc},
    {"crc64", py_crc64, METH_VARARGS,
     "crc64(data, crc=0) -> int: CRC-64/ISO (Go's) of what crc covered followed by data"},
    {"crc64_folding", py_crc64_folding, METH_VARARGS,
     "crc64_folding(on) -> bool: use carry-less folding where the CPU has it (True) or\n"
     "the table only (False); returns the previous state. For the tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lamina.archive._speedups",
    "The per-entry loops of apply and tar-split replay in C; see lamina.archive.native.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    crc64_init();
    b64_init();
    return PyModule_Create(&module);
}
