// The streaming kernels of decoding, y = x W^T for a few rows of x, one variant per instruction set.
//
// Decoding multiplies one token per sequence (a batch of at most 8 rows) by every weight matrix, so its speed is
// the speed at which the weights stream in from memory. Every variant reads each row of W exactly once, in the
// order it lies in memory, and multiplies it by all rows of x at the same time:
//
//   for each block of R weight rows (spread over the threads by the caller):
//     for each chunk of K (sized so the chunk of x stays in the L1 cache):
//       for k in steps of one register:  acc[m][r] += W[r, k:k+v] * x[m, k:k+v]   (elementwise, fp32)
//     y[m, r] += sum of the lanes of acc[m][r]
//
// The variants differ in how a register of weights becomes fp32 products:
//
// - AVX-512 with bf16 (Zen 4, Sapphire Rapids, Cooper Lake): VDPBF16PS multiplies pairs of bf16 numbers and adds
//   them to fp32 lanes; 32 weights a register.
// - AVX2 with FMA (x86-64-v3: Haswell and later, every Zen): a bf16 number is the top half of an fp32 one, so eight
//   weights widen to fp32 with a zero-extension and a 16-bit shift, then a fused multiply-add with x (widened to
//   fp32 once per call).
// - NEON (every ARM64 CPU): the same widening (a shift-left-long by 16), four lanes a register, fused multiply-add.
//
// In every variant each product of two bf16 numbers is exact in fp32 and every sum is fp32, as in PyTorch's bf16
// matrix products; only the order of the sums differs. fp32 weights take fused multiply-adds.
//
// This header needs no PyTorch: the extension (linear_cpu.cpp) binds it, and tests/csrc/check_kernels.cpp runs it
// against a scalar reference on any machine, an ARM64 one under emulation included. Each x86 variant carries its
// instruction set as a function attribute, so one build holds them all and the caller picks by what the CPU has.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PG_X86 1
#define PG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define PG_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define PG_NEON 1
#endif

namespace pg {

// A vector whose data starts on a cache line (64 bytes), for the copies of x the kernels read a register at a time:
// malloc's 16-byte alignment makes one 64-byte load in every one (AVX-512), or one 32-byte load in every two (AVX2),
// straddle two cache lines, which costs the kernels a second load each time.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* data, std::size_t) { ::operator delete(data, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

constexpr int64_t kL1Bytes = 32 * 1024;   // the part of x that one pass over the weight rows keeps hot, by default
constexpr int64_t kL2XBytes = 128 * 1024;  // the same for variants that read x from L2 (see x_chunk_bytes)
constexpr int64_t kAheadBytes = 512;       // ask for each weight row this far ahead of where it is read (measured best)

inline float bf16_to_float(uint16_t value) {
  const uint32_t bits = uint32_t(value) << 16;  // a bf16 number is the top 16 bits of an fp32 one
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The scalar remainder of a row when K is not a multiple of the register width: x is fp32 here.
template <typename W>
inline float weight_value(const W* w, int64_t i) {
  if constexpr (sizeof(W) == 2) {
    return bf16_to_float(w[i]);
  } else {
    return w[i];
  }
}

// How many bytes of x (all M rows) one pass over the weight rows covers: a variant may say, by
// `x_chunk_bytes<M>()`; by default the L1 cache's worth, kL1Bytes.
template <typename V, int M, typename = void>
struct XChunk {
  static constexpr int64_t bytes = kL1Bytes;
};
template <typename V, int M>
struct XChunk<V, M, std::void_t<decltype(V::template x_chunk_bytes<M>())>> {
  static constexpr int64_t bytes = V::template x_chunk_bytes<M>();
};

// Rows [b0 * R, b1 * R) of W (the last block may be short), all of K in chunks of XChunk's bytes of x.
// `V::block<M, R>` does R rows over one chunk; the rows past the last whole block go one at a time.
// `w` is the variant's `Weights`: a pointer for bf16 and fp32 weights, a small struct of pointers for the quantized
// ones. The chunks of K are multiples of 128, so they hold whole int4 groups of 32, 64 or 128.
template <typename V, int M, int R>
void drive(const typename V::X* x, typename V::Weights w, float* y, int64_t K, int64_t N, int64_t b0, int64_t b1) {
  constexpr int64_t x_bytes = XChunk<V, M>::bytes;
  const int64_t chunk = std::max<int64_t>(512, (x_bytes / (M * int64_t(sizeof(typename V::X)))) / 128 * 128);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      if (n0 + R <= N) {
        V::template block<M, R>(x, w, y, K, N, n0, k0, k1);
      } else {
        for (int64_t n = n0; n < N; ++n) V::template block<M, 1>(x, w, y, K, N, n, k0, k1);
      }
    }
  }
}

// How many weight rows one block takes for M rows of x, so that the M * R accumulators stay in registers; and the
// driver for that M, over blocks [b0, b1) of that size. `Par(blocks, fn)` runs fn(b0, b1) over ranges of blocks.
template <typename V, int M, typename Par>
void run_m(const typename V::X* x, typename V::Weights w, float* y, int64_t K, int64_t N, Par parallel) {
  constexpr int R = V::template rows_per_block<M>();
  parallel((N + R - 1) / R, [&](int64_t b0, int64_t b1) { drive<V, M, R>(x, w, y, K, N, b0, b1); });
}

// A variant whose blocks read x in an order of their own gives `arrange_x(x, out, M, K)`; `run` arranges x once per
// call, before the blocks.
template <typename V, typename = void>
struct ArrangesX : std::false_type {};
template <typename V>
struct ArrangesX<V, std::void_t<decltype(&V::arrange_x)>> : std::true_type {};

