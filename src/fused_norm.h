// GroupNorm followed by SiLU in one kernel for fp32 tensors on the CPU.
//
// Why: in the KL VAE (SD, SDXL, SD3, Flux) every 3x3 conv but the first is fed
// by GroupNorm -> SiLU. LibTorch 2.11 runs them as two kernels, and its CPU
// SiLU is slow (about 5 ns an element on an AVX-512 EPYC, five times its own
// exp: docs/performance.md section 0); with the convs at the machine's FMA
// peak, those two are most of what is left to win. Here the group statistics
// and the normalise + SiLU pass touch each group while it is in cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace gstvae {

// Which code runs: the best the CPU has, or the portable scalar loops (the
// tests compare the two).
enum class FusedKernel { Best, Scalar };

// silu(group_norm(x, groups, weight, bias, eps)) when `silu`, else group_norm
// alone, for x of shape [N, C, *spatial]. Runs the fused kernel for a float32
// CPU tensor that is contiguous or channels-last; anything else goes through
// at::group_norm (+ at::silu_), so it is always correct. The result keeps x's
// memory format.
at::Tensor group_norm_act(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                          double eps, bool silu, FusedKernel kernel = FusedKernel::Best);

// True when `x` would take the fused path (tests; bench notes).
bool group_norm_act_is_fused(const at::Tensor& x);

// True when this CPU runs the vector (AVX2 + FMA) path under FusedKernel::Best.
bool fused_norm_has_vector_path();

}  // namespace gstvae
