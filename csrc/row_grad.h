// The backward shared by sort_match_bwd and lrp_weight_bwd:
//   grad_x[b, c, i] = grad_loss[b, c] · (2/D) · saved[b, c, i]
// one elementwise pass over `saved` (the forward already did the routing through the sort).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "row_io.h"

namespace vital_fast {

// `saved_name`: the schema's name of the saved tensor ("diff" or "saved").
inline void check_row_grad_args(const char* op, const at::Tensor& grad_loss, const at::Tensor& saved,
                                const char* saved_name, at::ScalarType dtype, bool cpu) {
  if (cpu) {
    checks::check_cpu(op, saved, saved_name);
    checks::check_cpu(op, grad_loss, "grad_loss");
  }
  checks::check_same_device(op, saved, saved_name, grad_loss, "grad_loss");
  checks::check_dim(op, saved, saved_name, 3, "(B, C, D)");
  TORCH_CHECK(saved.scalar_type() == at::kFloat || saved.scalar_type() == at::kDouble, op, ": '", saved_name,
              "' must be float32 or float64 (the math dtype of the forward), got ", saved.scalar_type());
  checks::check_contiguous(op, saved, saved_name);
  checks::check_row_length(op, saved, saved_name);
  checks::check_dim(op, grad_loss, "grad_loss", 2, "(B, C)");
  checks::check_dtype(op, grad_loss, "grad_loss", saved.scalar_type(), "the dtype of the saved tensor");
  checks::check_size(op, grad_loss, "grad_loss", 0, saved.size(0), "batch B of the saved tensor");
  checks::check_size(op, grad_loss, "grad_loss", 1, saved.size(1), "channels C of the saved tensor");
  checks::check_float_dtype(op, dtype, "dtype");
}

inline at::Tensor row_grad_cpu(const char* op, const at::Tensor& grad_loss, const at::Tensor& saved,
                               const char* saved_name, at::ScalarType dtype) {
  check_row_grad_args(op, grad_loss, saved, saved_name, dtype, /*cpu=*/true);
  const int64_t B = saved.size(0), C = saved.size(1), D = saved.size(2);
  at::Tensor grad_x = at::empty({B, C, D}, saved.options().dtype(dtype));
  if (grad_x.numel() == 0) return grad_x;
  // grad_loss is tiny (B, C): read it with its strides (autograd hands in expanded tensors).
  const int64_t gs0 = grad_loss.stride(0), gs1 = grad_loss.stride(1);
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "row_grad_cpu", [&] {
    using math_t = scalar_t;
    const math_t* g = grad_loss.const_data_ptr<math_t>();
    const math_t* src = saved.const_data_ptr<math_t>();
    const math_t two_over_d = static_cast<math_t>(2) / static_cast<math_t>(D);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "row_grad_cpu_out", [&] {
      using out_t = scalar_t;
      out_t* dst = grad_x.mutable_data_ptr<out_t>();
      parallel_rows(B * C, D, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const math_t scale = g[(row / C) * gs0 + (row % C) * gs1] * two_over_d;
          const math_t* s = src + row * D;
          out_t* o = dst + row * D;
          for (int64_t i = 0; i < D; ++i) o[i] = static_cast<out_t>(scale * s[i]);
        }
      });
    });
  });
  return grad_x;
}

inline at::Tensor row_grad_meta(const char* op, const at::Tensor& grad_loss, const at::Tensor& saved,
                                const char* saved_name, at::ScalarType dtype) {
  check_row_grad_args(op, grad_loss, saved, saved_name, dtype, /*cpu=*/false);
  return at::empty({saved.size(0), saved.size(1), saved.size(2)}, saved.options().dtype(dtype));
}

}  // namespace vital_fast
