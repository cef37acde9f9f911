// The streaming kernels without PyTorch: every variant this build holds and this CPU runs, against a float64
// reference, for 1 to 8 rows of x, tails of K and of N, bf16, fp32, int8 and int4 weights (int4 in groups of 32,
// 64 and 128, with bf16 or fp32 scales and zeros). tests/test_stream_kernels.py compiles
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
    for (const Case c : {Case{m, 64, 37}, Case{m, 100, 256}, Case{m, 1152, 19}, Case{m, 4130, 8}, Case{m, 13, 5},
                         Case{m, 33000, 3}}) {
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

// Normal draws into x, given to the kernel as x_given in its own type: bf16 x is rounded, and the reference (x) takes
// the rounded values.
template <typename XT>
void draw_x(std::mt19937& random, std::vector<float>& x, std::vector<XT>& x_given) {
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = normal(random);
    if constexpr (sizeof(XT) == 2) {
      x_given[i] = to_bf16(x[i]);
      x[i] = pg::bf16_to_float(x_given[i]);
    } else {
      x_given[i] = x[i];
    }
  }
}

// Random int8 codes and scales: y = scale[n] * sum_k codes[n, k] x[m, k], against float64.
template <typename V>
double worst_error_int8(std::mt19937& random) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(-128, 127);
  double worst = 0;
  for (int64_t m = 1; m <= 8; ++m) {
    for (const Case c : {Case{m, 64, 37}, Case{m, 100, 256}, Case{m, 1152, 19}, Case{m, 4130, 8}, Case{m, 13, 5},
                         Case{m, 33000, 3}}) {
      std::vector<float> x(c.m * c.k), scale(c.n);
      std::vector<typename V::X> x_given(c.m * c.k);
      std::vector<int8_t> codes(c.n * c.k);
      draw_x(random, x, x_given);
      for (float& v : scale) v = std::abs(normal(random)) * 0.01f;
      for (int8_t& v : codes) v = int8_t(code(random));
      codes[0] = -128;  // the extremes, exact in bf16 too
      codes[1] = 127;
      std::vector<float> y(c.m * c.n, 0.0f);
      pg::run<V>(c.m, x_given.data(), pg::Int8Weights{codes.data(), scale.data()}, y.data(), c.k, c.n, Serial{});
      for (int64_t i = 0; i < c.m; ++i) {
        for (int64_t j = 0; j < c.n; ++j) {
          double exact = 0, magnitude = 0;
          for (int64_t t = 0; t < c.k; ++t) {
            const double term = double(codes[j * c.k + t]) * scale[j] * x[i * c.k + t];
            exact += term;
            magnitude += std::abs(term);
          }
          worst = std::max(worst, std::abs(y[i * c.n + j] - exact) / magnitude);
        }
      }
    }
  }
  return worst;
}

