// y = x W^T for a few rows of x: the matrix-vector products of decoding, on x86 CPUs with AVX-512.
//
// Decoding multiplies one token per sequence (a batch of at most 8 rows) by every weight matrix, so its speed is
// the speed at which the weights stream in from memory. This kernel reads each row of W exactly once, in the order
// it lies in memory, and multiplies it by all rows of x at the same time:
//
//   for each block of R weight rows (spread over the threads):
//     for each chunk of K (sized so the chunk of x stays in the L1 cache):
//       for k in steps of one 512-bit register:  acc[m][r] += W[r, k:k+v] * x[m, k:k+v]   (elementwise, fp32)
//     y[m, r] = sum of the lanes of acc[m][r]
//
// bf16 weights use VDPBF16PS, which multiplies pairs of bf16 numbers and adds them to fp32 lanes, so every product
// is exact and every sum is in fp32, as in PyTorch's own bf16 matrix products; fp32 weights use fused multiply-adds.
// The sums are fp32 (plus the bias, if any), rounded once to the model's dtype at the end.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kL1Bytes = 32 * 1024;  // the part of x that one pass over the weight rows keeps hot
constexpr int64_t kAheadBytes = 512;      // ask for each weight row this far ahead of where it is read (measured best)

// bf16: 32 values per register, VDPBF16PS.
template <int M, int R>
void block_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0,
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

// fp32: 16 values per register, fused multiply-add.
template <int M, int R>
void block_fp32(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t k1) {
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

// Rows [b0 * R, b1 * R) of W (the last block may be short), all of K in chunks that keep x in L1.
template <typename T, int M, int R, typename Block, typename Tail>
void rows(const T* x, const T* w, float* y, int64_t K, int64_t N, int64_t b0, int64_t b1, Block block, Tail tail) {
  const int64_t chunk = std::max<int64_t>(512, (kL1Bytes / (M * int64_t(sizeof(T)))) / 32 * 32);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      if (n0 + R <= N) {
        block(x, w, y, K, N, n0, k0, k1);
      } else {
        for (int64_t n = n0; n < N; ++n) tail(x, w, y, K, N, n, k0, k1);
      }
    }
  }
}

template <int M, int R, typename T>
void run(const T* x, const T* w, float* y, int64_t K, int64_t N) {
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t b0, int64_t b1) {
    if constexpr (std::is_same_v<T, uint16_t>) {
      rows<T, M, R>(x, w, y, K, N, b0, b1, block_bf16<M, R>, block_bf16<M, 1>);
    } else {
      rows<T, M, R>(x, w, y, K, N, b0, b1, block_fp32<M, R>, block_fp32<M, 1>);
    }
  });
}

// M rows of x: the column block R shrinks as M grows, so that M * R accumulators stay in registers.
template <typename T>
void run_rows(int64_t M, const T* x, const T* w, float* y, int64_t K, int64_t N) {
  switch (M) {
    case 1: run<1, 8>(x, w, y, K, N); break;
    case 2: run<2, 4>(x, w, y, K, N); break;
    case 3: run<3, 4>(x, w, y, K, N); break;
    case 4: run<4, 4>(x, w, y, K, N); break;
    case 5: run<5, 3>(x, w, y, K, N); break;
    case 6: run<6, 3>(x, w, y, K, N); break;
    case 7: run<7, 3>(x, w, y, K, N); break;
    default: run<8, 2>(x, w, y, K, N); break;
  }
}

// fp32 -> bf16, to nearest even, every NaN to 0xFFFF: bit for bit what PyTorch's vectorised conversion of a tensor
// gives (VCVTNEPS2BF16 would flush subnormals to zero instead).
void round_to_bf16(const float* in, uint16_t* out, int64_t count) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0xFFFF);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_loadu_ps(in + i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);  // ties go to the even neighbour
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, odd)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < count; ++i) out[i] = std::isnan(in[i]) ? 0xFFFF : c10::BFloat16(in[i]).x;
}

}  // namespace

// x [M, K] (M from 1 to 8), weight [N, K], both contiguous, both bf16 or both fp32, optional bias [N] -> y [M, N].
// The sums are fp32; the bias is added to them and the result rounded once to `dtype` (x's dtype when not given,
// or float32 to keep the sums), to nearest even as PyTorch rounds.
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes: x [M, K], weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have the same dtype");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "between 1 and 8 rows of x");
  const at::ScalarType out_dtype = dtype.value_or(x.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == x.scalar_type(), "the result is float32 or x's dtype");
  auto sums = at::zeros({M, N}, x.options().dtype(at::kFloat));
  float* yp = sums.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) {
    run_rows(M, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
             yp, K, N);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "bf16 or fp32");
    run_rows(M, x.data_ptr<float>(), weight.data_ptr<float>(), yp, K, N);
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias [N]");
    sums.add_(bias->to(at::kFloat).view({1, N}));  // added to the fp32 sums, as PyTorch's bf16 kernels do
  }
  if (out_dtype == at::kFloat) return sums;
  auto out = at::empty({M, N}, x.options());
  round_to_bf16(yp, reinterpret_cast<uint16_t*>(out.data_ptr()), M * N);
  return out;
}

// An operator of its own, torch.ops.paligemma.few_rows_linear, so that the profiler names it.
TORCH_LIBRARY(paligemma, m) {
  m.def("few_rows_linear(Tensor x, Tensor weight, Tensor? bias=None, ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(paligemma, CPU, m) {
  m.impl("few_rows_linear", &few_rows_linear);
}
