// CPU kernel of the prototype builder: the mean of K images' sorted rows.
//
//   out[c, j] = (1/K) Σ_k sort(y[k, c])[j]       y = x, or x ⊙ R̂ with relevance (row_rel.h)
//
// vital_fast.sorted_prototype resamples `out` to its Q quantiles (a (C, D) → (C, Q) interpolation,
// cheap in torch). The plain-torch reference is vital_fast.oracle.sorted_prototype_reference:
// torch.sort, which sorts values and indices together (about 20-45 ns per element on the dev
// VM); here each row is ranked with row_sort.h (counting or LSD radix, 5-10 ns per element) and
// its values scattered straight into the channel's accumulator at their ranks, so no sorted copy
// of the features is written. Ties need no care: equal values give the same sorted row whatever
// their order.
//
// Parallelization: over blocks of channels (parallel_rows); a thread sums its channels' K rows in
// double, in the order k = 0, 1, ..., so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "row_io.h"
#include "row_rel.h"
#include "row_sort.h"

namespace vital_fast {
namespace {

constexpr const char* kOp = "sorted_rows_mean";

void check_args(const at::Tensor& x, const std::optional<at::Tensor>& rel, bool cpu) {
  if (cpu) checks::check_cpu(kOp, x, "x");
  checks::check_dim(kOp, x, "x", 3, "(K, C, D)");
  checks::check_float(kOp, x, "x");
  checks::check_row_length(kOp, x, "x");
  TORCH_CHECK(x.size(0) > 0, kOp, ": 'x' holds no images (K = 0), shape ", x.sizes());
  if (rel.has_value()) {
    if (cpu) checks::check_cpu(kOp, *rel, "rel");
    checks::check_same_device(kOp, x, "x", *rel, "rel");
    checks::check_float(kOp, *rel, "rel");
    TORCH_CHECK(rel->sizes() == x.sizes(), kOp, ": 'rel' must have the shape of 'x' ", x.sizes(), ", got ",
                rel->sizes());
  }
}

template <typename x_t>
void sorted_rows_mean_kernel(const at::Tensor& x, const std::optional<at::Tensor>& rel, at::Tensor& out) {
  using math_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
  const int64_t K = x.size(0), C = x.size(1), D = x.size(2);
  const RowsView<x_t> xv(x.const_data_ptr<x_t>(), C, D, x.stride(0), x.stride(1), x.stride(2));
  const bool has_rel = rel.has_value();
  RhatLoader<math_t> load_rhat_row = nullptr;
  RelArgs ra{};
  if (has_rel) {
    load_rhat_row = rhat_loader<math_t>(rel->scalar_type());
    ra = rel_args(*rel);
  }
  const int64_t rel_tile = has_rel ? rel_tile_elems(ra) : 0;
  math_t* op = out.mutable_data_ptr<math_t>();
  const double inv_k = 1.0 / static_cast<double>(K);

  parallel_rows(C, K * D, [&](int64_t c0, int64_t c1) {
    rowsort::Scratch& s = rowsort::thread_scratch();
    rowsort::reserve<math_t>(s, D);
    math_t* w = has_rel ? s.weight.get<math_t>(static_cast<size_t>(D)) : nullptr;
    math_t* xtile = s.xtile.get<math_t>(xv.tile_elems());
    math_t* rtile = s.rtile.get<math_t>(rel_tile);
    static thread_local std::vector<double> acc_buf;
    const size_t n = static_cast<size_t>((c1 - c0) * D);
    if (acc_buf.size() < n) acc_buf.resize(n);
    double* acc = acc_buf.data();
    std::fill(acc, acc + n, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      TileState xts, rts;  // rows k·C + [c0, c1): consecutive, so a channels-last tile serves several
      const int64_t end = k * C + c1;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t row = k * C + c;
        double* a = acc + (c - c0) * D;
        auto emit = [a](int64_t, int64_t rank, math_t v) {
          a[rank] += static_cast<double>(v);
          return math_t(0);
        };
        if (has_rel) {
          load_rhat_row(ra, row, end, rtile, rts, w);
          visit_row<math_t>(xv, row, end, xtile, xts, [&](auto load) {
            return rowsort::rank_row<math_t>(D, s, [&load, w](int64_t i) { return load(i) * w[i]; }, emit);
          });
        } else {
          visit_row<math_t>(xv, row, end, xtile, xts, [&](auto load) {
            return rowsort::rank_row<math_t>(D, s, load, emit);
          });
        }
      }
    }
    for (size_t i = 0; i < n; ++i) op[c0 * D + static_cast<int64_t>(i)] = static_cast<math_t>(acc[i] * inv_k);
    s.release_if_long(D);
    if (n > static_cast<size_t>(rowsort::Scratch::kKeepMaxD)) std::vector<double>().swap(acc_buf);
  });
}

at::Tensor sorted_rows_mean_cpu(const at::Tensor& x, const std::optional<at::Tensor>& rel) {
  check_args(x, rel, /*cpu=*/true);
  const int64_t C = x.size(1), D = x.size(2);
  at::Tensor out = at::empty({C, D}, x.options().dtype(checks::math_dtype(x.scalar_type())));
  if (C * D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp,
                                  [&] { sorted_rows_mean_kernel<scalar_t>(x, rel, out); });
  return out;
}

at::Tensor sorted_rows_mean_meta(const at::Tensor& x, const std::optional<at::Tensor>& rel) {
  check_args(x, rel, /*cpu=*/false);
  return at::empty({x.size(1), x.size(2)}, x.options().dtype(checks::math_dtype(x.scalar_type())));
}

}  // namespace
}  // namespace vital_fast

TORCH_LIBRARY_IMPL(vital_fast, CPU, m) { m.impl("sorted_rows_mean", &vital_fast::sorted_rows_mean_cpu); }

TORCH_LIBRARY_IMPL(vital_fast, Meta, m) { m.impl("sorted_rows_mean", &vital_fast::sorted_rows_mean_meta); }
