// The fused GroupNorm + SiLU kernel (src/fused_norm.h) against LibTorch's
// group_norm and silu, in both memory formats, on both code paths.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <tuple>

#include "fused_norm.h"

namespace gstvae {
namespace {

at::Tensor reference(const at::Tensor& x, int64_t groups, const at::Tensor& w, const at::Tensor& b, bool silu) {
  at::Tensor y = at::group_norm(x.to(at::kDouble), groups, w.defined() ? w.to(at::kDouble) : w,
                                b.defined() ? b.to(at::kDouble) : b, 1e-6);
  return silu ? at::silu(y) : y;
}

double max_error_relative_to_max(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>() / want.abs().max().item<double>();
}

struct Case {
  std::vector<int64_t> shape;
  int64_t groups;
  bool channels_last;
  bool silu;
  double offset;  // added to x: a group mean far from 0 tests the variance pass
};

class FusedNorm : public ::testing::TestWithParam<std::tuple<Case, FusedKernel>> {};

TEST_P(FusedNorm, MatchesGroupNormThenSilu) {
  const auto& [c, kernel] = GetParam();
  at::manual_seed(7);
  at::Tensor x = at::randn(c.shape) * 3 + c.offset;
  if (c.channels_last) x = x.contiguous(c.shape.size() == 4 ? at::MemoryFormat::ChannelsLast
                                                             : at::MemoryFormat::ChannelsLast3d);
  const int64_t ch = c.shape[1];
  at::Tensor w = at::randn({ch}) * 0.5 + 1, b = at::randn({ch}) * 0.5;
  ASSERT_TRUE(group_norm_act_is_fused(x));
  at::Tensor y = group_norm_act(x, c.groups, w, b, 1e-6, c.silu, kernel);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_EQ(y.is_contiguous(), x.is_contiguous());
  EXPECT_LT(max_error_relative_to_max(y, reference(x, c.groups, w, b, c.silu)), 2e-6);
}

const Case kCases[] = {
    {{1, 64, 16, 16}, 32, false, true, 0},    {{2, 128, 9, 7}, 32, false, true, 0},
    {{1, 64, 16, 16}, 32, true, true, 0},     {{2, 96, 9, 7}, 32, true, true, 0},
    {{1, 64, 33, 5}, 32, false, false, 0},    {{1, 64, 33, 5}, 32, true, false, 0},
    {{1, 32, 8, 8}, 32, false, true, 200},    {{1, 32, 8, 8}, 32, true, true, -200},
    {{2, 40, 3, 5, 7}, 8, false, true, 0},    {{1, 40, 3, 5, 7}, 8, true, true, 0},  // 5-D; c = 40: a 5-wide group
    {{1, 36, 5, 5}, 4, true, true, 0},        // channels not a multiple of 8: scalar rows
    {{1, 64, 300, 3}, 32, true, true, 1},     // more than one 256-pixel chunk
};

INSTANTIATE_TEST_SUITE_P(Shapes, FusedNorm,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(FusedKernel::Best, FusedKernel::Scalar)));

// SiLU at the ends of the float range: no inf or NaN from exp's clamps.
TEST(FusedNormEdges, SiluOfLargeValues) {
  at::Tensor x = at::zeros({1, 8, 4, 4});
  x.select(1, 0).fill_(1e4);
  x.select(1, 1).fill_(-1e4);
  x.select(1, 2).copy_(at::linspace(-120, 120, 16).reshape({4, 4}));
  at::Tensor w = at::full({8}, 50.0), b = at::zeros({8});
  for (FusedKernel kernel : {FusedKernel::Best, FusedKernel::Scalar}) {
    at::Tensor y = group_norm_act(x, 8, w, b, 1e-6, true, kernel);
    EXPECT_TRUE(at::isfinite(y).all().item<bool>());
    EXPECT_LT(max_error_relative_to_max(y, reference(x, 8, w, b, true)), 2e-6);
  }
}

TEST(FusedNormEdges, NoAffineAndFallbacks) {
  at::Tensor x = at::randn({2, 16, 5, 5});
  at::Tensor y = group_norm_act(x, 4, at::Tensor(), at::Tensor(), 1e-6, true);
  EXPECT_LT(max_error_relative_to_max(y, reference(x, 4, at::Tensor(), at::Tensor(), true)), 2e-6);
  // Not fused, still right: a strided view and a double tensor.
  at::Tensor strided = at::randn({1, 16, 10, 10}).narrow(3, 0, 5);
  EXPECT_FALSE(group_norm_act_is_fused(strided));
  EXPECT_LT(max_error_relative_to_max(group_norm_act(strided, 4, at::Tensor(), at::Tensor(), 1e-6, true),
                                      reference(strided, 4, at::Tensor(), at::Tensor(), true)),
            2e-6);
  EXPECT_FALSE(group_norm_act_is_fused(x.to(at::kDouble)));
  // Bad arguments are at::group_norm's to refuse, with its message.
  EXPECT_THROW(group_norm_act(x, 5, at::Tensor(), at::Tensor(), 1e-6, true), c10::Error);
}

}  // namespace
}  // namespace gstvae