template <typename V, typename Par>
void run(int64_t M, const typename V::X* x, typename V::Weights w, float* y, int64_t K, int64_t N, Par parallel) {
  AlignedVector<typename V::X> arranged;
  if constexpr (ArrangesX<V>::value) {
    arranged.resize(M * K);
    V::arrange_x(x, arranged.data(), M, K);
    x = arranged.data();
  }
  switch (M) {
    case 1: run_m<V, 1>(x, w, y, K, N, parallel); break;
    case 2: run_m<V, 2>(x, w, y, K, N, parallel); break;
    case 3: run_m<V, 3>(x, w, y, K, N, parallel); break;
    case 4: run_m<V, 4>(x, w, y, K, N, parallel); break;
    case 5: run_m<V, 5>(x, w, y, K, N, parallel); break;
    case 6: run_m<V, 6>(x, w, y, K, N, parallel); break;
    case 7: run_m<V, 7>(x, w, y, K, N, parallel); break;
    default: run_m<V, 8>(x, w, y, K, N, parallel); break;
  }
}

// ---- quantized weights: what a block needs besides x ---------------------------------------------------------------

// int8 codes [N, K] and one float32 scale per row: y[m, n] = scale[n] * sum_k codes[n, k] x[m, k].
struct Int8Weights {
  const int8_t* codes;
  const float* scale;
};

// int4 codes packed two to a byte [N, K / 2] (in each 32 codes, byte j holds code j low and code j + 16 high), and a
// scale and a zero per group of G inputs, [N, K / G], in the model's dtype S (bf16 bits or float). With
// X[m, g] = sum of x[m, k] over group g (computed once per call), each group adds
//   scale * sum_k codes[k] x[m, k] + (zero - 8 * scale) * X[m, g]      = sum_k ((codes[k] - 8) scale + zero) x[m, k].
template <typename S>
struct Int4Weights {
  const uint8_t* packed;
  const S* scale;
  const S* zero;
  const float* group_sums;  // X [M, K / G]
  int64_t group;
};

template <typename S>
inline float scalar_value(S value) {
  if constexpr (sizeof(S) == 2) {
    return bf16_to_float(value);
  } else {
    return value;
  }
}

// The int4 group's constant term for row n and group g, added to y once per group: zero - centre * scale, where the
// kernel summed (codes + centre - 8) x. The fp32 kernels sum codes * x (centre 8); the bf16 one sums the bf16 numbers
// 128 + codes (centre 136), which a single OR makes from a code.
template <typename S>
inline float int4_offset(const Int4Weights<S>& w, int64_t n, int64_t groups, int64_t g, float centre = 8.0f) {
  return scalar_value(w.zero[n * groups + g]) - centre * scalar_value(w.scale[n * groups + g]);
}

// Adds to constant[m][r] the constant terms of rows n0 .. n0 + R - 1 over the groups of [k0, k1): for each row of x,
// the sum over g of int4_offset(row, g, centre) * X[m, g]. Kept out of the loop over codes, which it would slow.
template <int M, int R, typename S>
inline void add_int4_constants(const Int4Weights<S>& w, int64_t groups, int64_t n0, int64_t k0, int64_t k1,
                               float centre, float (&constant)[M][R]) {
  for (int r = 0; r < R; ++r) {
    for (int64_t g = k0 / w.group; g < k1 / w.group; ++g) {
      const float offset = int4_offset(w, n0 + r, groups, g, centre);
      for (int m = 0; m < M; ++m) constant[m][r] += offset * w.group_sums[m * groups + g];
    }
  }
}

#if defined(PG_X86)

// ---- AVX-512 ------------------------------------------------------------------------------------------------------

// What a register of weights is, per weight type: bf16 (32 values a register, VDPBF16PS) or fp32 (16 values, fused
// multiply-add). x has the weights' type.
template <typename T>
struct Avx512Lanes;

template <>
struct Avx512Lanes<uint16_t> {
  using Register = __m512i;
  using Mask = __mmask32;
  static constexpr int kValues = 32;
  PG_AVX512 static Register load(const uint16_t* p) { return _mm512_loadu_si512(p); }
  PG_AVX512 static Register load(const uint16_t* p, Mask mask) { return _mm512_maskz_loadu_epi16(mask, p); }
  PG_AVX512 static __m512 multiply_add(__m512 acc, Register w, Register x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
};

template <>
struct Avx512Lanes<float> {
  using Register = __m512;
  using Mask = __mmask16;
  static constexpr int kValues = 16;
  PG_AVX512 static Register load(const float* p) { return _mm512_loadu_ps(p); }
  PG_AVX512 static Register load(const float* p, Mask mask) { return _mm512_maskz_loadu_ps(mask, p); }
  PG_AVX512 static __m512 multiply_add(__m512 acc, Register w, Register x) { return _mm512_fmadd_ps(w, x, acc); }
};

// The block both stepped AVX-512 kernels run (Avx512Wide, Avx512Bf16Int8): unmasked steps of `Values` inputs, then
// one masked step for the chunk's short end, then each row's sums into y, times the row's scale where there is one.
template <typename V, int Values, typename Mask, int M, int R, typename Weights>
PG_AVX512 inline void stepped_block(const typename V::X* x, Weights w, const float* scale, float* y, int64_t K,
                                    int64_t N, int64_t n0, int64_t k0, int64_t k1) {
  const bool next_block = n0 + 2 * R <= N;
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + Values <= k1; k += Values) V::template step<M, R, false>(x, w, K, n0, k, 0, next_block, acc);
  if (k < k1) V::template step<M, R, true>(x, w, K, n0, k, Mask((1ull << (k1 - k)) - 1), next_block, acc);
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      const float sum = _mm512_reduce_add_ps(acc[m][r]);
      y[m * N + n0 + r] += scale != nullptr ? scale[n0 + r] * sum : sum;
    }
}

