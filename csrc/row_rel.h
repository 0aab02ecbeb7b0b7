// The relevance side of a row: R̂ = (rel − min rel) / (max rel − min rel + 1e-6) of one row of a
// (B, C, D) relevance tensor, read in place with its own strides and dtype.
//
// rel's dtype is erased (RelArgs) and the row read through a loader picked once per call
// (rhat_loader), so the ranking code of a kernel is instantiated per x dtype only, not per
// (x, rel) dtype pair. Used by lrp_weight_cpu.cpp and sorted_prototype_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

#include "row_io.h"

namespace vital_fast {

constexpr double kLrpEps = 1e-6;  // as vital_fast.oracle.LRP_EPS

// rel with its dtype erased: the ranking code is instantiated per x dtype only, and the rel row
// is read through a loader picked once per call.
struct RelArgs {
  const void* p;
  int64_t C, D, s0, s1, s2;
};

// w = R̂ of row `row`, as the reference computes it: (rel − lo) / ((hi − lo) + eps), a division,
// in math_t.
template <typename rel_t, typename math_t>
inline void load_rhat(const RelArgs& a, int64_t row, int64_t end, math_t* tile, TileState& st,
                      math_t* __restrict w) {
  const RowsView<rel_t> v(static_cast<const rel_t*>(a.p), a.C, a.D, a.s0, a.s1, a.s2);
  const int64_t D = a.D;
  visit_row<math_t>(v, row, end, tile, st, [&](auto load) {
    for (int64_t i = 0; i < D; ++i) w[i] = load(i);
    return 0;
  });
  math_t lo = w[0], hi = w[0];
  for (int64_t i = 0; i < D; ++i) {
    lo = w[i] < lo ? w[i] : lo;
    hi = w[i] > hi ? w[i] : hi;
  }
  const math_t denom = (hi - lo) + static_cast<math_t>(kLrpEps);
  for (int64_t i = 0; i < D; ++i) w[i] = (w[i] - lo) / denom;
}

template <typename math_t>
using RhatLoader = void (*)(const RelArgs&, int64_t, int64_t, math_t*, TileState&, math_t*);

// The loader of R̂ rows for a relevance tensor of dtype `t`.
template <typename math_t>
inline RhatLoader<math_t> rhat_loader(at::ScalarType t) {
  RhatLoader<math_t> f = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "rhat_loader",
                                  [&] { f = &load_rhat<scalar_t, math_t>; });
  return f;
}

inline RelArgs rel_args(const at::Tensor& rel) {
  return RelArgs{rel.const_data_ptr(), rel.size(1), rel.size(2), rel.stride(0), rel.stride(1), rel.stride(2)};
}

// Elements of the per-thread tile buffer that reading rows of `a` needs (0: not tiled).
inline int64_t rel_tile_elems(const RelArgs& a) {
  const int64_t g = RowsView<float>::group_for(a.C, a.D, a.s1, a.s2);
  return g > 1 ? g * a.D : 0;
}

}  // namespace vital_fast
