// The streaming kernels without PyTorch: every variant this build holds and this CPU runs, against a float64
// reference, for 1 to 8 rows of x, tails of K and of N, bf16 and fp32 weights. tests/test_stream_kernels.py compiles
// it natively, and for ARM64 with a cross-compiler, running it under qemu where no ARM64 machine is at hand.
//
// Prints one line per variant and dtype with the worst error relative to sum |x w|, and exits with status 1 if any
// exceeds the bound (fp32 sums of exact products: a few fp32 roundings), 2 if no variant ran.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../paligemma/kernels/csrc/stream_kernels.h"

namespace {

uint16_t to_bf16(float value) {  // round to nearest even (no NaNs here)
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

struct Serial {  // the driver's parallel loop, on one thread
  template <typename Fn>
  void operator()(int64_t blocks, Fn fn) const { fn(0, blocks); }
};

struct Case {
  int64_t m, k, n;
};

// Runs variant V on random data of every case; returns the worst error relative to sum |x w| of an output.
template <typename V>
double worst_error(std::mt19937& random) {
  std::normal_distribution<float> normal;
  double worst = 0;
  for (int64_t m = 1; m <= 8; ++m) {
    for (const Case c : {Case{m, 64, 37}, Case{m, 100, 256}, Case{m, 1152, 19}, Case{m, 4130, 8}, Case{m, 13, 5}}) {
      std::vector<float> xf(c.m * c.k), wf(c.n * c.k);
      for (float& v : xf) v = normal(random);
      for (float& v : wf) v = normal(random);
      std::vector<typename V::X> x(xf.size());
      std::vector<typename V::W> w(wf.size());
      for (size_t i = 0; i < xf.size(); ++i) {
        if constexpr (sizeof(typename V::X) == 2) {
          x[i] = to_bf16(xf[i]);
          xf[i] = pg::bf16_to_float(x[i]);
        } else {
          x[i] = xf[i];
        }
      }
      for (size_t i = 0; i < wf.size(); ++i) {
        if constexpr (sizeof(typename V::W) == 2) {
          w[i] = to_bf16(wf[i]);
          wf[i] = pg::bf16_to_float(w[i]);
        } else {
          w[i] = wf[i];
        }
      }
      // The bf16 variants that multiply in fp32 take x widened to fp32 (as the extension does): xf is exact.
      std::vector<float> y(c.m * c.n, 0.0f);
      pg::run<V>(c.m, x.data(), w.data(), y.data(), c.k, c.n, Serial{});
      for (int64_t i = 0; i < c.m; ++i) {
        for (int64_t j = 0; j < c.n; ++j) {
          double exact = 0, magnitude = 0;
          for (int64_t t = 0; t < c.k; ++t) {
            exact += double(xf[i * c.k + t]) * wf[j * c.k + t];
            magnitude += std::abs(double(xf[i * c.k + t]) * wf[j * c.k + t]);
          }
          worst = std::max(worst, std::abs(y[i * c.n + j] - exact) / magnitude);
        }
      }
    }
  }
  return worst;
}

int report(const char* name, double error) {
  const double bound = 1e-5;  // fp32 sums: about K * 2^-24 in the worst case, far less in practice
  std::printf("%s: worst error %.3g of sum |x w| (bound %.0e)\n", name, error, bound);
  return error <= bound ? 0 : 1;
}

}  // namespace

int main() {
  std::mt19937 random(0);
  int failed = 0, ran = 0;
#if defined(PG_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    if (__builtin_cpu_supports("avx512bf16")) {
      failed |= report("avx512 bf16", worst_error<pg::Avx512Bf16>(random));
      ++ran;
    }
    failed |= report("avx512 fp32", worst_error<pg::Avx512Fp32>(random));
    ++ran;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    failed |= report("avx2 bf16", worst_error<pg::Avx2Bf16>(random));
    failed |= report("avx2 fp32", worst_error<pg::Avx2Fp32>(random));
    ran += 2;
  }
#endif
#if defined(PG_NEON)
  failed |= report("neon bf16", worst_error<pg::NeonBf16>(random));
  failed |= report("neon fp32", worst_error<pg::NeonFp32>(random));
  ran += 2;
#endif
  if (!ran) {
    std::printf("no variant of this build runs on this CPU\n");
    return 2;
  }
  return failed;
}
