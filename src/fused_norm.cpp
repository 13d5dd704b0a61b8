#include "fused_norm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define GSTVAE_FUSED_X86 1
#define GSTVAE_AVX2 __attribute__((target("avx2,fma")))
#else
#define GSTVAE_FUSED_X86 0
#endif

namespace gstvae {

namespace {

// Statistics are summed in double; the vector paths first add a short run in
// float lanes (kFloatRun elements per lane at most) so that the float error
// stays near one ulp of the run's sum.
constexpr int64_t kFloatRun = 64;

inline float silu_scalar(float y) { return y / (1.0f + std::exp(-y)); }

// ---- portable loops ----

// Sums of deviations from a center near the data (the group's first value for
// the mean, then the mean for the variance) keep the float runs small where a
// group sits far from zero.
double sum_dev_scalar(const float* x, int64_t n, float center) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] - center;
  return s;
}

double sum_sq_dev_scalar(const float* x, int64_t n, double mean) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - mean;
    s += d * d;
  }
  return s;
}

// The normalisation as ((x - mean_hi) - mean_lo) * scale + bias: mean_hi is
// the mean rounded to float, mean_lo the rest, so that x - mean_hi is exact
// (Sterbenz) for a group far from zero, where x * scale + (bias - mean * scale)
// would lose the deviation's low bits.
struct Affine {
  float mean_hi, mean_lo, scale, bias;
};

Affine make_affine(double mean, double scale, double bias) {
  const float hi = static_cast<float>(mean);
  return {hi, static_cast<float>(mean - hi), static_cast<float>(scale), static_cast<float>(bias)};
}

void affine_act_scalar(const float* x, float* y, int64_t n, Affine a, bool silu) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ((x[i] - a.mean_hi) - a.mean_lo) * a.scale + a.bias;
    y[i] = silu ? silu_scalar(v) : v;
  }
}

// Channels-last rows: `pixels` rows of `c` channels. Adds each channel's sum
// of deviations from center[ch] (squared when `square`) to acc.
void channel_sums_scalar(const float* x, int64_t pixels, int64_t c, const float* center, bool square, double* acc) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* row = x + p * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const double d = static_cast<double>(row[ch]) - center[ch];
      acc[ch] += square ? d * d : d;
    }
  }
}

// Per-channel Affine fields, one array each (the vector loop loads 8 at a time).
struct ChannelAffine {
  std::vector<float> mean_hi, mean_lo, scale, bias;
};

void affine_act_rows_scalar(const float* x, float* y, int64_t pixels, int64_t c, const ChannelAffine& a, bool silu) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* in = x + p * c;
    float* out = y + p * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const size_t i = static_cast<size_t>(ch);
      const float v = ((in[ch] - a.mean_hi[i]) - a.mean_lo[i]) * a.scale[i] + a.bias[i];
      out[ch] = silu ? silu_scalar(v) : v;
    }
  }
}

#if GSTVAE_FUSED_X86
// ---- AVX2 + FMA ----

// exp(x) for x in float range: x = n ln2 + r with |r| <= ln2/2 (ln2 split in a
// high part exact in float and a low part), exp(r) by its Taylor series to r^7
// (truncation below 1e-8 relative), 2^n built in the exponent bits. Inputs are
// clamped to [-87, 88], where 2^n stays a normal float.
GSTVAE_AVX2 inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

GSTVAE_AVX2 inline __m256 silu_avx2(__m256 y) {
  const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), y));
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

GSTVAE_AVX2 double lanes_to_double(__m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  double s = 0;
  for (float e : f) s += e;
  return s;
}

GSTVAE_AVX2 double sum_dev_avx2(const float* x, int64_t n, float center) {
  const __m256 m = _mm256_set1_ps(center);
  double s = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min(n - (n - i) % 8, i + 8 * kFloatRun);
    for (; i < end; i += 8) acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    s += lanes_to_double(acc);
  }
  return s + sum_dev_scalar(x + i, n - i, center);
}

GSTVAE_AVX2 double sum_sq_dev_avx2(const float* x, int64_t n, double mean) {
  // The deviations are formed in float: mean is within the data's range, so
  // x - mean is exact to one rounding, as in the scalar loop's double.
  const __m256 m = _mm256_set1_ps(static_cast<float>(mean));
  double s = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min(n - (n - i) % 8, i + 8 * kFloatRun);
    for (; i < end; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
      acc = _mm256_fmadd_ps(d, d, acc);
    }
    s += lanes_to_double(acc);
  }
  return s + sum_sq_dev_scalar(x + i, n - i, static_cast<float>(mean));
}

GSTVAE_AVX2 inline __m256 normalise_avx2(__m256 x, __m256 hi, __m256 lo, __m256 scale, __m256 bias) {
  return _mm256_fmadd_ps(_mm256_sub_ps(_mm256_sub_ps(x, hi), lo), scale, bias);
}

