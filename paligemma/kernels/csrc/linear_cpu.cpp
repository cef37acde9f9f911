// torch.ops.paligemma.few_rows_linear: the streaming kernels of stream_kernels.h as a PyTorch operator.
//
// One build holds every variant its architecture has (x86-64: AVX-512 and AVX2; ARM64: NEON); the caller names the
// variant, and the operator refuses one this CPU cannot run rather than stop on an illegal instruction. The weights
// are spread over PyTorch's threads by blocks of rows. The sums are fp32 (plus the bias, if any), rounded once to
// the model's dtype at the end, to nearest even as PyTorch rounds.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "stream_kernels.h"

namespace {

// Whether this CPU runs a variant (the build may hold variants the CPU lacks).
bool cpu_runs(const std::string& variant, bool bf16) {
#if defined(PG_X86)
  __builtin_cpu_init();
  if (variant == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && (!bf16 || __builtin_cpu_supports("avx512bf16"));
  if (variant == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return false;
#elif defined(PG_NEON)
  return variant == "neon";
#else
  return false;
#endif
}

// "auto" -> the best variant this CPU runs (for bf16 weights when `bf16`); any other name is returned as it is.
std::string resolve(const std::string& variant, bool bf16) {
  if (variant != "auto") return variant;
  for (const char* name : {"avx512", "avx2", "neon"})
    if (cpu_runs(name, bf16)) return name;
  TORCH_CHECK(false, "this CPU runs none of the streaming kernel's variants (it needs AVX2 and FMA, or ARM64)");
  return "";
}

// Runs fn(b0, b1) over ranges of `blocks` on PyTorch's threads.
struct Threads {
  template <typename Fn>
  void operator()(int64_t blocks, Fn fn) const {
    at::parallel_for(0, blocks, 8, fn);
  }
};

// bf16 [count] -> fp32 [count], exactly (the variants that multiply in fp32 widen x once per call).
pg::AlignedVector<float> widened(const uint16_t* x, int64_t count) {
  pg::AlignedVector<float> out(count);
  for (int64_t i = 0; i < count; ++i) out[i] = pg::bf16_to_float(x[i]);
  return out;
}

// fp32 -> bf16, to nearest even, every NaN to 0xFFFF: bit for bit what PyTorch's conversion of a tensor gives.
void round_to_bf16(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = std::isnan(in[i]) ? 0xFFFF : c10::BFloat16(in[i]).x;
}

void run_variant(const std::string& variant, int64_t M, const at::Tensor& x, const at::Tensor& weight, float* y,
                 int64_t K, int64_t N) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wb = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const float* wf = bf16 ? nullptr : weight.data_ptr<float>();
  const Threads threads;
#if defined(PG_X86)
  if (variant == "avx512") {
    if (bf16) return pg::run<pg::Avx512Bf16>(M, xb, wb, y, K, N, threads);
    return pg::run<pg::Avx512Fp32>(M, xf, wf, y, K, N, threads);
  }
  if (variant == "avx2") {
    if (bf16) {
      const pg::AlignedVector<float> x32 = widened(xb, M * K);
      return pg::run<pg::Avx2Bf16>(M, x32.data(), wb, y, K, N, threads);
    }
    return pg::run<pg::Avx2Fp32>(M, xf, wf, y, K, N, threads);
  }
#elif defined(PG_NEON)
  if (variant == "neon") {
    if (bf16) {
      const pg::AlignedVector<float> x32 = widened(xb, M * K);
      return pg::run<pg::NeonBf16>(M, x32.data(), wb, y, K, N, threads);
    }
    return pg::run<pg::NeonFp32>(M, xf, wf, y, K, N, threads);
  }
#endif
  TORCH_CHECK(false, "no kernel variant '", variant, "' in this build (it has: ", pg::built_variants(), ")");
}

// x [M, K] as fp32 (widened once when bf16), for the kernels that multiply in fp32.
struct Float32Rows {
  pg::AlignedVector<float> copy;
  const float* data;
  Float32Rows(const at::Tensor& x) {
    if (x.scalar_type() == at::kFloat) {
      data = x.data_ptr<float>();
    } else {
      copy = widened(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.numel());
      data = copy.data();
    }
  }
};

void check_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "x must be contiguous [M, K] with K = ", K);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bf16 or fp32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "between 1 and 8 rows of x");
}