// bf16 or fp32 weights and x of the same type, one register of each row a step.
template <typename T>
struct Avx512Wide {
  using W = T;
  using X = T;
  using Weights = const W*;
  using Lanes = Avx512Lanes<T>;
  // bf16 at 8 rows of x: 3 weight rows, 24 accumulators; fp32 keeps 2, as x's registers take the rest.
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M <= 4 ? 4 : M <= 7 || sizeof(T) == 2 ? 3 : 2; }

  // One step of a register's worth of inputs for every row of the block; `Masked` only for the chunk's last, short
  // step (a mask in every step makes the compiler keep the accumulators in memory).
  template <int M, int R, bool Masked>
  PG_AVX512 static inline void step(const X* x, const W* w, int64_t K, int64_t n0, int64_t k,
                                    typename Lanes::Mask mask, bool next_block, __m512 (&acc)[M][R]) {
    typename Lanes::Register xv[M];
    for (int m = 0; m < M; ++m) xv[m] = Masked ? Lanes::load(x + m * K + k, mask) : Lanes::load(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const W* row = w + (n0 + r) * K + k;
      if (!Masked) {
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
      }
      const typename Lanes::Register wv = Masked ? Lanes::load(row, mask) : Lanes::load(row);
      for (int m = 0; m < M; ++m) acc[m][r] = Lanes::multiply_add(acc[m][r], wv, xv[m]);
    }
  }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    stepped_block<Avx512Wide, Lanes::kValues, typename Lanes::Mask, M, R>(x, w, nullptr, y, K, N, n0, k0, k1);
  }
};

using Avx512Bf16 = Avx512Wide<uint16_t>;
using Avx512Fp32 = Avx512Wide<float>;

// int8 weights, x fp32: 16 codes a register, widened to int32, converted to fp32, fused multiply-add.
struct Avx512Int8 {
  using X = float;
  using Weights = Int8Weights;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M <= 4 ? 4 : M <= 7 ? 3 : 2; }

  // Sixteen inputs for every row of the block (`Masked` only for the chunk's last, short step: a mask in every step
  // makes the compiler keep the accumulators in memory).
  template <int M, int R, bool Masked>
  PG_AVX512 static inline void sixteen(const X* x, Weights w, int64_t K, int64_t n0, int64_t k, __mmask16 mask,
                                       __m512 (&acc)[M][R]) {
    for (int r = 0; r < R; ++r) {
      const int8_t* row = w.codes + (n0 + r) * K + k;
      const __m128i codes = Masked ? _mm_maskz_loadu_epi8(mask, row)
                                   : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      for (int m = 0; m < M; ++m) {
        const __m512 xm = Masked ? _mm512_maskz_loadu_ps(mask, x + m * K + k) : _mm512_loadu_ps(x + m * K + k);
        acc[m][r] = _mm512_fmadd_ps(wv, xm, acc[m][r]);
      }
    }
  }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    const bool next_block = n0 + 2 * R <= N;
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {  // a cache line of codes per row: one prefetch each, no masks
      for (int r = 0; r < R; ++r) {
        const int8_t* row = w.codes + (n0 + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
        for (int part = 0; part < 4; ++part) {
          const __m128i sixteen = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * part));
          const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sixteen));
          for (int m = 0; m < M; ++m)
            acc[m][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * part), acc[m][r]);
        }
      }
    }
    for (; k + 16 <= k1; k += 16) sixteen<M, R, false>(x, w, K, n0, k, 0, acc);  // the rest of the chunk
    if (k < k1) sixteen<M, R, true>(x, w, K, n0, k, __mmask16((1u << (k1 - k)) - 1), acc);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += w.scale[n0 + r] * _mm512_reduce_add_ps(acc[m][r]);
  }
};

// int8 weights, bf16 x, for several rows of x: each 32 codes of a row become 32 bf16 numbers once (exactly: |code| is
// at most 128, which bf16's 8 significant bits hold), and VDPBF16PS multiplies them by every row of x, 32 products an
// instruction where the fp32 kernel above does 16. Products are exact and sums fp32, as there.
struct Avx512Bf16Int8 {
  using X = uint16_t;
  using Weights = Int8Weights;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M <= 4 ? 4 : 3; }

  // 32 inputs for every row of the block; `Masked` only for the chunk's last, short step (as Avx512Bf16::step).
  template <int M, int R, bool Masked>
  PG_AVX512 static inline void step(const X* x, Weights w, int64_t K, int64_t n0, int64_t k, __mmask32 mask,
                                    bool next_block, __m512 (&acc)[M][R]) {
    __m512bh wv[R];  // the block's weights as bf16 first, then one row of x at a time: M R + R + 1 registers
    for (int r = 0; r < R; ++r) {
      const int8_t* row = w.codes + (n0 + r) * K + k;
      if (!Masked && (k & 63) == 0) {  // once a cache line: further along this row, and this place in the next block
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
      }
      const __m256i codes = Masked ? _mm256_maskz_loadu_epi8(mask, row)
                                   : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes)));      // k .. k + 15
      const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1)));  // .. k + 31
      wv[r] = _mm512_cvtne2ps_pbh(high, low);  // [low, high] as 32 bf16 numbers, exact
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xv = Masked ? _mm512_maskz_loadu_epi16(mask, x + m * K + k) : _mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], (__m512bh)xv);
    }
  }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    stepped_block<Avx512Bf16Int8, 32, __mmask32, M, R>(x, w, w.scale, y, K, N, n0, k0, k1);
  }
};

