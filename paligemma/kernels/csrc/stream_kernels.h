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

constexpr int64_t kL1Bytes = 32 * 1024;  // the part of x that one pass over the weight rows keeps hot
constexpr int64_t kAheadBytes = 512;      // ask for each weight row this far ahead of where it is read (measured best)

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

// Rows [b0 * R, b1 * R) of W (the last block may be short), all of K in chunks that keep x in L1.
// `V::block<M, R>` does R rows over one chunk; the rows past the last whole block go one at a time.
template <typename V, int M, int R>
void drive(const typename V::X* x, const typename V::W* w, float* y, int64_t K, int64_t N, int64_t b0, int64_t b1) {
  const int64_t chunk = std::max<int64_t>(512, (kL1Bytes / (M * int64_t(sizeof(typename V::X)))) / 32 * 32);
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
void run_m(const typename V::X* x, const typename V::W* w, float* y, int64_t K, int64_t N, Par parallel) {
  constexpr int R = V::template rows_per_block<M>();
  parallel((N + R - 1) / R, [&](int64_t b0, int64_t b1) { drive<V, M, R>(x, w, y, K, N, b0, b1); });
}

template <typename V, typename Par>
void run(int64_t M, const typename V::X* x, const typename V::W* w, float* y, int64_t K, int64_t N, Par parallel) {
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

#if defined(PG_X86)

// ---- AVX-512 ------------------------------------------------------------------------------------------------------

// bf16 weights and bf16 x: 32 values a register, VDPBF16PS.
struct Avx512Bf16 {
  using W = uint16_t;
  using X = uint16_t;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M <= 4 ? 4 : M <= 7 ? 3 : 2; }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    const bool next_block = n0 + 2 * R <= N;
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 32) {
      const __mmask32 mask = k + 32 <= k1 ? ~__mmask32(0) : __mmask32((1ull << (k1 - k)) - 1);
      __m512i xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + R + r) * K + k), _MM_HINT_T1);
        const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + (n0 + r) * K + k);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv, (__m512bh)xv[m]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += _mm512_reduce_add_ps(acc[m][r]);
  }
};

// fp32 weights and x: 16 values a register, fused multiply-add.
struct Avx512Fp32 {
  using W = float;
  using X = float;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M <= 4 ? 4 : M <= 7 ? 3 : 2; }

  template <int M, int R>
  PG_AVX512 static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                              int64_t k1) {
    const bool next_block = n0 + 2 * R <= N;
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 16) {
      const __mmask16 mask = k + 16 <= k1 ? __mmask16(0xFFFF) : __mmask16((1u << (k1 - k)) - 1);
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + R + r) * K + k), _MM_HINT_T1);
        const __m512 wv = _mm512_maskz_loadu_ps(mask, w + (n0 + r) * K + k);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n0 + r] += _mm512_reduce_add_ps(acc[m][r]);
  }
};

// ---- AVX2 + FMA ---------------------------------------------------------------------------------------------------

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

// Weights of type W (bf16 widened by shift, or fp32), x fp32; 8 lanes a register, 16 registers in all: for up to
// four rows of x the x vectors stay in registers, beyond that they are read again from L1 for each weight row.
template <typename WT>
struct Avx2 {
  using W = WT;
  using X = float;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

  template <int M, int R>
  PG_AVX2 static void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
                            int64_t k1) {
    const bool next_block = n0 + 2 * R <= N;
    constexpr bool keep_x = M <= 4;
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      __m256 xv[keep_x ? M : 1];
      if constexpr (keep_x)
        for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) {
        const W* row = w + (n0 + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row) + kAheadBytes, _MM_HINT_T0);
        if (next_block) _mm_prefetch(reinterpret_cast<const char*>(row + R * K), _MM_HINT_T1);
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

#endif  // PG_X86

#if defined(PG_NEON)

// ---- NEON (ARM64) -------------------------------------------------------------------------------------------------

// Weights of type W (bf16 widened by a shift-left-long, or fp32), x fp32; 4 lanes a register, 32 registers.
template <typename WT>
struct Neon {
  using W = WT;
  using X = float;
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
