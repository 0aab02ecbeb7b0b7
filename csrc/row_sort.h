// Row ranking for the sort-matching kernels: the position each element of a row takes in the
// stable ascending sort of the row (ties broken by index), without materializing the sorted row.
//
// Only ranks are needed. With t[i] = ref[rank(i)], the loss is (1/D) Σ_i (x[i] − t[i])² and the
// saved tensor is x[i] − t[i] (times a weight for lrp_weight), so callers pass `load(i)` (the
// row's i-th value in the math type) and `emit(i, rank, value) -> residual`; emit is called once
// per element and writes the saved tensor, and rank_row returns Σ residual² in double.
//
// Strategies by row length (single-thread ns per element on the 2-core AMD EPYC dev VM, normal
// data and ReLU-like data with half zeros, fused load + rank + residual pass):
//   D            7    49   100   196   784  3136  12544
//   counting    4.2  4.5   6.5  10.9     -     -      -    (count_less8 + tie fix)
//   radix 8-bit  -   14.1  9.0   7.4   6.4   6.5   6.5
//   radix 11-bit -     -     -    23   9.5   5.9   5.4    (two interleaved histograms)
//   std::sort   9.4  17   20    23    29    35      -     ((key << 32 | index) uint64)
// hence counting up to kCountRankMaxD, 8-bit digits below kRadix11MinD, 11-bit digits above.
//
// Keys: v + 0.0f first (so −0.0 and +0.0 get the same key and tie by index, as torch.sort treats
// them); then negative floats get all bits flipped and positive ones the sign bit set, which makes
// unsigned integer order equal float order. NaN (which the public API rejects) never sends an
// index out of bounds: it gets a key (radix, float64) or compares false (counting, where ranks
// stay in [0, D)), and the loss of its row comes out NaN.
//
// float64 rows (gradcheck-sized) use std::sort on (64-bit key, index) pairs.
//
// No torch dependency, so the strategies can be benchmarked standalone.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace vital_fast {
namespace rowsort {

constexpr int64_t kCountRankMaxD = 128;  // rows up to this length: rank by counting
constexpr int64_t kRadix11MinD = 2048;   // rows from this length: 3 passes of 11 bits
constexpr int64_t kCountBlock = 8;       // count_less register block (lanes per i-block)

inline uint32_t float_to_key(float v) {
  v += 0.0f;  // −0.0 → +0.0
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t mask = static_cast<uint32_t>(-static_cast<int32_t>(u >> 31)) | 0x80000000u;
  return u ^ mask;
}

inline float key_to_float(uint32_t k) {
  const uint32_t mask = static_cast<uint32_t>(-static_cast<int32_t>((~k) >> 31)) | 0x80000000u;
  const uint32_t u = k ^ mask;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// The same for double. Sorting integer keys keeps std::sort's strict weak order even for NaN
// (comparing doubles would be undefined behaviour there).
inline uint64_t double_to_key(double v) {
  v += 0.0;
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint64_t mask = static_cast<uint64_t>(-static_cast<int64_t>(u >> 63)) | (uint64_t{1} << 63);
  return u ^ mask;
}

inline double key_to_double(uint64_t k) {
  const uint64_t mask = static_cast<uint64_t>(-static_cast<int64_t>((~k) >> 63)) | (uint64_t{1} << 63);
  const uint64_t u = k ^ mask;
  double v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// A buffer of math_t values (float or double), grown on demand.
struct MathBuffer {
  std::vector<float> f32;
  std::vector<double> f64;

  template <typename T>
  T* get(size_t n) {
    std::vector<T>* v;
    if constexpr (std::is_same_v<T, double>) {
      v = &f64;
    } else {
      v = &f32;
    }
    if (v->size() < n) v->resize(n);
    return v->data();
  }
};

// Per-thread buffers, grown on demand and reused across rows and calls: touching freshly
// allocated memory is slow in the VMs this runs on, so nothing is allocated per row, and after
// the first call of a given size nothing at all.
struct Scratch {
  std::vector<uint32_t> key0, key1;  // radix keys (ping-pong)
  std::vector<uint16_t> idx16;       // two radix payload buffers [0, n) and [n, 2n), D <= 65536
  std::vector<uint32_t> idx32;       // the same for longer rows
  std::vector<float> vals;           // counting path: the row as contiguous float
  std::vector<int32_t> lt, cnt;      // counting path: #smaller, tie counters
  std::vector<std::pair<uint64_t, int64_t>> pairs;  // float64 rows: (key, index)
  MathBuffer weight;                 // lrp_weight: normalized relevance of the current row
  MathBuffer xtile, rtile;           // transposed tiles of channel-inner inputs (row_io.h)
  uint32_t hist[2][3 * 2048];        // digit histograms (two copies for interleaved counting)

  template <typename T>
  static void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }

  // Ranking buffers for rows of length D in float32 math.
  void reserve_f32(int64_t D) {
    const size_t n = static_cast<size_t>(D) + 2 * kCountBlock;  // padding for count_less blocks
    if (D <= kCountRankMaxD) {
      grow(vals, n);
      grow(lt, n);
      grow(cnt, n);
    } else {
      grow(key0, n);
      grow(key1, n);
      if (D <= 65536) {
        grow(idx16, 2 * n);
      } else {
        grow(idx32, 2 * n);
      }
    }
  }

  void reserve_f64(int64_t D) { grow(pairs, static_cast<size_t>(D)); }

  // Buffers for rows longer than this are freed after each block instead of kept for the next
  // call (they would pin tens of MB per thread).
  static constexpr int64_t kKeepMaxD = int64_t{1} << 20;
  void release_if_long(int64_t D) {
    if (D <= kKeepMaxD) return;
    std::vector<uint32_t>().swap(key0);
    std::vector<uint32_t>().swap(key1);
    std::vector<uint16_t>().swap(idx16);
    std::vector<uint32_t>().swap(idx32);
    std::vector<float>().swap(vals);
    std::vector<std::pair<uint64_t, int64_t>>().swap(pairs);
    weight = MathBuffer();
  }

  template <typename IdxT>
  std::pair<IdxT*, IdxT*> idx_buffers();
};

template <>
inline std::pair<uint16_t*, uint16_t*> Scratch::idx_buffers<uint16_t>() {
  return {idx16.data(), idx16.data() + idx16.size() / 2};
}
template <>
inline std::pair<uint32_t*, uint32_t*> Scratch::idx_buffers<uint32_t>() {
  return {idx32.data(), idx32.data() + idx32.size() / 2};
}

inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Counting (short rows). lt[i] = #{j : v[j] < v[i]} for i in [0, Dp), Dp = D rounded up to
// kCountBlock (v[D..Dp) must be readable; their counts are ignored). Blocked over i so that the
// block's values and counters stay in registers while j streams; the fixed-length inner loop
// vectorizes to compare + subtract-mask.
inline void count_less(const float* __restrict v, int64_t D, int32_t* __restrict lt) {
  const int64_t Dp = (D + kCountBlock - 1) / kCountBlock * kCountBlock;
  for (int64_t ib = 0; ib < Dp; ib += kCountBlock) {
    int32_t acc[kCountBlock] = {0};
    float vb[kCountBlock];
    for (int64_t k = 0; k < kCountBlock; ++k) vb[k] = v[ib + k];
    for (int64_t j = 0; j < D; ++j) {
      const float vj = v[j];
      for (int64_t k = 0; k < kCountBlock; ++k) acc[k] += (vj < vb[k]) ? 1 : 0;
    }
    for (int64_t k = 0; k < kCountBlock; ++k) lt[ib + k] = acc[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Radix. Digit d of key k (BITS bits each, the top digit shorter) and its histogram.
template <int BITS>
struct Radix {
  static constexpr int kPasses = (32 + BITS - 1) / BITS;
  static constexpr uint32_t kBuckets = 1u << BITS;
  static constexpr uint32_t kMask = kBuckets - 1;
  // Two histogram copies fed alternately when the buckets are many (11 bits): repeated hits on
  // one counter (the exponent digit; the zeros of ReLU outputs) otherwise serialize on
  // store-to-load forwarding.
  static constexpr int kCopies = BITS > 8 ? 2 : 1;
};

// Fills key[0..D) with the keys of load(0..D) and hist[0] with the digit histograms.
template <int BITS, typename Load>
inline void load_keys(int64_t D, Load&& load, uint32_t* __restrict key, uint32_t (*hist)[3 * 2048]) {
  using R = Radix<BITS>;
  for (int c = 0; c < R::kCopies; ++c) {
    std::memset(hist[c], 0, sizeof(uint32_t) * R::kPasses * R::kBuckets);
  }
  uint32_t* h0 = hist[0];
  int64_t i = 0;
  if (R::kCopies == 2) {
    uint32_t* h1 = hist[1];
    for (; i + 1 < D; i += 2) {
      const uint32_t a = float_to_key(load(i));
      const uint32_t b = float_to_key(load(i + 1));
      key[i] = a;
      key[i + 1] = b;
      for (int p = 0; p < R::kPasses; ++p) {
        ++h0[p * R::kBuckets + ((a >> (p * BITS)) & R::kMask)];
        ++h1[p * R::kBuckets + ((b >> (p * BITS)) & R::kMask)];
      }
    }
  }
  for (; i < D; ++i) {
    const uint32_t a = float_to_key(load(i));
    key[i] = a;
    for (int p = 0; p < R::kPasses; ++p) ++h0[p * R::kBuckets + ((a >> (p * BITS)) & R::kMask)];
  }
  if (R::kCopies == 2) {
    const uint32_t* h1 = hist[1];
    for (uint32_t j = 0; j < R::kPasses * R::kBuckets; ++j) h0[j] += h1[j];
  }
}

// LSD radix passes over key[0..D) (clobbered) with hist[0] from load_keys; passes whose digit is
// the same for every key are skipped; the last pass calls emit instead of scattering.
template <int BITS, typename IdxT, typename Emit>
inline double radix_rank(uint32_t* __restrict key, uint32_t* __restrict key1, IdxT* __restrict idx0,
                         IdxT* __restrict idx1, int64_t D, const uint32_t* hist, Emit&& emit) {
  using R = Radix<BITS>;
  int passes[R::kPasses];
  int np = 0;
  const uint32_t k0 = key[0];
  for (int p = 0; p < R::kPasses; ++p) {
    if (hist[p * R::kBuckets + ((k0 >> (p * BITS)) & R::kMask)] != static_cast<uint32_t>(D)) {
      passes[np++] = p;
    }
  }
  double sq = 0.0;
  if (np == 0) {  // every key equal: the stable order is the index order
    for (int64_t i = 0; i < D; ++i) {
      const float d = emit(i, i, key_to_float(key[i]));
      sq += static_cast<double>(d) * d;
    }
    return sq;
  }
  uint32_t* src_k = key;
  uint32_t* dst_k = key1;
  const IdxT* src_i = nullptr;  // nullptr: the identity payload before the first pass
  IdxT* dst_i = idx0;
  IdxT* spare_i = idx1;
  uint32_t off[R::kBuckets];
  for (int q = 0; q < np; ++q) {
    const int sh = BITS * passes[q];
    const uint32_t* h = hist + passes[q] * R::kBuckets;
    uint32_t run = 0;
    for (uint32_t d = 0; d < R::kBuckets; ++d) {
      off[d] = run;
      run += h[d];
    }
    if (q == np - 1) {
      for (int64_t i = 0; i < D; ++i) {
        const uint32_t k = src_k[i];
        const int64_t from = src_i ? static_cast<int64_t>(src_i[i]) : i;
        const float d = emit(from, static_cast<int64_t>(off[(k >> sh) & R::kMask]++), key_to_float(k));
        sq += static_cast<double>(d) * d;
      }
    } else {
      if (src_i == nullptr) {
        for (int64_t i = 0; i < D; ++i) {
          const uint32_t k = src_k[i];
          const uint32_t pos = off[(k >> sh) & R::kMask]++;
          dst_k[pos] = k;
          dst_i[pos] = static_cast<IdxT>(i);
        }
      } else {
        for (int64_t i = 0; i < D; ++i) {
          const uint32_t k = src_k[i];
          const uint32_t pos = off[(k >> sh) & R::kMask]++;
          dst_k[pos] = k;
          dst_i[pos] = src_i[i];
        }
      }
      std::swap(src_k, dst_k);
      src_i = dst_i;
      std::swap(dst_i, spare_i);
    }
  }
  return sq;
}

template <int BITS, typename Load, typename Emit>
inline double radix_rank_row(int64_t D, Scratch& s, Load&& load, Emit&& emit) {
  load_keys<BITS>(D, load, s.key0.data(), s.hist);
  if (D <= 65536) {
    auto b = s.idx_buffers<uint16_t>();
    return radix_rank<BITS>(s.key0.data(), s.key1.data(), b.first, b.second, D, s.hist[0], emit);
  }
  auto b = s.idx_buffers<uint32_t>();
  return radix_rank<BITS>(s.key0.data(), s.key1.data(), b.first, b.second, D, s.hist[0], emit);
}

// ---------------------------------------------------------------------------------------------
// One row in float32 math: load(i) -> float, emit(i, rank, float value) -> float residual.
// Returns Σ residual² (double). Needs s.reserve_f32(D) first.
template <typename Load, typename Emit>
inline double rank_row_f32(int64_t D, Scratch& s, Load&& load, Emit&& emit) {
  if (D <= kCountRankMaxD) {
    float* v = s.vals.data();
    int32_t* lt = s.lt.data();
    int32_t* cnt = s.cnt.data();
    for (int64_t i = 0; i < D; ++i) {
      v[i] = load(i) + 0.0f;  // −0.0 → +0.0 (compares equal anyway; keeps emit's values canonical)
      cnt[i] = 0;
    }
    for (int64_t i = D; i < D + kCountBlock; ++i) v[i] = 0.0f;
    count_less(v, D, lt);
    // Equal values have equal lt and distinct values distinct lt, so the stable rank is lt plus
    // the number of earlier elements with the same lt.
    double sq = 0.0;
    for (int64_t i = 0; i < D; ++i) {
      const int32_t l = lt[i];
      const float d = emit(i, static_cast<int64_t>(l + cnt[l]++), v[i]);
      sq += static_cast<double>(d) * d;
    }
    return sq;
  }
  if (D < kRadix11MinD) return radix_rank_row<8>(D, s, load, emit);
  return radix_rank_row<11>(D, s, load, emit);
}

// One row in float64 math: load(i) -> double, emit(i, rank, double value) -> double residual.
// Needs s.reserve_f64(D) first.
template <typename Load, typename Emit>
inline double rank_row_f64(int64_t D, Scratch& s, Load&& load, Emit&& emit) {
  auto& pairs = s.pairs;
  for (int64_t i = 0; i < D; ++i) pairs[i] = {double_to_key(load(i)), i};
  // Lexicographic pair order: by value, ties by index (the stable order).
  std::sort(pairs.begin(), pairs.begin() + D);
  double sq = 0.0;
  for (int64_t j = 0; j < D; ++j) {
    const double d = emit(pairs[j].second, j, key_to_double(pairs[j].first));
    sq += d * d;
  }
  return sq;
}

// Math-type dispatch: float rows (float16/bfloat16/float32 input) or double rows.
template <typename math_t>
inline void reserve(Scratch& s, int64_t D) {
  if constexpr (std::is_same_v<math_t, double>) {
    s.reserve_f64(D);
  } else {
    s.reserve_f32(D);
  }
}

template <typename math_t, typename Load, typename Emit>
inline double rank_row(int64_t D, Scratch& s, Load&& load, Emit&& emit) {
  if constexpr (std::is_same_v<math_t, double>) {
    return rank_row_f64(D, s, load, emit);
  } else {
    return rank_row_f32(D, s, load, emit);
  }
}

}  // namespace rowsort
}  // namespace vital_fast
