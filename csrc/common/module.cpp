// The Python module mmkern._C. It holds no Python functions: loading the shared library runs the
// static TORCH_LIBRARY registrations of every op family (torch.ops.mmkern_C.*). This file only
// gives the library the entry point `import mmkern._C` needs, without pybind11 (compile time).
#include <Python.h>

static struct PyModuleDef mmkern_C_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "mmkern's compiled kernels; the ops are torch.ops.mmkern_C.* (see mmkern/native).", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mmkern_C_module); }