// Sixteen scales or zeros as fp32: bf16 bits widened by a shift, or fp32 loaded as they are; the masked forms read
// only the lanes of `mask` (the rest are zero).
PG_AVX512 inline __m512 sixteen_floats(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
PG_AVX512 inline __m512 sixteen_floats(const float* p) { return _mm512_loadu_ps(p); }
PG_AVX512 inline __m512 sixteen_floats(const uint16_t* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
PG_AVX512 inline __m512 sixteen_floats(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// `add_int4_constants` sixteen groups a register. Done a group at a time, the constant terms cost about as much as the
// codes with groups of 32 (see `add_int4_constants_avx2`).
template <int M, int R, typename S>
PG_AVX512 inline void add_int4_constants_avx512(const Int4Weights<S>& w, int64_t groups, int64_t n0, int64_t k0,
                                                int64_t k1, float centre, float (&constant)[M][R]) {
  const int64_t first = k0 / w.group, last = k1 / w.group;
  for (int r = 0; r < R; ++r) {
    const int64_t row = (n0 + r) * groups;
    for (int m = 0; m < M; ++m) {
      __m512 sum = _mm512_setzero_ps();
      int64_t g = first;
      for (; g + 16 <= last; g += 16) {
        const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(centre), sixteen_floats(w.scale + row + g),
                                               sixteen_floats(w.zero + row + g));  // zero - centre * scale
        sum = _mm512_fmadd_ps(offset, _mm512_loadu_ps(w.group_sums + m * groups + g), sum);
      }
      float rest = _mm512_reduce_add_ps(sum);
      for (; g < last; ++g) rest += int4_offset(w, n0 + r, groups, g, centre) * w.group_sums[m * groups + g];
      constant[m][r] += rest;
    }
  }
}

// int4 weights, x fp32: 32 codes a 16-byte load, unpacked into two registers of 16 consecutive inputs.
template <typename S>
struct Avx512Int4 {
  using X = float;
  using Weights = Int4Weights<S>;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    const int64_t groups = K / w.group;
    const bool next_block = n0 + 2 * R <= N;  // int4 rows are short (1 KB at K = 2048): fetch the next block's early
    const __m512i low_bits = _mm512_set1_epi32(0xF);
    __m512 acc[M][R];
    float constant[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps(), constant[m][r] = 0.0f;
    for (int64_t g0 = k0; g0 < k1; g0 += w.group) {
      const int64_t g = g0 / w.group;
      __m512 in_group[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) in_group[m][r] = _mm512_setzero_ps();
      for (int64_t k = g0; k < g0 + w.group; k += 32) {
        for (int r = 0; r < R; ++r) {
          const uint8_t* bytes = w.packed + ((n0 + r) * K + k) / 2;
          if ((k & 127) == 0) {  // once a cache line: further along this row, and the same place in the next block
            _mm_prefetch(reinterpret_cast<const char*>(bytes) + kAheadBytes, _MM_HINT_T0);
            if (next_block) _mm_prefetch(reinterpret_cast<const char*>(bytes + R * K / 2), _MM_HINT_T1);
          }
          const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
          const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(wide, low_bits));  // codes k .. k + 15
          const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(wide, 4));       // codes k + 16 .. k + 31
          for (int m = 0; m < M; ++m) {
            in_group[m][r] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x + m * K + k), in_group[m][r]);
            in_group[m][r] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + m * K + k + 16), in_group[m][r]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_set1_ps(scalar_value(w.scale[(n0 + r) * groups + g]));
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(in_group[m][r], scale, acc[m][r]);
      }
    }
    add_int4_constants_avx512(w, groups, n0, k0, k1, 8.0f, constant);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += _mm512_reduce_add_ps(acc[m][r]) + constant[m][r];
  }
};


// int4 weights, bf16 x, with AVX-512's bf16 instructions. A code c becomes the bf16 number 128 + c with one OR
// (0x4300 is 128.0, and c fills the low mantissa bits), so VDPBF16PS multiplies 32 codes by x at once; each group's
// sum of x times 128 + 8 goes into the group's constant term (`int4_offset` with centre 136). Products are exact, sums
// fp32; the constant 128 costs about 4 bits of the fp32 sums' 24, far below the bf16 rounding of the result.
//
// A step takes one cache line of a row, 64 bytes = 128 codes, as 32 16-bit words. Word i holds four codes, one per
// nibble, and a shift and a mask take out each nibble of all 32 words at once: four registers of 32 codes. In the
// packed layout (see Int4Weights) nibble 0 of word i is code 32 (i / 8) + 2 (i % 8) of the line, nibble 1 that plus
// 16, nibble 2 plus 1 and nibble 3 plus 17, so `arrange_x` puts x in that order once per call, and the codes need no
// shuffle. Lane l of the products sums words 2l and 2l + 1, codes of one run of 32: its group's scale is lane l's.
template <typename S>
struct Avx512Bf16Int4 {
  using X = uint16_t;
  using Weights = Int4Weights<S>;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

  // x [M, K] -> each whole line of 128 inputs in the order of the four nibbles (the rest of K stays in order).
  static void arrange_x(const X* x, X* out, int64_t M, int64_t K) {
    const int64_t lines = K / 128 * 128;
    for (int64_t m = 0; m < M; ++m) {
      const X* in = x + m * K;
      X* to = out + m * K;
      for (int64_t line = 0; line < lines; line += 128) {
        for (int i = 0; i < 32; ++i) {
          const int64_t first = line + 32 * (i / 8) + 2 * (i % 8);
          to[line + i] = in[first];
          to[line + 32 + i] = in[first + 16];
          to[line + 64 + i] = in[first + 1];
          to[line + 96 + i] = in[first + 17];
        }
      }
      std::copy(in + lines, in + K, to + lines);
    }
  }

