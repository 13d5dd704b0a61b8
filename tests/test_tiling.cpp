// The memory fallbacks of the engine (tiling.h): sub-batch halving on
// out-of-memory, tile planning, feathered blending. The CUDA out-of-memory
// path cannot be provoked on a CPU machine, so the driver is tested with
// chunk functions that fail like LibTorch does.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <stdexcept>

#include "tiling.h"

namespace gstvae {
namespace {

std::runtime_error cuda_oom() {
  return std::runtime_error("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)");
}

TEST(OutOfMemory, RecognisesLibTorchMessages) {
  EXPECT_TRUE(is_out_of_memory(cuda_oom()));
  EXPECT_TRUE(is_out_of_memory(std::runtime_error("DefaultCPUAllocator: can't allocate memory: you tried")));
  EXPECT_TRUE(is_out_of_memory(std::bad_alloc()));
  EXPECT_FALSE(is_out_of_memory(std::runtime_error("shape mismatch")));
}

TEST(MemoryFallback, HalvesTheSubBatchUntilItFitsAndKeepsOrder) {
  std::atomic<int64_t> sub_batch{std::numeric_limits<int64_t>::max()};
  std::vector<std::pair<int64_t, int64_t>> done;
  auto chunk = [&](int64_t start, int64_t count) {
    if (count > 2) throw cuda_oom();
    done.emplace_back(start, count);
  };
  auto tiled = [&](int64_t) { FAIL() << "no frame needs tiling"; };
  EncodeReport r = run_with_memory_fallback(8, sub_batch, chunk, tiled);
  const std::vector<std::pair<int64_t, int64_t>> expected = {{0, 2}, {2, 2}, {4, 2}, {6, 2}};
  EXPECT_EQ(done, expected);
  EXPECT_EQ(r.sub_batch, 2);
  EXPECT_EQ(sub_batch.load(), 2);
  EXPECT_EQ(r.notes.size(), 2u);  // 8 -> 4 -> 2
  EXPECT_EQ(r.tiled_frames, 0);

  // The lowered sub-batch is kept for the next batch: no new failure, no note.
  done.clear();
  r = run_with_memory_fallback(5, sub_batch, chunk, tiled);
  const std::vector<std::pair<int64_t, int64_t>> next = {{0, 2}, {2, 2}, {4, 1}};
  EXPECT_EQ(done, next);
  EXPECT_TRUE(r.notes.empty());
}

TEST(MemoryFallback, LoneFrameThatDoesNotFitIsTiledInPlace) {
  std::atomic<int64_t> sub_batch{4};
  std::vector<int64_t> order;
  auto chunk = [&](int64_t start, int64_t count) {
    if (start <= 5 && 5 < start + count) throw cuda_oom();  // frame 5 never fits whole
    for (int64_t i = start; i < start + count; ++i) order.push_back(i);
  };
  std::vector<int64_t> tiled_frames;
  auto tiled = [&](int64_t index) {
    tiled_frames.push_back(index);
    order.push_back(index);
  };
  EncodeReport r = run_with_memory_fallback(8, sub_batch, chunk, tiled);
  EXPECT_EQ(tiled_frames, std::vector<int64_t>{5});
  EXPECT_EQ(r.tiled_frames, 1);
  std::vector<int64_t> all = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(order, all);  // nothing lost, nothing reordered
  EXPECT_EQ(sub_batch.load(), 1);
}

TEST(MemoryFallback, OtherErrorsPropagate) {
  std::atomic<int64_t> sub_batch{4};
  auto chunk = [&](int64_t, int64_t) { throw std::runtime_error("shape mismatch"); };
  EXPECT_THROW(run_with_memory_fallback(3, sub_batch, chunk, [](int64_t) {}), std::runtime_error);
  EXPECT_EQ(sub_batch.load(), 4);
}

TEST(Tiles, PositionsFollowComfyUI) {
  // range(0, 1024 - 64, 512 - 64) = 0, 448, 896; the last tile is clipped.
  auto t = plan_tiles(1024, 1024, 512, 512, 64);
  ASSERT_EQ(t.size(), 9u);
  EXPECT_EQ(t[0].x, 0);
  EXPECT_EQ(t[1].x, 448);
  EXPECT_EQ(t[2].x, 896);
  EXPECT_EQ(t[2].w, 128);
  EXPECT_EQ(t[8].y, 896);
  EXPECT_EQ(t[8].h, 128);
  auto one = plan_tiles(512, 320, 512, 512, 64);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].h, 512);
  EXPECT_EQ(one[0].w, 320);
  auto wide = plan_tiles(256, 600, 256, 512, 64);  // width: range(0, 536, 448) = 0, 448
  ASSERT_EQ(wide.size(), 2u);
  EXPECT_EQ(wide[1].x, 448);
  EXPECT_EQ(wide[1].w, 152);
  EXPECT_THROW(plan_tiles(256, 256, 64, 64, 64), std::exception);
}

TEST(Tiles, FeatherMaskRampsOnEverySide) {
  at::Tensor m = feather_mask(6, 10, 2, at::TensorOptions().dtype(at::kDouble));
  EXPECT_DOUBLE_EQ(m[0][0].item<double>(), 0.25);
  EXPECT_DOUBLE_EQ(m[0][5].item<double>(), 0.5);
  EXPECT_DOUBLE_EQ(m[1][1].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(m[3][5].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(m[5][9].item<double>(), 0.25);
  EXPECT_TRUE(at::equal(m, m.flip({0, 1})));
}

// An encoder that is exactly local (the mean of each 8x8 block): tiles blend
// back into the untiled result whatever the tile layout.
at::Tensor block_mean(const at::Tensor& x) { return at::avg_pool2d(x, {8, 8}); }

TEST(Tiles, BlendingReproducesALocalEncoder) {
  at::Tensor x = at::rand({1, 3, 96, 136}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor direct = block_mean(x);
  at::Tensor tiled = encode_tiled(block_mean, x, 8, /*tile=*/64, /*overlap=*/16);
  ASSERT_EQ(tiled.sizes(), direct.sizes());
  EXPECT_LT((tiled - direct).abs().max().item<float>(), 1e-6f);
}

TEST(Tiles, BlendsOverlapsAsAWeightedMean) {
  // Each tile returns a constant equal to its own x offset: where tiles overlap
  // the result must lie between the two constants, and equal one where only
  // one tile covers a cell.
  at::Tensor x = at::zeros({1, 3, 64, 200}, at::TensorOptions().dtype(at::kFloat));
  int64_t calls = 0;
  auto constant = [&](const at::Tensor& tile) {
    ++calls;
    return at::full({1, 1, tile.size(2) / 8, tile.size(3) / 8}, static_cast<float>(tile.size(3)));
  };
  at::Tensor out = encode_tiled(constant, x, 8, 64, 16);
  EXPECT_GT(calls, 3);
  EXPECT_EQ(out.size(3), 25);
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
  EXPECT_GE(out.min().item<float>(), 0.0f);
  EXPECT_LE(out.max().item<float>(), 128.0f);
}

TEST(Tiles, SingleTileIsTheDirectEncode) {
  at::Tensor x = at::rand({1, 3, 64, 64}, at::TensorOptions().dtype(at::kFloat));
  auto fn = [](const at::Tensor& t) { return at::avg_pool2d(t * t, {8, 8}) + 1.0; };
  at::Tensor tiled = encode_tiled(fn, x, 8, 512, 64);
  EXPECT_LT((tiled - fn(x)).abs().max().item<float>(), 1e-6f);
}

}  // namespace
}  // namespace gstvae
