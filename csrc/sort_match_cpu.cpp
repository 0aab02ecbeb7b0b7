// CPU forward and backward of the sort-matching loss.
//
//   loss[b, c]    = (1/D) Σ_j (sort(x[b, c])[j] − ref[b', c, j])²     b' = 0 (shared ref) or b
//   diff[b, c, i] = x[b, c, i] − ref[b', c, rank(i)]                   rank: stable ascending sort
//   grad_x        = grad_loss · (2/D) · diff                            (row_grad.h)
//
// Parallelization: over the B·C rows (parallel_rows in row_io.h: at::parallel_for threads taking
// blocks of consecutive rows dynamically); per-thread scratch reused across rows and calls.
// x is read in place with its strides (a .contiguous() copy would cost as much as the kernel);
// channel-inner layouts (channels-last, tokens) through small transposed tiles (row_io.h).
// Ranking: row_sort.h (counting for short rows, LSD radix on float keys otherwise; float64 rows
// with std::sort). Math in float32 for float16/bfloat16/float32 input, float64 for float64;
// Σ residual² accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "checks.h"
#include "row_grad.h"
#include "row_io.h"
#include "row_sort.h"

namespace vital_fast {
namespace {

constexpr const char* kFwd = "sort_match_fwd";
constexpr const char* kBwd = "sort_match_bwd";

void check_fwd_args(const at::Tensor& x, const at::Tensor& ref, bool cpu) {
  if (cpu) checks::check_cpu(kFwd, x, "x");
  checks::check_dim(kFwd, x, "x", 3, "(B, C, D)");
  checks::check_float(kFwd, x, "x");
  checks::check_row_length(kFwd, x, "x");
  checks::check_reference(kFwd, x, "x", ref, cpu);
}

template <typename x_t>
void sort_match_fwd_kernel(const at::Tensor& x, const at::Tensor& ref, at::Tensor& loss, at::Tensor& diff) {
  using math_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
  const int64_t C = x.size(1), D = x.size(2);
  const RowsView<x_t> xv(x.const_data_ptr<x_t>(), C, D, x.stride(0), x.stride(1), x.stride(2));
  const math_t* rp = ref.const_data_ptr<math_t>();
  const int64_t ref_bs = ref.size(0) == 1 ? 0 : C * D;  // shared reference: every b reads ref[0]
  math_t* lp = loss.mutable_data_ptr<math_t>();
  math_t* dp = diff.mutable_data_ptr<math_t>();

  parallel_rows(x.size(0) * C, D, [&](int64_t begin, int64_t end) {
    rowsort::Scratch& s = rowsort::thread_scratch();
    rowsort::reserve<math_t>(s, D);
    math_t* xtile = s.xtile.get<math_t>(xv.tile_elems());
    TileState xts;
    for (int64_t row = begin; row < end; ++row) {
      const math_t* r = rp + (row / C) * ref_bs + (row % C) * D;
      math_t* out = dp + row * D;
      auto emit = [r, out](int64_t i, int64_t k, math_t v) {
        const math_t d = v - r[k];
        out[i] = d;
        return d;
      };
      const double sq = visit_row<math_t>(xv, row, end, xtile, xts, [&](auto load) {
        return rowsort::rank_row<math_t>(D, s, load, emit);
      });
      lp[row] = static_cast<math_t>(sq / static_cast<double>(D));
    }
    s.release_if_long(D);
  });
}

std::tuple<at::Tensor, at::Tensor> sort_match_fwd_cpu(const at::Tensor& x, const at::Tensor& ref) {
  check_fwd_args(x, ref, /*cpu=*/true);
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2);
  const auto opts = x.options().dtype(checks::math_dtype(x.scalar_type()));
  at::Tensor loss = at::empty({B, C}, opts);
  at::Tensor diff = at::empty({B, C, D}, opts);
  if (B * C == 0) return {loss, diff};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwd,
                                  [&] { sort_match_fwd_kernel<scalar_t>(x, ref, loss, diff); });
  return {loss, diff};
}

std::tuple<at::Tensor, at::Tensor> sort_match_fwd_meta(const at::Tensor& x, const at::Tensor& ref) {
  check_fwd_args(x, ref, /*cpu=*/false);
  const auto opts = x.options().dtype(checks::math_dtype(x.scalar_type()));
  return {at::empty({x.size(0), x.size(1)}, opts), at::empty({x.size(0), x.size(1), x.size(2)}, opts)};
}

at::Tensor sort_match_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& diff, at::ScalarType dtype) {
  return row_grad_cpu(kBwd, grad_loss, diff, "diff", dtype);
}

at::Tensor sort_match_bwd_meta(const at::Tensor& grad_loss, const at::Tensor& diff, at::ScalarType dtype) {
  return row_grad_meta(kBwd, grad_loss, diff, "diff", dtype);
}

}  // namespace
}  // namespace vital_fast

TORCH_LIBRARY_IMPL(vital_fast, CPU, m) {
  m.impl("sort_match_fwd", &vital_fast::sort_match_fwd_cpu);
  m.impl("sort_match_bwd", &vital_fast::sort_match_bwd_cpu);
}

// Shape-only kernels for FakeTensor / torch.compile / opcheck.
TORCH_LIBRARY_IMPL(vital_fast, Meta, m) {
  m.impl("sort_match_fwd", &vital_fast::sort_match_fwd_meta);
  m.impl("sort_match_bwd", &vital_fast::sort_match_bwd_meta);
}
