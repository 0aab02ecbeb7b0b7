// Argument checks for the vital_fast ops, with one message template:
//   "<op>: '<arg>' must <expectation>, got <actual>"
// Every helper names the argument, the expectation and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace vital_fast {
namespace checks {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float64 computes in float64, every other float type in float32.
inline at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t ndim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == ndim, op, ": '", name, "' must be ", ndim, "-D ", layout, ", got ", t.dim(),
              "-D with shape ", t.sizes());
}

inline void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": '", name, "' must be a CPU tensor (this is the CPU kernel), got ",
              t.device());
}

inline void check_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": '", name,
              "' must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_float_dtype(const char* op, at::ScalarType t, const char* name) {
  TORCH_CHECK(is_float_dtype(t), op, ": '", name, "' must be float16, bfloat16, float32 or float64, got ", t);
}

inline void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want,
                        const char* why) {
  TORCH_CHECK(t.scalar_type() == want, op, ": '", name, "' must be ", want, " (", why, "), got ",
              t.scalar_type());
}

inline void check_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": '", name, "' must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim, int64_t want,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == want, op, ": '", name, "' must have size ", want, " at dim ", dim, " (", what,
              "), got shape ", t.sizes());
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": '", b_name, "' must be on the same device as '", a_name,
              "' (", a.device(), "), got ", b.device());
}

// Row length: at least one element, and small enough for the 32-bit radix counters and ranks.
inline void check_row_length(const char* op, const at::Tensor& t, const char* name) {
  const int64_t D = t.size(-1);
  TORCH_CHECK(D >= 1, op, ": '", name, "' must have rows of at least one element (D >= 1), got D = ", D,
              " for shape ", t.sizes());
  TORCH_CHECK(D <= INT32_MAX, op, ": '", name, "' must have rows of at most 2^31 - 1 elements, got D = ", D);
}

// ref (Bref, C, D) against x (B, C, D): math dtype, contiguous, Bref in {1, B}.
inline void check_reference(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& ref,
                            bool cpu) {
  if (cpu) check_cpu(op, ref, "ref");
  check_same_device(op, x, x_name, ref, "ref");
  check_dim(op, ref, "ref", 3, "(Bref, C, D)");
  const at::ScalarType md = math_dtype(x.scalar_type());
  check_dtype(op, ref, "ref", md, "the math dtype of x");
  check_contiguous(op, ref, "ref");
  TORCH_CHECK(ref.size(0) == 1 || ref.size(0) == x.size(0), op,
              ": 'ref' must have batch size 1 (shared) or B = ", x.size(0), " (per element), got shape ",
              ref.sizes(), " for '", x_name, "' of shape ", x.sizes());
  check_size(op, ref, "ref", 1, x.size(1), "channels C of x");
  check_size(op, ref, "ref", 2, x.size(2), "row length D of x");
}

}  // namespace checks
}  // namespace vital_fast