  // The whole lines of 128 codes in [k0, k1), each `PerLine` groups: adds their products to acc and returns where
  // they end. With one group a line its scale is one number, broadcast; with 2 or 4 a permute spreads them.
  // (Single thread, weights in L2: groups of 128 at 46 G weights/s against 43 with one permuting path for all; GCC
  // still stores the accumulators to the stack each line in most of these loops, stores only; a local copy of them
  // with the loops unrolled by pragma removed some and measured no faster.)
  template <int M, int R, int PerLine>
  PG_AVX512 __attribute__((always_inline)) static int64_t lines(const X* x, const Weights& w, int64_t K, int64_t N,
                                                                int64_t n0, int64_t k0, int64_t k1,
                                                                __m512 (&acc)[M][R]) {
    const int64_t groups = K / w.group;
    const bool next_block = n0 + 2 * R <= N;  // int4 rows are short (1 KB at K = 2048): fetch the next block's early
    const __m512i low_bits = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
    // Lane l of the products belongs to group l / (16 / PerLine) of the line (with 2 or 4 groups a line).
    constexpr int lanes_shift = PerLine == 1 ? 4 : PerLine == 2 ? 3 : 2;
    const __m512i lane_group =
        _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), lanes_shift);
    constexpr int group_shift = PerLine == 1 ? 7 : PerLine == 2 ? 6 : 5;  // the group of position k is k >> shift
    int64_t k = k0;
    for (; k + 128 <= k1; k += 128) {  // chunks start at multiples of 128, so these are whole, arranged lines
      const int64_t g = k >> group_shift;
      for (int r = 0; r < R; ++r) {
        const uint8_t* line = w.packed + ((n0 + r) * K + k) / 2;
        _mm_prefetch(reinterpret_cast<const char*>(line) + kAheadBytes, _MM_HINT_T0);
        // The next block's line, or this one again in the last block: a select, not a branch in the loop.
        _mm_prefetch(reinterpret_cast<const char*>(next_block ? line + R * K / 2 : line), _MM_HINT_T1);
        const __m512i words = _mm512_loadu_si512(line);
        // (nibble & 0xF) | 0x4300 for each of the four nibbles: four registers of 32 bf16 numbers 128 + code
        const __m512i nibble0 = _mm512_ternarylogic_epi32(words, low_bits, magic, 0xEA);
        const __m512i nibble1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), low_bits, magic, 0xEA);
        const __m512i nibble2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), low_bits, magic, 0xEA);
        const __m512i nibble3 = _mm512_or_si512(_mm512_srli_epi16(words, 12), magic);
        const auto* scales = w.scale + (n0 + r) * groups + g;
        __m512 scale;
        if constexpr (PerLine == 1) {
          scale = _mm512_set1_ps(scalar_value(*scales));
        } else {
          scale = _mm512_permutexvar_ps(lane_group, sixteen_floats(scales, __mmask16((1u << PerLine) - 1)));
        }
        for (int m = 0; m < M; ++m) {
          const X* xm = x + m * K + k;
          __m512 line_sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)nibble0,
                                             (__m512bh)_mm512_loadu_si512(xm));
          line_sum = _mm512_dpbf16_ps(line_sum, (__m512bh)nibble1, (__m512bh)_mm512_loadu_si512(xm + 32));
          line_sum = _mm512_dpbf16_ps(line_sum, (__m512bh)nibble2, (__m512bh)_mm512_loadu_si512(xm + 64));
          line_sum = _mm512_dpbf16_ps(line_sum, (__m512bh)nibble3, (__m512bh)_mm512_loadu_si512(xm + 96));
          acc[m][r] = _mm512_fmadd_ps(line_sum, scale, acc[m][r]);
        }
      }
    }
    return k;
  }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    const int64_t groups = K / w.group;
    __m512 acc[M][R];
    float constant[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps(), constant[m][r] = 0.0f;
    // The whole lines first, a loop for each number of groups a line holds (its scales are read differently).
    const int64_t k = w.group == 128 ? lines<M, R, 1>(x, w, K, N, n0, k0, k1, acc)
                      : w.group == 64 ? lines<M, R, 2>(x, w, K, N, n0, k0, k1, acc)
                                      : lines<M, R, 4>(x, w, K, N, n0, k0, k1, acc);
    const __m512i low_bits = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
    // The rest of K past its last whole line (x in order there): 32 codes a step, a group at a time.
    const __m512i shifts = _mm512_set_epi16(4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t g0 = k; g0 < k1; g0 += w.group) {
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_set1_ps(scalar_value(w.scale[(n0 + r) * groups + g0 / w.group]));
        for (int64_t j = g0; j < g0 + w.group; j += 32) {
          const __m128i sixteen = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + ((n0 + r) * K + j) / 2));
          __m512i codes = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(sixteen));  // [b0..b15, b0..b15]
          codes = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(codes, shifts), low_bits, magic, 0xEA);
          for (int m = 0; m < M; ++m) {
            const __m512 products = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)codes,
                                                     (__m512bh)_mm512_loadu_si512(x + m * K + j));
            acc[m][r] = _mm512_fmadd_ps(products, scale, acc[m][r]);
          }
        }
      }
    }
    // The constant terms of the chunk's groups, after the codes rather than between them.
    add_int4_constants_avx512(w, groups, n0, k0, k1, 136.0f, constant);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += _mm512_reduce_add_ps(acc[m][r]) + constant[m][r];
  }
};

// ---- AVX2 + FMA ---------------------------------------------------------------------------------------------------

// The AVX2 bf16, fp32 and int8 variants take x in chunks of kL2XBytes, not kL1Bytes: their blocks keep x in registers
// or reload it once per weight row, which L2 serves well, and a pass then streams whole weight rows rather than
// pieces of rows that the prefetchers start again at every chunk. On a Zen 3 EPYC (AVX2, no AVX-512), the 3B model
// decoding at batch 8 (compiled steps, 5 alternating cycles): bf16 17.9 -> 20.6 tokens/s, faster in 5 of 5; int8
// 16.1 -> 18.1, faster in 4 of 5. bf16 at batch 1 was unchanged (1.00x, 3 of 6). The decoder's 127 products alone in
// a C++ loop (two threads, 2 MB pages, medians of 6 rounds): bf16 at 8 rows 381 -> 312 ms, int8 365 -> 341 ms.
// int4 keeps L1's chunks: at three rows or more its block is one weight row, which reads every row of x for each 32
// codes (8 rows: 427 -> 508 ms with 128 KB), and at one row the 3B model was no faster (0.97x, 2 of 6).

