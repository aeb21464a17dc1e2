// The extension module fastsel._C. Importing it runs the static registrations of every op file;
// the schemas live next to their checks in csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module with no methods: the ops are reached through torch.ops.fastsel.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastsel, m) {
  // Ops are defined in their own files with TORCH_LIBRARY_FRAGMENT(fastsel, m).
}