GSTVAE_AVX2 void affine_act_avx2(const float* x, float* y, int64_t n, Affine a, bool silu) {
  const __m256 hi = _mm256_set1_ps(a.mean_hi), lo = _mm256_set1_ps(a.mean_lo);
  const __m256 scale = _mm256_set1_ps(a.scale), bias = _mm256_set1_ps(a.bias);
  int64_t i = 0;
  if (silu) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, silu_avx2(normalise_avx2(_mm256_loadu_ps(x + i), hi, lo, scale, bias)));
  } else {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, normalise_avx2(_mm256_loadu_ps(x + i), hi, lo, scale, bias));
  }
  affine_act_scalar(x + i, y + i, n - i, a, silu);
}

// As channel_sums_scalar, for c a multiple of 8: float lanes per channel for
// kFloatRun rows, then into the double accumulators.
GSTVAE_AVX2 void channel_sums_avx2(const float* x, int64_t pixels, int64_t c, const float* center, bool square,
                                   double* acc) {
  std::vector<float> run(static_cast<size_t>(c));
  for (int64_t p0 = 0; p0 < pixels; p0 += kFloatRun) {
    const int64_t p1 = std::min(pixels, p0 + kFloatRun);
    std::fill(run.begin(), run.end(), 0.0f);
    for (int64_t ch = 0; ch < c; ch += 8) {
      __m256 s = _mm256_setzero_ps();
      const __m256 m = _mm256_loadu_ps(center + ch);
      for (int64_t p = p0; p < p1; ++p) {
        const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + p * c + ch), m);
        s = square ? _mm256_fmadd_ps(v, v, s) : _mm256_add_ps(s, v);
      }
      _mm256_storeu_ps(run.data() + ch, s);
    }
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += run[static_cast<size_t>(ch)];
  }
}

GSTVAE_AVX2 void affine_act_rows_avx2(const float* x, float* y, int64_t pixels, int64_t c, const ChannelAffine& a,
                                      bool silu) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* in = x + p * c;
    float* out = y + p * c;
    for (int64_t ch = 0; ch < c; ch += 8) {
      const __m256 v = normalise_avx2(_mm256_loadu_ps(in + ch), _mm256_loadu_ps(a.mean_hi.data() + ch),
                                      _mm256_loadu_ps(a.mean_lo.data() + ch), _mm256_loadu_ps(a.scale.data() + ch),
                                      _mm256_loadu_ps(a.bias.data() + ch));
      _mm256_storeu_ps(out + ch, silu ? silu_avx2(v) : v);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

struct Kernels {
  double (*sum_dev)(const float*, int64_t, float);
  double (*sum_sq_dev)(const float*, int64_t, double);
  void (*affine_act)(const float*, float*, int64_t, Affine, bool);
  void (*channel_sums)(const float*, int64_t, int64_t, const float*, bool, double*);
  void (*affine_act_rows)(const float*, float*, int64_t, int64_t, const ChannelAffine&, bool);
  bool rows_need_multiple_of_8;
};

Kernels pick_kernels(FusedKernel kernel, int64_t channels) {
#if GSTVAE_FUSED_X86
  if (kernel == FusedKernel::Best && cpu_has_avx2_fma()) {
    Kernels k{sum_dev_avx2, sum_sq_dev_avx2, affine_act_avx2, channel_sums_avx2, affine_act_rows_avx2, true};
    if (channels % 8 != 0) {
      k.channel_sums = channel_sums_scalar;
      k.affine_act_rows = affine_act_rows_scalar;
    }
    return k;
  }
#endif
  (void)channels;
  return {sum_dev_scalar, sum_sq_dev_scalar, affine_act_scalar, channel_sums_scalar, affine_act_rows_scalar, false};
}

// Per (sample, group): the group is one contiguous span of cg * hw floats.
void run_contiguous(const float* x, float* y, int64_t n, int64_t c, int64_t hw, int64_t groups, const float* w,
                    const float* b, double eps, bool silu, const Kernels& k) {
  const int64_t cg = c / groups;
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t g = ng % groups;
      const int64_t offset = ng * cg * hw;
      const int64_t count = cg * hw;
      const float first = x[offset];
      const double mean = first + k.sum_dev(x + offset, count, first) / static_cast<double>(count);
      const double var = k.sum_sq_dev(x + offset, count, mean) / static_cast<double>(count);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t ch = g * cg + j;
        const Affine a = make_affine(mean, (w ? w[ch] : 1.0) * rstd, b ? b[ch] : 0.0);
        k.affine_act(x + offset + j * hw, y + offset + j * hw, hw, a, silu);
      }
    }
  });
}

