// CPU forward and backward of the LRP-weighting op: relevance-normalize, weight, sort-match.
//
//   R̂[i]          = (rel[i] − min rel) / (max rel − min rel + 1e-6)   per row, in the math dtype
//   y[i]          = x[i] · R̂[i]
//   loss[b, c]    = (1/D) Σ_j (sort(y)[j] − ref[b', c, j])²
//   saved[b, c, i] = (y[i] − ref[b', c, rank_y(i)]) · R̂[i]
//   grad_x        = grad_loss · (2/D) · saved                         (row_grad.h)
//
// Same parallelization and ranking as sort_match_cpu.cpp; R̂ of the current row lives in the
// thread's scratch. x and rel are read in place with their own strides and dtypes; rel is
// converted row by row through a loader picked once per call (row_rel.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "checks.h"
#include "row_grad.h"
#include "row_io.h"
#include "row_rel.h"
#include "row_sort.h"

namespace vital_fast {
namespace {

constexpr const char* kFwd = "lrp_weight_fwd";
constexpr const char* kBwd = "lrp_weight_bwd";

void check_fwd_args(const at::Tensor& x, const at::Tensor& rel, const at::Tensor& ref, bool cpu) {
  if (cpu) {
    checks::check_cpu(kFwd, x, "x");
    checks::check_cpu(kFwd, rel, "rel");
  }
  checks::check_same_device(kFwd, x, "x", rel, "rel");
  checks::check_dim(kFwd, x, "x", 3, "(B, C, D)");
  checks::check_float(kFwd, x, "x");
  checks::check_row_length(kFwd, x, "x");
  checks::check_float(kFwd, rel, "rel");
  TORCH_CHECK(rel.sizes() == x.sizes(), kFwd, ": 'rel' must have the shape of 'x' ", x.sizes(), ", got ",
              rel.sizes());
  checks::check_reference(kFwd, x, "x", ref, cpu);
}

template <typename x_t>
void lrp_weight_fwd_kernel(const at::Tensor& x, const at::Tensor& rel, const at::Tensor& ref,
                           at::Tensor& loss, at::Tensor& saved) {
  using math_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
  const RhatLoader<math_t> load_rhat_row = rhat_loader<math_t>(rel.scalar_type());

  const int64_t C = x.size(1), D = x.size(2);
  const RowsView<x_t> xv(x.const_data_ptr<x_t>(), C, D, x.stride(0), x.stride(1), x.stride(2));
  const RelArgs ra = rel_args(rel);
  const int64_t rel_tile = rel_tile_elems(ra);
  const math_t* rp = ref.const_data_ptr<math_t>();
  const int64_t ref_bs = ref.size(0) == 1 ? 0 : C * D;
  math_t* lp = loss.mutable_data_ptr<math_t>();
  math_t* sp = saved.mutable_data_ptr<math_t>();

  parallel_rows(x.size(0) * C, D, [&](int64_t begin, int64_t end) {
    rowsort::Scratch& s = rowsort::thread_scratch();
    rowsort::reserve<math_t>(s, D);
    math_t* w = s.weight.get<math_t>(static_cast<size_t>(D));
    math_t* xtile = s.xtile.get<math_t>(xv.tile_elems());
    math_t* rtile = s.rtile.get<math_t>(rel_tile);
    TileState xts, rts;
    for (int64_t row = begin; row < end; ++row) {
      load_rhat_row(ra, row, end, rtile, rts, w);
      const math_t* r = rp + (row / C) * ref_bs + (row % C) * D;
      math_t* out = sp + row * D;
      auto emit = [r, out, w](int64_t i, int64_t k, math_t v) {
        const math_t d = v - r[k];
        out[i] = d * w[i];
        return d;
      };
      const double sq = visit_row<math_t>(xv, row, end, xtile, xts, [&](auto load) {
        return rowsort::rank_row<math_t>(D, s, [&load, w](int64_t i) { return load(i) * w[i]; }, emit);
      });
      lp[row] = static_cast<math_t>(sq / static_cast<double>(D));
    }
    s.release_if_long(D);
  });
}

std::tuple<at::Tensor, at::Tensor> lrp_weight_fwd_cpu(const at::Tensor& x, const at::Tensor& rel,
                                                      const at::Tensor& ref) {
  check_fwd_args(x, rel, ref, /*cpu=*/true);
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2);
  const auto opts = x.options().dtype(checks::math_dtype(x.scalar_type()));
  at::Tensor loss = at::empty({B, C}, opts);
  at::Tensor saved = at::empty({B, C, D}, opts);
  if (B * C == 0) return {loss, saved};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwd,
                                  [&] { lrp_weight_fwd_kernel<scalar_t>(x, rel, ref, loss, saved); });
  return {loss, saved};
}

std::tuple<at::Tensor, at::Tensor> lrp_weight_fwd_meta(const at::Tensor& x, const at::Tensor& rel,
                                                       const at::Tensor& ref) {
  check_fwd_args(x, rel, ref, /*cpu=*/false);
  const auto opts = x.options().dtype(checks::math_dtype(x.scalar_type()));
  return {at::empty({x.size(0), x.size(1)}, opts), at::empty({x.size(0), x.size(1), x.size(2)}, opts)};
}

at::Tensor lrp_weight_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& saved, at::ScalarType dtype) {
  return row_grad_cpu(kBwd, grad_loss, saved, "saved", dtype);
}

at::Tensor lrp_weight_bwd_meta(const at::Tensor& grad_loss, const at::Tensor& saved, at::ScalarType dtype) {
  return row_grad_meta(kBwd, grad_loss, saved, "saved", dtype);
}

}  // namespace
}  // namespace vital_fast

TORCH_LIBRARY_IMPL(vital_fast, CPU, m) {
  m.impl("lrp_weight_fwd", &vital_fast::lrp_weight_fwd_cpu);
  m.impl("lrp_weight_bwd", &vital_fast::lrp_weight_bwd_cpu);
}

// Shape-only kernels for FakeTensor / torch.compile / opcheck.
TORCH_LIBRARY_IMPL(vital_fast, Meta, m) {
  m.impl("lrp_weight_fwd", &vital_fast::lrp_weight_fwd_meta);
  m.impl("lrp_weight_bwd", &vital_fast::lrp_weight_bwd_meta);
}