PG_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 lanes -> 4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                             // 4 -> 2
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                              // 2 -> 1
  return _mm_cvtss_f32(s);
}

// Eight bf16 numbers -> eight fp32 ones: zero-extend each to 32 bits and shift it into the top half.
PG_AVX2 inline __m256 widen_bf16(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// Eight scales or zeros (bf16 bits or fp32) as fp32.
PG_AVX2 inline __m256 eight_floats(const uint16_t* p) { return widen_bf16(p); }
PG_AVX2 inline __m256 eight_floats(const float* p) { return _mm256_loadu_ps(p); }

// `add_int4_constants` eight groups a register. A group at a time, the scalar work of the constant terms cost about as
// much as the codes with groups of 32: one thread, weights in L2 (kernel_throughput), 1 row of x, groups of 32 11.8
// -> 15.7 billion weights a second and 128 18.5 -> 20.1; 4 rows 4.1 -> 6.7 and 7.3 -> 8.5 (AMD EPYC). (At 5 to 7
// rows, where a block is one weight row, groups of 128 went 6.0 -> 5.5 with either form of the constant terms: the
// codes' loop itself compiles differently.)
template <int M, int R, typename S>
PG_AVX2 inline void add_int4_constants_avx2(const Int4Weights<S>& w, int64_t groups, int64_t n0, int64_t k0,
                                            int64_t k1, float centre, float (&constant)[M][R]) {
  const int64_t first = k0 / w.group, last = k1 / w.group;
  for (int r = 0; r < R; ++r) {
    const int64_t row = (n0 + r) * groups;
    for (int m = 0; m < M; ++m) {
      __m256 sum = _mm256_setzero_ps();
      int64_t g = first;
      for (; g + 8 <= last; g += 8) {
        const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(centre), eight_floats(w.scale + row + g),
                                               eight_floats(w.zero + row + g));  // zero - centre * scale
        sum = _mm256_fmadd_ps(offset, _mm256_loadu_ps(w.group_sums + m * groups + g), sum);
      }
      float rest = hsum256(sum);
      for (; g < last; ++g) rest += int4_offset(w, n0 + r, groups, g, centre) * w.group_sums[m * groups + g];
      constant[m][r] += rest;
    }
  }
}

// Eight rows of x as two passes of four over the same weight rows, which the first pass leaves in the L1 cache. With
// AVX2's 16 registers, eight rows hold 8 accumulators for a single weight row and load x for every 8 multiply-adds;
// four rows take more weight rows a block (see rows_per_block) and load x less often. Single thread, weights in L2
// (kernel_throughput), 8 rows with two weight rows a block: bf16 3.8 -> 4.5 billion weights a second, int8 3.9 ->
// 4.1-4.2 (AMD EPYC); int4, whose four rows take one weight row a block too, gains nothing and keeps its single pass.
template <typename V, int R>
PG_AVX2 inline void halves_of_eight(const typename V::X* x, typename V::Weights w, float* y, int64_t K, int64_t N,
                                    int64_t n0, int64_t k0, int64_t k1) {
  V::template block<4, R>(x, w, y, K, N, n0, k0, k1);
  V::template block<4, R>(x + 4 * K, w, y + 4 * N, K, N, n0, k0, k1);
}

// Weights of type W (bf16 widened by shift, or fp32), x fp32; 8 lanes a register, 16 registers in all: for up to
// four rows of x the x vectors stay in registers, beyond that they are read again from L1 for each weight row.
template <typename WT>
struct Avx2 {
  using W = WT;
  using X = float;
  using Weights = const W*;
  // One row of x takes four weight rows a block, not eight: on a Zen 3 EPYC (AVX2, no AVX-512), one thread, weights
  // in L2 (kernel_throughput), bf16 at 1 row went 12.4 -> 19.5 billion weights a second with four, and 7.7 -> 12.4
  // with the prefetches once a cache line rather than once a step. Three or four rows of x (and eight, as two
  // passes of four) take three weight rows, with x read from L1 at four rows so that the 12 accumulators fit; five
  // to seven take two: on the same CPU, 8 rows 3.6 -> 4.4, 4 rows 7.9 -> 9.3, 5 rows 4.9 -> 6.3.
  template <int M>
  static constexpr int rows_per_block() { return M <= 2 ? 4 : M <= 4 || M == 8 ? 3 : 2; }
  template <int M>
  static constexpr int64_t x_chunk_bytes() { return kL2XBytes; }

