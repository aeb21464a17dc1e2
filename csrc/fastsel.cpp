// The extension module fastsel._C. Importing it runs the static registrations of every op file;
// the schemas live next to their checks in csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT).
//
// Module attributes (read by fastsel/ops/backend.py, reported by `fastsel info`):
//   torch_version  torch.__version__ this extension was compiled against
//   cuda_version   the CUDA toolkit that compiled the CUDA kernels ("" without CUDA kernels)
//   cuda_archs     the arches they were compiled for, TORCH_CUDA_ARCH_LIST style ("" likewise)
// setup.py passes them as bare -D tokens (no quotes to survive the shell and ninja; ';' spelt ',').
#include <Python.h>

#include <algorithm>
#include <string>

#include <torch/library.h>

#define FASTSEL_STRINGIFY_(...) #__VA_ARGS__
#define FASTSEL_STRINGIFY(...) FASTSEL_STRINGIFY_(__VA_ARGS__)

#ifdef FASTSEL_TORCH_VERSION
#define FASTSEL_TORCH_VERSION_STR FASTSEL_STRINGIFY(FASTSEL_TORCH_VERSION)
#else
#define FASTSEL_TORCH_VERSION_STR ""
#endif

#if defined(FASTSEL_WITH_CUDA) && defined(FASTSEL_CUDA_VERSION)
#define FASTSEL_CUDA_VERSION_STR FASTSEL_STRINGIFY(FASTSEL_CUDA_VERSION)
#else
#define FASTSEL_CUDA_VERSION_STR ""
#endif

#if defined(FASTSEL_WITH_CUDA) && defined(FASTSEL_CUDA_ARCHS)
#define FASTSEL_CUDA_ARCHS_STR FASTSEL_STRINGIFY(FASTSEL_CUDA_ARCHS)
#else
#define FASTSEL_CUDA_ARCHS_STR ""
#endif

extern "C" {
// A plain module with no methods: the ops are reached through torch.ops.fastsel.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  std::string archs = FASTSEL_CUDA_ARCHS_STR;
  std::replace(archs.begin(), archs.end(), ',', ';');
  if (PyModule_AddStringConstant(m, "torch_version", FASTSEL_TORCH_VERSION_STR) < 0 ||
      PyModule_AddStringConstant(m, "cuda_version", FASTSEL_CUDA_VERSION_STR) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", archs.c_str()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(fastsel, m) {
  // Ops are defined in their own files with TORCH_LIBRARY_FRAGMENT(fastsel, m).
}
