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
// The result is fp32; the caller rounds it to the model's dtype.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
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
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 32) {
    const __mmask32 mask = k + 32 <= k1 ? ~__mmask32(0) : __mmask32((1ull << (k1 - k)) - 1);
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k) + kAheadBytes, _MM_HINT_T0);
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
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 mask = k + 16 <= k1 ? __mmask16(0xFFFF) : __mmask16((1u << (k1 - k)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k) + kAheadBytes, _MM_HINT_T0);
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

}  // namespace

// x [M, K] (M from 1 to 8), weight [N, K], both contiguous, both bf16 or both fp32 -> y [M, N] in fp32.
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes: x [M, K], weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have the same dtype");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "between 1 and 8 rows of x");
  auto y = at::zeros({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) {
    run_rows(M, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
             yp, K, N);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "bf16 or fp32");
    run_rows(M, x.data_ptr<float>(), weight.data_ptr<float>(), yp, K, N);
  }
  return y;
}

// An operator of its own, torch.ops.paligemma.few_rows_linear, so that the profiler names it.
TORCH_LIBRARY(paligemma, m) {
  m.def("few_rows_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(paligemma, CPU, m) {
  m.impl("few_rows_linear", &few_rows_linear);
}
