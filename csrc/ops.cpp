// Operator schemas of vital_fast, defined once for every backend (CPU kernels in *_cpu.cpp).
//
// All ops are functional: no aliasing, no mutation, every output a fresh tensor. Shapes:
//   x, rel      (B, C, D)     any float dtype, any strides
//   ref         (Bref, C, D)  math dtype (float32, or float64 for float64 x), contiguous, Bref in {1, B}
//   loss        (B, C)        math dtype
//   saved       (B, C, D)     math dtype, contiguous: x − t (sort_match) or (y − t) ⊙ R̂ (lrp_weight)
//   grad_x      (B, C, D)     `dtype`, contiguous: grad_loss · (2/D) · saved
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module `vital_fast._C`: importing it loads this shared library, whose static
// initializers register the ops below with the dispatcher (the extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "vital_fast C++ CPU kernels; importing registers torch.ops.vital_fast.*",
      -1,       // size of per-interpreter state
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vital_fast, m) {
  m.def("sort_match_fwd(Tensor x, Tensor ref) -> (Tensor, Tensor)");
  m.def("sort_match_bwd(Tensor grad_loss, Tensor diff, ScalarType dtype) -> Tensor");
  m.def("lrp_weight_fwd(Tensor x, Tensor rel, Tensor ref) -> (Tensor, Tensor)");
  m.def("lrp_weight_bwd(Tensor grad_loss, Tensor saved, ScalarType dtype) -> Tensor");
  // the prototype builder's sort-and-average (sorted_prototype_cpu.cpp): x, rel (K, C, D) -> (C, D)
  m.def("sorted_rows_mean(Tensor x, Tensor? rel) -> Tensor");
}