// The fp32 sums plus the bias (added to the sums, as PyTorch's bf16 kernels do), as float32 or rounded once to x's
// dtype.
at::Tensor finish(at::Tensor sums, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                  std::optional<at::ScalarType> dtype) {
  const int64_t N = sums.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias [N]");
    sums.add_(bias->to(at::kFloat).view({1, N}));
  }
  const at::ScalarType out_dtype = dtype.value_or(x.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == x.scalar_type(), "the result is float32 or x's dtype");
  if (out_dtype == at::kFloat) return sums;
  auto out = at::empty_like(sums, x.options());
  if (out_dtype == at::kBFloat16) {
    round_to_bf16(sums.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), sums.numel());
  } else {
    out.copy_(sums);
  }
  return out;
}


}  // namespace

// x [M, K] (M from 1 to 8), weight [N, K], both contiguous, both bf16 or both fp32, optional bias [N] -> y [M, N],
// by the named variant. The result is float32 (`dtype` float32, to keep the sums) or x's dtype (the default).
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> dtype, const std::string& requested) {
  const std::string variant = resolve(requested, x.scalar_type() == at::kBFloat16);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes: x [M, K], weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have the same dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "between 1 and 8 rows of x");
  TORCH_CHECK(cpu_runs(variant, x.scalar_type() == at::kBFloat16), "this CPU cannot run the '", variant,
              "' kernel variant");
  auto sums = at::zeros({M, N}, x.options().dtype(at::kFloat));
  run_variant(variant, M, x, weight, sums.data_ptr<float>(), K, N);
  return finish(sums, x, bias, dtype);
}


// x [M, K] (bf16 or fp32), int8 codes [N, K] and float32 scales [N]: y = x (codes * scale)^T (+ bias), by the named
// variant; each code is widened in registers, never a whole weight in memory.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> dtype,
                       const std::string& requested) {
  const std::string variant = resolve(requested, false);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(), "codes: int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1);
  check_rows(x, K);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale: float32 [N]");
  TORCH_CHECK(cpu_runs(variant, false), "this CPU cannot run the '", variant, "' kernel variant");
  const int64_t M = x.size(0);
  auto sums = at::zeros({M, N}, x.options().dtype(at::kFloat));
  const pg::Int8Weights weights{codes.data_ptr<int8_t>(), scale.data_ptr<float>()};
  float* y = sums.data_ptr<float>();
  const Threads threads;
#if defined(PG_X86)
  // Four rows of bf16 x or more, on a CPU with AVX-512's bf16 instructions: VDPBF16PS, 32 products an instruction,
  // after each code's conversion to bf16, which fewer rows do not repay (single thread, 1024 x 2048 int8 on an AMD
  // EPYC with avx512_bf16: 29 -> 23 GMAC/s at 1 row, 55 -> 55 at 3, 55 -> 66 at 4, 41 -> 76 at 8).
  if (variant == "avx512" && M >= 4 && x.scalar_type() == at::kBFloat16 && cpu_runs("avx512", true)) {
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
    pg::run<pg::Avx512Bf16Int8>(M, xb, weights, y, K, N, threads);
  } else if (variant == "avx512") {
    pg::run<pg::Avx512Int8>(M, Float32Rows(x).data, weights, y, K, N, threads);
  } else if (variant == "avx2") {
    pg::run<pg::Avx2Int8>(M, Float32Rows(x).data, weights, y, K, N, threads);
  } else {
    TORCH_CHECK(false, "no kernel variant '", variant, "' in this build");
  }
#elif defined(PG_NEON)
  pg::run<pg::NeonInt8>(M, Float32Rows(x).data, weights, y, K, N, threads);
#endif
  return finish(sums, x, bias, dtype);
}

