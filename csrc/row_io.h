// Reading the rows (b, c) of a (B, C, D) tensor in place, whatever its strides.
//
// Three ways, chosen per tensor:
//   * rows contiguous (stride(2) == 1): read directly;
//   * channel-inner layouts (|stride(1)| < |stride(2)|: channels-last CNN features, ViT tokens
//     (B, N, C) seen as (B, C, N)): a row's elements sit in different cache lines shared with
//     the next channels, so up to kTileMaxRows consecutive channels are transposed at once into a
//     per-thread tile (one cache line read serves the whole group) and the rows are then read
//     from the tile. Single-thread ns per element on the dev VM, strided vs tiled (8 rows):
//     (C, D) = (256, 3136) 12.6 vs 11.8, (64, 12544) 9.7 vs 7.4, (2048, 49) 9.4 vs 6.5;
//   * anything else: strided reads.
// visit_row hands the row to a callback as a `load(i) -> math_t` functor, so the consumer is
// compiled once per way and the loads inline.
//
// parallel_rows runs a row loop on at::get_num_threads() threads (torch.set_num_threads) with
// blocks of rows handed out dynamically: on a shared machine one thread is often slowed down,
// and static halves would make the other wait. Every row is computed independently, so results
// do not depend on the schedule.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace vital_fast {

// A block of rows has at least this many elements: below that, handing out work and waking the
// second thread cost more than they save.
constexpr int64_t kGrainElems = int64_t{1} << 14;
constexpr int64_t kBlocksPerThread = 16;

// f(begin, end) over blocks of consecutive rows covering [0, rows), each block on one thread.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t D, const F& f) {
  if (rows <= 0) return;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1));
  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nthreads <= 1 || rows <= grain) {
    f(int64_t{0}, rows);
    return;
  }
  const int64_t block = std::max(grain, rows / (nthreads * kBlocksPerThread));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = next.fetch_add(block); b < rows; b = next.fetch_add(block)) {
        f(b, std::min(rows, b + block));
      }
    }
  });
}

constexpr int64_t kTileMaxRows = 8;
constexpr int64_t kTileMaxElems = int64_t{1} << 17;  // tile ≤ 512 KiB in float: stays in L2

template <typename T>
struct RowsView {
  const T* p;
  int64_t C, D;
  int64_t s0, s1, s2;
  int64_t group;  // rows per tile; 1: no tiling

  RowsView(const T* p_, int64_t C_, int64_t D_, int64_t s0_, int64_t s1_, int64_t s2_)
      : p(p_), C(C_), D(D_), s0(s0_), s1(s1_), s2(s2_), group(group_for(C_, D_, s1_, s2_)) {}

  static int64_t group_for(int64_t C, int64_t D, int64_t s1, int64_t s2) {
    if (s2 == 1 || C < 2 || std::llabs(s1) >= std::llabs(s2)) return 1;
    return std::clamp<int64_t>(kTileMaxElems / D, 1, kTileMaxRows);
  }
  // Elements of the per-thread tile buffer this view needs (0 when not tiled).
  int64_t tile_elems() const { return group > 1 ? group * D : 0; }
};

// Which rows the thread's tile holds.
struct TileState {
  int64_t begin = 0, end = 0;
};

// Transposes rows [row, row + n) (same b) into tile[k * D + i].
template <typename T, typename math_t>
inline void load_tile(const RowsView<T>& v, int64_t row, int64_t n, math_t* __restrict tile) {
  const T* base = v.p + (row / v.C) * v.s0 + (row % v.C) * v.s1;
  const int64_t D = v.D, s1 = v.s1, s2 = v.s2;
  if (s1 == 1) {
    for (int64_t i = 0; i < D; ++i) {
      const T* q = base + i * s2;
      for (int64_t k = 0; k < n; ++k) tile[k * D + i] = static_cast<math_t>(q[k]);
    }
  } else {
    for (int64_t i = 0; i < D; ++i) {
      const T* q = base + i * s2;
      for (int64_t k = 0; k < n; ++k) tile[k * D + i] = static_cast<math_t>(q[k * s1]);
    }
  }
}

// Calls f(load) for row `row` of the view, load(i) -> math_t; rows are visited in increasing
// order within one parallel chunk [.., end), which a tile never crosses. Returns f's result.
template <typename math_t, typename T, typename F>
inline auto visit_row(const RowsView<T>& v, int64_t row, int64_t end, math_t* tile, TileState& st, F&& f) {
  if (v.group > 1) {
    if (row < st.begin || row >= st.end) {
      const int64_t c = row % v.C;
      st.begin = row;
      st.end = std::min({end, row + v.group, row - c + v.C});
      load_tile<T, math_t>(v, row, st.end - st.begin, tile);
    }
    const math_t* t = tile + (row - st.begin) * v.D;
    return f([t](int64_t i) { return t[i]; });
  }
  const T* xr = v.p + (row / v.C) * v.s0 + (row % v.C) * v.s1;
  if (v.s2 == 1) return f([xr](int64_t i) { return static_cast<math_t>(xr[i]); });
  const int64_t s = v.s2;
  return f([xr, s](int64_t i) { return static_cast<math_t>(xr[i * s]); });
}

}  // namespace vital_fast