// Random int4 codes, packed as the library packs them, with a scale and a zero per group (as bf16 bits when S is
// uint16_t): y = sum_k ((codes - 8) scale + zero) x, against float64; groups of 32, 64 and 128.
template <typename V, typename S>
double worst_error_int4(std::mt19937& random) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(0, 15);
  double worst = 0;
  for (int64_t group : {32, 64, 128}) {
    for (int64_t m = 1; m <= 8; ++m) {
      // K past a whole line of 128 (2240 = 17 lines and 64 more), and K over several chunks of x: 4224 for the
      // chunks of L1's size, 33024 for those of kL2XBytes (two at one row of x, nine at eight).
      for (const Case c : {Case{m, 128, 37}, Case{m, 384, 9}, Case{m, 1152, 19}, Case{m, 2048, 3}, Case{m, 2240, 5},
                           Case{m, 4224, 3}, Case{m, 33024, 3}}) {
        if (c.k % group != 0) continue;
        const int64_t groups = c.k / group;
        std::vector<float> x(c.m * c.k), scale(c.n * groups), zero(c.n * groups), sums(c.m * groups, 0.0f);
        std::vector<typename V::X> x_given(c.m * c.k);
        std::vector<S> scale_s(scale.size()), zero_s(zero.size());
        draw_x(random, x, x_given);
        for (size_t i = 0; i < scale.size(); ++i) {
          scale[i] = std::abs(normal(random)) * 0.01f;
          zero[i] = normal(random) * 0.01f;
          if constexpr (sizeof(S) == 2) {
            scale_s[i] = to_bf16(scale[i]);
            zero_s[i] = to_bf16(zero[i]);
            scale[i] = pg::bf16_to_float(scale_s[i]);
            zero[i] = pg::bf16_to_float(zero_s[i]);
          } else {
            scale_s[i] = scale[i];
            zero_s[i] = zero[i];
          }
        }
        std::vector<uint8_t> codes(c.n * c.k), packed(c.n * c.k / 2);
        for (uint8_t& v : codes) v = uint8_t(code(random));
        for (int64_t j = 0; j < c.n; ++j)
          for (int64_t run = 0; run < c.k / 32; ++run)
            for (int64_t b = 0; b < 16; ++b)
              packed[(j * c.k + run * 32) / 2 + b] =
                  uint8_t(codes[j * c.k + run * 32 + b] | (codes[j * c.k + run * 32 + b + 16] << 4));
        for (int64_t i = 0; i < c.m; ++i)
          for (int64_t t = 0; t < c.k; ++t) sums[i * groups + t / group] += x[i * c.k + t];
        std::vector<float> y(c.m * c.n, 0.0f);
        const pg::Int4Weights<S> weights{packed.data(), scale_s.data(), zero_s.data(), sums.data(), group};
        pg::run<V>(c.m, x_given.data(), weights, y.data(), c.k, c.n, Serial{});
        for (int64_t i = 0; i < c.m; ++i) {
          for (int64_t j = 0; j < c.n; ++j) {
            double exact = 0, magnitude = 0;
            for (int64_t t = 0; t < c.k; ++t) {
              const int64_t g = j * groups + t / group;
              const double term = ((double(codes[j * c.k + t]) - 8) * scale[g] + zero[g]) * x[i * c.k + t];
              exact += term;
              magnitude += std::abs(term);
            }
            worst = std::max(worst, std::abs(y[i * c.n + j] - exact) / magnitude);
          }
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
    failed |= report("avx512 int8", worst_error_int8<pg::Avx512Int8>(random));
    failed |= report("avx512 int4", worst_error_int4<pg::Avx512Int4<uint16_t>, uint16_t>(random));
    failed |= report("avx512 int4 fp32 scales", worst_error_int4<pg::Avx512Int4<float>, float>(random));
    ran += 4;
    if (__builtin_cpu_supports("avx512bf16")) {
      failed |= report("avx512 int4 bf16 x", worst_error_int4<pg::Avx512Bf16Int4<uint16_t>, uint16_t>(random));
      failed |= report("avx512 int8 bf16 x", worst_error_int8<pg::Avx512Bf16Int8>(random));
      ran += 2;
    }
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    failed |= report("avx2 bf16", worst_error<pg::Avx2Bf16>(random));
    failed |= report("avx2 fp32", worst_error<pg::Avx2Fp32>(random));
    failed |= report("avx2 int8", worst_error_int8<pg::Avx2Int8>(random));
    failed |= report("avx2 int4", worst_error_int4<pg::Avx2Int4<uint16_t>, uint16_t>(random));
    failed |= report("avx2 int4 fp32 scales", worst_error_int4<pg::Avx2Int4<float>, float>(random));
    ran += 5;
  }
#endif
#if defined(PG_NEON)
  failed |= report("neon bf16", worst_error<pg::NeonBf16>(random));
  failed |= report("neon fp32", worst_error<pg::NeonFp32>(random));
  failed |= report("neon int8", worst_error_int8<pg::NeonInt8>(random));
  failed |= report("neon int4", worst_error_int4<pg::NeonInt4<uint16_t>, uint16_t>(random));
  failed |= report("neon int4 fp32 scales", worst_error_int4<pg::NeonInt4<float>, float>(random));
  ran += 5;
#endif
  if (!ran) {
    std::printf("no variant of this build runs on this CPU\n");
    return 2;
  }
  return failed;
}
