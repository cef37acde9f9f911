// How fast each streaming kernel multiplies when the memory is not what limits it: one thread, a weight matrix small
// enough to stay in that core's L2 cache (128 rows of 2048), x with 1 to 8 rows, each kernel called many times.
// Decoding streams its weights from memory, so this is not its speed; it is the ceiling its arithmetic sets, which
// decides whether a format is bound by the memory or by the multiplying (and on a shared machine, whose memory speed
// moves, it is far steadier). Built and run by `python -m paligemma.bench.kernel_throughput`.
//
// Output: one JSON object a line, {"variant", "format", "rows", "weights_per_s", "multiply_adds_per_s"}, the best of
// `samples` rounds (argument 1), each timing `calls` calls (argument 2) of every kernel and number of rows in turn.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "stream_kernels.h"

namespace {

struct Serial {
  template <typename Fn>
  void operator()(int64_t blocks, Fn fn) const {
    fn(0, blocks);
  }
};

constexpr int64_t K = 2048, N = 128;

int samples = 15, calls = 100;

// x [8, K] in the kernel's type, on a cache line as the extension's copies are.
template <typename X>
pg::AlignedVector<X> rows_of_x() {
  pg::AlignedVector<X> x(8 * K);
  std::mt19937 random(1);
  std::normal_distribution<float> normal;
  for (X& value : x) {
    const float v = normal(random);
    if constexpr (sizeof(X) == 2) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      value = uint16_t(bits >> 16);
    } else {
      value = v;
    }
  }
  return x;
}

// One kernel, format and number of rows, and the best time of one call seen so far.
struct Timed {
  const char* variant;
  const char* format;
  int rows;
  std::function<void()> call;
  double best = 1e30;
};

template <typename V>
void add_kernel(std::vector<Timed>& timed, const char* variant, const char* format, typename V::Weights w) {
  auto x = std::make_shared<pg::AlignedVector<typename V::X>>(rows_of_x<typename V::X>());
  auto y = std::make_shared<std::vector<float>>(8 * N);
  for (int rows = 1; rows <= 8; ++rows)
    timed.push_back({variant, format, rows, [=] { pg::run<V>(rows, x->data(), w, y->data(), K, N, Serial{}); }});
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) samples = std::atoi(argv[1]);
  if (argc > 2) calls = std::atoi(argv[2]);
  std::mt19937 random(0);
  std::vector<uint16_t> bf16(N * K);
  std::vector<float> fp32(N * K);
  std::vector<int8_t> codes(N * K);
  std::vector<uint8_t> packed(N * K / 2);
  for (int64_t i = 0; i < N * K; ++i) {
    fp32[i] = std::normal_distribution<float>(0.0f, 0.02f)(random);
    uint32_t bits;
    std::memcpy(&bits, &fp32[i], 4);
    bf16[i] = uint16_t(bits >> 16);
    codes[i] = int8_t(int(random() % 256) - 128);
  }
  for (uint8_t& byte : packed) byte = uint8_t(random());
  std::vector<float> row_scales(N, 0.01f);
  // int4 scales and zeros as bf16 bits (the model's dtype), and the group sums of x the extension would compute
  std::vector<uint16_t> scales(N * (K / 32), 0x3C23), zeros(N * (K / 32), 0x3C23);
  pg::AlignedVector<float> group_sums(8 * (K / 32), 1.0f);
  const pg::Int8Weights int8{codes.data(), row_scales.data()};
  std::vector<Timed> timed;
  const auto int4 = [&](int group) {
    return pg::Int4Weights<uint16_t>{packed.data(), scales.data(), zeros.data(), group_sums.data(), group};
  };
#if defined(PG_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    add_kernel<pg::Avx512Fp32>(timed, "avx512", "fp32", fp32.data());
    add_kernel<pg::Avx512Int8>(timed, "avx512", "int8 (fp32 x)", int8);
    if (__builtin_cpu_supports("avx512bf16")) {
      add_kernel<pg::Avx512Bf16>(timed, "avx512", "bf16", bf16.data());
      add_kernel<pg::Avx512Bf16Int8>(timed, "avx512", "int8 (bf16 x)", int8);
      add_kernel<pg::Avx512Bf16Int4<uint16_t>>(timed, "avx512", "int4-g128", int4(128));
      add_kernel<pg::Avx512Bf16Int4<uint16_t>>(timed, "avx512", "int4-g32", int4(32));
    }
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    add_kernel<pg::Avx2Bf16>(timed, "avx2", "bf16", bf16.data());
    add_kernel<pg::Avx2Int8>(timed, "avx2", "int8", int8);
    add_kernel<pg::Avx2Int4<uint16_t>>(timed, "avx2", "int4-g128", int4(128));
    add_kernel<pg::Avx2Int4<uint16_t>>(timed, "avx2", "int4-g32", int4(32));
  }
#endif
#if defined(PG_NEON)
  add_kernel<pg::NeonBf16>(timed, "neon", "bf16", bf16.data());
  add_kernel<pg::NeonInt8>(timed, "neon", "int8", int8);
  add_kernel<pg::NeonInt4<uint16_t>>(timed, "neon", "int4-g128", int4(128));
  add_kernel<pg::NeonInt4<uint16_t>>(timed, "neon", "int4-g32", int4(32));
#endif
  // Rounds: every kernel and number of rows once a round, so that a moment when the cores are busy with other work
  // slows one call of each rather than every call of one; each keeps its best.
  for (int round = 0; round < samples; ++round) {
    for (Timed& t : timed) {
      const auto start = std::chrono::steady_clock::now();
      for (int call = 0; call < calls; ++call) t.call();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      t.best = std::min(t.best, seconds / calls);
    }
  }
  for (const Timed& t : timed)
    std::printf("{\"variant\": \"%s\", \"format\": \"%s\", \"rows\": %d, \"weights_per_s\": %.4g, "
                "\"multiply_adds_per_s\": %.4g}\n",
                t.variant, t.format, t.rows, K * N / t.best, t.rows * K * N / t.best);
  return 0;
}