  // acc[m][r] += W[n0 + r, k:k+8] * x[m, k:k+8] for every row of x and of the block.
  template <int M, int R>
  PG_AVX2 __attribute__((always_inline)) static void step(const X* x, const W* w, int64_t K, int64_t n0, int64_t k,
                                                          __m256 (&acc)[M][R]) {
    constexpr bool keep_x = M * R + M <= 14;  // x in registers where they fit beside the accumulators and w
    __m256 xv[keep_x ? M : 1];
    if constexpr (keep_x)
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const W* row = w + (n0 + r) * K + k;
      __m256 wv;
      if constexpr (sizeof(W) == 2) {
        wv = widen_bf16(row);
      } else {
        wv = _mm256_loadu_ps(row);
      }
      for (int m = 0; m < M; ++m) {
        __m256 xm;
        if constexpr (keep_x) {
          xm = xv[m];
        } else {
          xm = _mm256_loadu_ps(x + m * K + k);
        }
        acc[m][r] = _mm256_fmadd_ps(wv, xm, acc[m][r]);
      }
    }
  }

  template <int M, int R>
  PG_AVX2 static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                            int64_t k1) {
    if constexpr (M == 8) {  // as two passes of four rows of x (see halves_of_eight)
      halves_of_eight<Avx2<WT>, R>(x, w, y, K, N, n0, k0, k1);
      return;
    }
    const bool next_block = n0 + 2 * R <= N;
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    int64_t k = k0;
    constexpr int64_t line = 64 / sizeof(W);  // weights a cache line: each row's prefetches once a line, not a step
    for (; k + line <= k1; k += line) {
      for (int r = 0; r < R; ++r) {
        const W* row = w + (n0 + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
      }
      for (int64_t part = 0; part < line; part += 8) step<M, R>(x, w, K, n0, k + part, acc);
    }
    for (; k + 8 <= k1; k += 8) step<M, R>(x, w, K, n0, k, acc);
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float tail = 0.0f;
        for (int64_t i = k; i < k1; ++i) tail += weight_value(w + (n0 + r) * K, i) * x[m * K + i];
        y[m * N + n0 + r] += hsum256(acc[m][r]) + tail;
      }
    }
  }
};

using Avx2Bf16 = Avx2<uint16_t>;
using Avx2Fp32 = Avx2<float>;

// int8 weights, x fp32: 8 codes a register.
struct Avx2Int8 {
  using X = float;
  using Weights = Int8Weights;
  // Three weight rows for three, four and eight rows of x (Zen 3, as above: 8 rows 3.3 -> 3.7, 4 rows 7.2 -> 7.9);
  // two rows for five to seven were slower than one (5 rows 5.4 -> 4.9).
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 || M == 8 ? 3 : 1; }
  template <int M>
  static constexpr int64_t x_chunk_bytes() { return kL2XBytes; }

  template <int M, int R>
  PG_AVX2 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                            int64_t k1) {
    if constexpr (M == 8) {  // as two passes of four rows of x (see halves_of_eight)
      halves_of_eight<Avx2Int8, R>(x, w, y, K, N, n0, k0, k1);
      return;
    }
    const bool next_block = n0 + 2 * R <= N;
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {  // a cache line of codes per row: one prefetch each
      for (int r = 0; r < R; ++r) {
        const int8_t* row = w.codes + (n0 + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
        for (int part = 0; part < 8; ++part) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * part));
          const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
          for (int m = 0; m < M; ++m)
            acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * part), acc[m][r]);
        }
      }
    }
    for (; k + 8 <= k1; k += 8) {
      for (int r = 0; r < R; ++r) {
        const int8_t* row = w.codes + (n0 + r) * K + k;
        const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
        for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float tail = 0.0f;
        for (int64_t i = k; i < k1; ++i) tail += float(w.codes[(n0 + r) * K + i]) * x[m * K + i];
        y[m * N + n0 + r] += w.scale[n0 + r] * (hsum256(acc[m][r]) + tail);
      }
    }
  }
};

// int4 weights, x fp32: 16 bytes hold 32 codes; each 8 bytes widen to a register of low nibbles and one of high.
template <typename S>
struct Avx2Int4 {
  using X = float;
  using Weights = Int4Weights<S>;
  template <int M>
  static constexpr int rows_per_block() { return M <= 2 ? 4 : 1; }

  template <int M, int R>
  PG_AVX2 static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                            int64_t k1) {
    const int64_t groups = K / w.group;
    const bool next_block = n0 + 2 * R <= N;  // int4 rows are short (1 KB at K = 2048): fetch the next block's early
    const __m256i low_bits = _mm256_set1_epi32(0xF);
    __m256 acc[M][R];
    float constant[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps(), constant[m][r] = 0.0f;
    for (int64_t g0 = k0; g0 < k1; g0 += w.group) {
      const int64_t g = g0 / w.group;
      __m256 in_group[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) in_group[m][r] = _mm256_setzero_ps();
      for (int64_t k = g0; k < g0 + w.group; k += 32) {
        for (int r = 0; r < R; ++r) {
          const uint8_t* bytes = w.packed + ((n0 + r) * K + k) / 2;
          if ((k & 127) == 0) {  // once a cache line: further along this row, and the same place in the next block
            _mm_prefetch(reinterpret_cast<const char*>(bytes) + kAheadBytes, _MM_HINT_T0);
            if (next_block) _mm_prefetch(reinterpret_cast<const char*>(bytes + R * K / 2), _MM_HINT_T1);
          }
          // Two 8-byte loads, each widened as it loads (VPMOVZXBD from memory), rather than one 16-byte load whose
          // upper half is shifted down first: Zen 3 EPYC, one thread, weights in L2, groups of 128 at 1 row of x
          // 14.1 -> 18.0 billion weights a second, groups of 32 11.6 -> 13.6.
          const __m256i first = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
          const __m256i second = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
          const __m256 codes[4] = {
              _mm256_cvtepi32_ps(_mm256_and_si256(first, low_bits)),   // codes k .. k + 7
              _mm256_cvtepi32_ps(_mm256_and_si256(second, low_bits)),  // codes k + 8 .. k + 15
              _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4)),         // codes k + 16 .. k + 23
              _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4))};       // codes k + 24 .. k + 31
          for (int m = 0; m < M; ++m)
            for (int part = 0; part < 4; ++part)
              in_group[m][r] = _mm256_fmadd_ps(codes[part], _mm256_loadu_ps(x + m * K + k + 8 * part), in_group[m][r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_set1_ps(scalar_value(w.scale[(n0 + r) * groups + g]));
        for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(in_group[m][r], scale, acc[m][r]);
      }
    }
    add_int4_constants_avx2(w, groups, n0, k0, k1, 8.0f, constant);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += hsum256(acc[m][r]) + constant[m][r];
  }
};

