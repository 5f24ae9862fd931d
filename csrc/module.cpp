// The Python module `dpt_fast._C`. It has no Python-level functions: importing it loads the shared
// library, whose static initialisers register the dpt_fast CUDA operators with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in rcu_ops.cpp).
#include <Python.h>

static struct PyModuleDef dpt_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "dpt_fast CUDA operators (registered with torch.ops.dpt_fast on import).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dpt_fast_c_module); }