namespace {

// bf16 x on a CPU with AVX-512's bf16 instructions goes to the VDPBF16PS kernel; everything else multiplies in fp32.
template <typename S>
void run_int4(const std::string& variant, int64_t M, const at::Tensor& x_given, const float* x,
              const pg::Int4Weights<S>& weights, float* y, int64_t K, int64_t N) {
  const Threads threads;
#if defined(PG_X86)
  if (variant == "avx512" && x_given.scalar_type() == at::kBFloat16 && cpu_runs("avx512", true)) {
    const auto* xb = reinterpret_cast<const uint16_t*>(x_given.data_ptr());
    return pg::run<pg::Avx512Bf16Int4<S>>(M, xb, weights, y, K, N, threads);
  }
  if (variant == "avx512") return pg::run<pg::Avx512Int4<S>>(M, x, weights, y, K, N, threads);
  if (variant == "avx2") return pg::run<pg::Avx2Int4<S>>(M, x, weights, y, K, N, threads);
  TORCH_CHECK(false, "no kernel variant '", variant, "' in this build");
#elif defined(PG_NEON)
  pg::run<pg::NeonInt4<S>>(M, x, weights, y, K, N, threads);
#endif
}

}  // namespace

// x [M, K] (bf16 or fp32), int4 codes packed [N, K / 2] (see stream_kernels.h), scale and zero [N, K / G] in bf16 or
// fp32: y = x ((codes - 8) * scale + zero)^T (+ bias), by the named variant.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group_size, const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> dtype, const std::string& requested) {
  const std::string variant = resolve(requested, false);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed codes: uint8 [N, K / 2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  check_rows(x, K);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group size 32, 64 or 128");
  TORCH_CHECK(K % group_size == 0, "K must be a multiple of the group size");
  const int64_t groups = K / group_size;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups && t->is_contiguous() &&
                (t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kFloat),
                "scale and zero: bf16 or fp32 [N, K / group_size]");
  TORCH_CHECK(scale.scalar_type() == zero.scalar_type(), "scale and zero must share a dtype");
  TORCH_CHECK(cpu_runs(variant, false), "this CPU cannot run the '", variant, "' kernel variant");
  const int64_t M = x.size(0);
  const Float32Rows rows(x);
  pg::AlignedVector<float> group_sums(M * groups, 0.0f);  // X [M, K / G]: each group's sum of x
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) group_sums[m * groups + k / group_size] += rows.data[m * K + k];
  auto sums = at::zeros({M, N}, x.options().dtype(at::kFloat));
  const auto* codes = packed.data_ptr<uint8_t>();
  if (scale.scalar_type() == at::kBFloat16) {
    const pg::Int4Weights<uint16_t> weights{codes, reinterpret_cast<const uint16_t*>(scale.data_ptr()),
                                            reinterpret_cast<const uint16_t*>(zero.data_ptr()), group_sums.data(),
                                            group_size};
    run_int4(variant, M, x, rows.data, weights, sums.data_ptr<float>(), K, N);
  } else {
    const pg::Int4Weights<float> weights{codes, scale.data_ptr<float>(), zero.data_ptr<float>(), group_sums.data(),
                                         group_size};
    run_int4(variant, M, x, rows.data, weights, sums.data_ptr<float>(), K, N);
  }
  return finish(sums, x, bias, dtype);
}

// Which variants this CPU runs, best first, from those the build holds: "avx512,avx2" on Zen 4, "avx2" on Zen 3.
std::string cpu_variants(bool bf16) {
  std::string out;
  for (const char* name : {"avx512", "avx2", "neon"}) {
    if (cpu_runs(name, bf16)) out += (out.empty() ? "" : ",") + std::string(name);
  }
  return out;
}

// An operator of its own, torch.ops.paligemma.few_rows_linear, so that the profiler names it.
TORCH_LIBRARY(paligemma, m) {
  m.def("few_rows_linear(Tensor x, Tensor weight, Tensor? bias=None, ScalarType? dtype=None, str variant='auto')"
        " -> Tensor");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? bias=None, ScalarType? dtype=None,"
        " str variant='auto') -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size, Tensor? bias=None,"
        " ScalarType? dtype=None, str variant='auto') -> Tensor");
  m.def("cpu_variants(bool bf16) -> str", &cpu_variants);
}

TORCH_LIBRARY_IMPL(paligemma, CPU, m) {
  m.impl("few_rows_linear", &few_rows_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