#endif  // PG_X86

#if defined(PG_NEON)

// ---- NEON (ARM64) -------------------------------------------------------------------------------------------------

// Weights of type W (bf16 widened by a shift-left-long, or fp32), x fp32; 4 lanes a register, 32 registers.
template <typename WT>
struct Neon {
  using W = WT;
  using X = float;
  using Weights = const W*;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 6 : M <= 4 ? 4 : 2; }

  template <int M, int R>
  static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t k1) {
    float32x4_t acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_f32(0.0f);
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      float32x4_t xv[M];
      for (int m = 0; m < M; ++m) xv[m] = vld1q_f32(x + m * K + k);
      for (int r = 0; r < R; ++r) {
        const W* row = w + (n0 + r) * K + k;
        __builtin_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes);
        float32x4_t wv;
        if constexpr (sizeof(W) == 2) {
          wv = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(row), 16));  // bf16 -> fp32: the top 16 bits
        } else {
          wv = vld1q_f32(row);
        }
        for (int m = 0; m < M; ++m) acc[m][r] = vfmaq_f32(acc[m][r], wv, xv[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float tail = 0.0f;
        for (int64_t i = k; i < k1; ++i) tail += weight_value(w + (n0 + r) * K, i) * x[m * K + i];
        y[m * N + n0 + r] += vaddvq_f32(acc[m][r]) + tail;
      }
    }
  }
};

using NeonBf16 = Neon<uint16_t>;
using NeonFp32 = Neon<float>;

// int8 weights, x fp32: 8 codes a load, widened to two registers of four.
struct NeonInt8 {
  using X = float;
  using Weights = Int8Weights;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

  template <int M, int R>
  static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t k1) {
    float32x4_t acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_f32(0.0f);
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      for (int r = 0; r < R; ++r) {
        const int8_t* row = w.codes + (n0 + r) * K + k;
        __builtin_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes);
        const int16x8_t wide = vmovl_s8(vld1_s8(row));
        const float32x4_t low = vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
        const float32x4_t high = vcvtq_f32_s32(vmovl_s16(vget_high_s16(wide)));
        for (int m = 0; m < M; ++m) {
          acc[m][r] = vfmaq_f32(acc[m][r], low, vld1q_f32(x + m * K + k));
          acc[m][r] = vfmaq_f32(acc[m][r], high, vld1q_f32(x + m * K + k + 4));
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float tail = 0.0f;
        for (int64_t i = k; i < k1; ++i) tail += float(w.codes[(n0 + r) * K + i]) * x[m * K + i];
        y[m * N + n0 + r] += w.scale[n0 + r] * (vaddvq_f32(acc[m][r]) + tail);
      }
    }
  }
};

// int4 weights, x fp32: 16 bytes hold 32 codes, split into low and high halves and widened to eight registers.
template <typename S>
struct NeonInt4 {
  using X = float;
  using Weights = Int4Weights<S>;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 4 : M == 2 ? 2 : 1; }

  template <int M, int R>
  static void block(const X* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t k1) {
    const int64_t groups = K / w.group;
    const bool next_block = n0 + 2 * R <= N;  // int4 rows are short (1 KB at K = 2048): fetch the next block's early
    float32x4_t acc[M][R];
    float constant[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_f32(0.0f), constant[m][r] = 0.0f;
    for (int64_t g0 = k0; g0 < k1; g0 += w.group) {
      const int64_t g = g0 / w.group;
      float32x4_t in_group[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) in_group[m][r] = vdupq_n_f32(0.0f);
      for (int64_t k = g0; k < g0 + w.group; k += 32) {
        for (int r = 0; r < R; ++r) {
          const uint8_t* bytes = w.packed + ((n0 + r) * K + k) / 2;
          if ((k & 127) == 0) {
            __builtin_prefetch(reinterpret_cast<const char*>(bytes) + kAheadBytes);
            if (next_block) __builtin_prefetch(reinterpret_cast<const char*>(bytes + R * K / 2));
          }
          const uint8x16_t all = vld1q_u8(bytes);
          const uint8x16_t halves[2] = {vandq_u8(all, vdupq_n_u8(0xF)), vshrq_n_u8(all, 4)};  // k.., k + 16..
          for (int half = 0; half < 2; ++half) {
            const uint16x8_t first = vmovl_u8(vget_low_u8(halves[half]));
            const uint16x8_t second = vmovl_u8(vget_high_u8(halves[half]));
            const float32x4_t codes[4] = {vcvtq_f32_u32(vmovl_u16(vget_low_u16(first))),
                                          vcvtq_f32_u32(vmovl_u16(vget_high_u16(first))),
                                          vcvtq_f32_u32(vmovl_u16(vget_low_u16(second))),
                                          vcvtq_f32_u32(vmovl_u16(vget_high_u16(second)))};
            for (int m = 0; m < M; ++m)
              for (int part = 0; part < 4; ++part)
                in_group[m][r] = vfmaq_f32(in_group[m][r], codes[part], vld1q_f32(x + m * K + k + 16 * half + 4 * part));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const float scale = scalar_value(w.scale[(n0 + r) * groups + g]);
        for (int m = 0; m < M; ++m) acc[m][r] = vfmaq_n_f32(acc[m][r], in_group[m][r], scale);
      }
    }
    add_int4_constants(w, groups, n0, k0, k1, 8.0f, constant);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += vaddvq_f32(acc[m][r]) + constant[m][r];
  }
};

#endif  // PG_NEON

// The variants this build holds, by name, for the caller's choice and its error messages.
inline const char* built_variants() {
#if defined(PG_X86)
  return "avx512,avx2";
#elif defined(PG_NEON)
  return "neon";
#else
  return "";
#endif
}

}  // namespace pg