// Per sample, [hw, c] rows: per-channel sums over pixel chunks in parallel,
// reduced into group statistics, then one normalise + activation pass.
void run_channels_last(const float* x, float* y, int64_t n, int64_t c, int64_t hw, int64_t groups, const float* w,
                       const float* b, double eps, bool silu, const Kernels& k) {
  const int64_t cg = c / groups;
  constexpr int64_t kChunkPixels = 256;
  const int64_t chunks = (hw + kChunkPixels - 1) / kChunkPixels;
  std::vector<double> partial(static_cast<size_t>(chunks * c));
  std::vector<float> center(static_cast<size_t>(c));
  ChannelAffine affine;
  for (auto* v : {&affine.mean_hi, &affine.mean_lo, &affine.scale, &affine.bias}) v->resize(static_cast<size_t>(c));
  std::vector<double> mean(static_cast<size_t>(groups)), var(static_cast<size_t>(groups));
  const double count = static_cast<double>(cg * hw);

  auto group_totals = [&](std::vector<double>& out) {
    std::fill(out.begin(), out.end(), 0.0);
    for (int64_t i = 0; i < chunks; ++i)
      for (int64_t ch = 0; ch < c; ++ch) out[static_cast<size_t>(ch / cg)] += partial[static_cast<size_t>(i * c + ch)];
  };
  for (int64_t s = 0; s < n; ++s) {
    const float* xs = x + s * hw * c;
    float* ys = y + s * hw * c;
    // Pass 0: deviations from the first pixel's values; pass 1: squared
    // deviations from the group means.
    std::copy(xs, xs + c, center.begin());
    for (int pass = 0; pass < 2; ++pass) {
      std::fill(partial.begin(), partial.end(), 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t p0 = i * kChunkPixels, p1 = std::min(hw, p0 + kChunkPixels);
          k.channel_sums(xs + p0 * c, p1 - p0, c, center.data(), pass == 1, partial.data() + i * c);
        }
      });
      group_totals(pass == 0 ? mean : var);
      for (int64_t g = 0; g < groups; ++g) {
        const size_t gi = static_cast<size_t>(g);
        if (pass == 0) {
          for (int64_t j = 0; j < cg; ++j) mean[gi] += static_cast<double>(center[static_cast<size_t>(g * cg + j)]) * hw;
          mean[gi] /= count;
        } else {
          var[gi] /= count;
        }
      }
      if (pass == 0)
        for (int64_t ch = 0; ch < c; ++ch) center[static_cast<size_t>(ch)] = static_cast<float>(mean[ch / cg]);
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      const size_t g = static_cast<size_t>(ch / cg);
      const double rstd = 1.0 / std::sqrt(var[g] + eps);
      const Affine a = make_affine(mean[g], (w ? w[ch] : 1.0) * rstd, b ? b[ch] : 0.0);
      const size_t i = static_cast<size_t>(ch);
      affine.mean_hi[i] = a.mean_hi;
      affine.mean_lo[i] = a.mean_lo;
      affine.scale[i] = a.scale;
      affine.bias[i] = a.bias;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p0 = i * kChunkPixels, p1 = std::min(hw, p0 + kChunkPixels);
        k.affine_act_rows(xs + p0 * c, ys + p0 * c, p1 - p0, c, affine, silu);
      }
    });
  }
}

bool is_channels_last(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

bool affine_ok(const at::Tensor& t, int64_t c) {
  return !t.defined() || (t.is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == c &&
                          t.is_contiguous());
}

}  // namespace

bool fused_norm_has_vector_path() { return cpu_has_avx2_fma(); }

bool group_norm_act_is_fused(const at::Tensor& x) {
  return x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 3 && x.numel() > 0 &&
         (x.is_contiguous() || is_channels_last(x));
}

at::Tensor group_norm_act(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                          double eps, bool silu, FusedKernel kernel) {
  const int64_t c = x.dim() >= 2 ? x.size(1) : 0;
  if (!group_norm_act_is_fused(x) || groups <= 0 || c % groups != 0 || !affine_ok(weight, c) ||
      !affine_ok(bias, c)) {
    // at::group_norm checks and names what is wrong with the arguments.
    at::Tensor y = at::group_norm(x, groups, weight, bias, eps);
    return silu ? at::silu_(y) : y;
  }
  const int64_t n = x.size(0), hw = x.numel() / (n * c);
  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const Kernels k = pick_kernels(kernel, c);
  if (x.is_contiguous()) {
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    run_contiguous(x.data_ptr<float>(), y.data_ptr<float>(), n, c, hw, groups, w, b, eps, silu, k);
    return y;
  }
  at::Tensor y = at::empty_like(x, x.suggest_memory_format());
  run_channels_last(x.data_ptr<float>(), y.data_ptr<float>(), n, c, hw, groups, w, b, eps, silu, k);
  return y;
}

}  // namespace gstvae
